"""vlmkit: compose, train, evaluate and serve LLaVA-style vision-language models."""

from vlmkit.config import VLMConfig

__version__ = "0.1.0"
__all__ = ["VLM", "VLMConfig", "__version__"]


def __getattr__(name: str):
    # the torch/transformers-heavy API loads on first use, so `import vlmkit` and `vlmkit --help` stay fast
    if name == "VLM":
        from vlmkit.api import VLM

        return VLM
    raise AttributeError(f"module 'vlmkit' has no attribute {name!r}")
