"""Text generation from ``inputs_embeds``: our own KV-cached greedy / sampling / beam-search decode loop.

``generate`` and ``stream`` take a transformers causal LM plus left-padded prompt embeddings (text embeddings,
possibly with image features spliced in) and do not care where those came from.
"""

from vlmkit.generation.backend import DecodeBackend, DecodeResources, select_backend
from vlmkit.generation.config import BACKENDS, DecodeOptions, GenerationConfig, GenerationResult
from vlmkit.generation.decode import generate, stream
from vlmkit.generation.forward import decode_step, prefill
from vlmkit.generation.kv_cache import PromptKV
from vlmkit.generation.sampling import select_next_tokens

__all__ = [
    "BACKENDS",
    "DecodeBackend",
    "DecodeOptions",
    "DecodeResources",
    "GenerationConfig",
    "GenerationResult",
    "PromptKV",
    "decode_step",
    "generate",
    "prefill",
    "select_backend",
    "select_next_tokens",
    "stream",
]
