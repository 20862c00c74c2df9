"""The CPU fast path for a plain float32 Llama: the lean decode step (``lean_step.py``), oneDNN twins
(``twins.py``), the float16-screened greedy head (``greedy_head.py``), the float16 draft (``draft.py``) and
speculative decoding (``speculative.py``), as decode backends (``backends.py``) that ``generation.backend``
selects. No imports here: ``generation.runner`` imports ``twins`` and ``backends`` imports ``runner``.
"""
