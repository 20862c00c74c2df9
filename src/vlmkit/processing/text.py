"""Text checks shared by every entry point (Python API, CLI, server, training data).

A Python ``str`` can hold a lone UTF-16 surrogate — JSON's ``"\\ud800"`` escape and undecodable command-line
bytes (``surrogateescape``) both produce one — and such text fails deep inside a tokenizer or a response
encoder. Checking it where text enters turns that into a clear error naming the field.
"""

from __future__ import annotations


def check_text(text: str, *, name: str) -> str:
    """``text`` itself, or ``ValueError`` naming ``name`` when it cannot be encoded as UTF-8."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(
            f"{name} contains a lone UTF-16 surrogate (U+{ord(bad):04X} at character {exc.start}), "
            "which is not valid Unicode text"
        ) from None
    return text
