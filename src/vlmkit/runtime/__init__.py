"""What a loaded model runs requests with, below the public ``VLM``: request preparation (image keys, features,
the feature and prefix caches) in ``prepare.py``."""

from vlmkit.runtime.prepare import ENCODE_MODES, PreparedRequest, RequestPreparer, check_encode_mode

__all__ = ["ENCODE_MODES", "PreparedRequest", "RequestPreparer", "check_encode_mode"]
