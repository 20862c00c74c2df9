"""The one error type of quantization: a combination this machine or this model cannot run."""

from __future__ import annotations


class QuantizationError(ValueError):
    """A quantization method, device, library or layer shape that cannot be used; the message names what is
    missing (a ValueError, so the command line reports it as one ``error:`` line)."""
