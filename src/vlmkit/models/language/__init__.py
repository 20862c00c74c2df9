from vlmkit.models.language.lm import build_language_model, ensure_vocab, language_hf_config

__all__ = ["build_language_model", "ensure_vocab", "language_hf_config"]
