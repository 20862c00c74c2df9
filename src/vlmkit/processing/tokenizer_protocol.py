"""What vlmkit needs of a tokenizer, as a static type (a transformers fast tokenizer fits).

It lives in ``processing`` (the lowest package that tokenizes) so every package above it can name it. vlmkit
calls these members with one text / one token at a time, so results are the single-item types (transformers
declares unions such as ``int | list[int]``): ``models.parts.load_tokenizer`` states that once, with a cast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Tokenizer(Protocol):
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None

    @property
    def added_tokens_decoder(self) -> Mapping[int, Any]: ...

    @property
    def special_tokens_map(self) -> Mapping[str, Any]: ...

    def __call__(self, text: str, **kwargs: Any) -> Any:
        """One text -> a transformers ``BatchEncoding``: ``input_ids`` (and ``offset_mapping`` when asked)."""

    def __len__(self) -> int: ...

    def encode(self, text: str, *, add_special_tokens: bool = ..., **kwargs: Any) -> list[int]: ...

    def decode(self, token_ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = ...) -> str: ...

    def convert_tokens_to_ids(self, tokens: str) -> int: ...

    def get_vocab(self) -> dict[str, int]: ...

    def add_tokens(self, new_tokens: Sequence[Any], *, special_tokens: bool = ...) -> int: ...

    def add_special_tokens(self, special_tokens_dict: dict[str, Any]) -> int: ...

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any:
        """Messages -> the rendered text (``tokenize=False``) or ids; the result type follows the keywords."""

    def get_chat_template(self) -> str: ...

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> Any: ...
