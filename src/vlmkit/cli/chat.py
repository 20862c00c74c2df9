"""``vlmkit chat``: a multi-turn REPL on stdin.

Each line is a user turn; ``/image PATH`` attaches an image to the next turn, ``/reset`` forgets the
conversation, ``/quit`` (or end of input) exits 0. The whole history, images included, is sent to
``VLM.chat`` every turn. A failing turn prints one ``error:`` line and is dropped; the session goes on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmkit.cli.common import (
    DeviceOption,
    DType,
    DTypeOption,
    MaxNewTokens,
    ModelOption,
    NumBeams,
    QuantizeOption,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopP,
    VisionTowerOption,
    generation_kwargs,
    is_user_error,
    load_model,
    note,
    print_error,
    read_image,
)

if TYPE_CHECKING:
    from vlmkit.api import VLM

HELP = "commands: /image PATH (attach to the next message), /reset (new conversation), /quit"


@dataclass
class Conversation:
    """The messages so far plus the images waiting for the next user turn."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    pending_images: list[Any] = field(default_factory=list)

    def user_turn(self, text: str) -> dict[str, Any]:
        """Append the user message (image parts first, as LLaVA places them) and return it."""
        if self.pending_images:
            parts = [{"type": "image", "image": image} for image in self.pending_images]
            content: str | list[dict[str, Any]] = [*parts, {"type": "text", "text": text}]
        else:
            content = text
        self.pending_images = []
        message = {"role": "user", "content": content}
        self.messages.append(message)
        return message

    def reset(self) -> None:
        self.messages.clear()
        self.pending_images.clear()


def chat_command(
    model: ModelOption = None,
    max_new_tokens: MaxNewTokens = None,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    num_beams: NumBeams = None,
    stop: Stop = None,
    seed: Seed = None,
    dtype: DTypeOption = DType.auto,
    device: DeviceOption = None,
    vision_tower: VisionTowerOption = None,
    quantize: QuantizeOption = None,
) -> None:
    """Chat about images interactively. /image PATH attaches an image, /reset, /quit; end of input exits."""
    gen = generation_kwargs(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            num_beams=num_beams, stop=stop, seed=seed)  # fmt: skip
    vlm = load_model(model, dtype=dtype, device=device, vision_tower=vision_tower, quantize=quantize)
    interactive = sys.stdin.isatty()
    if interactive:
        note(HELP)
    conversation = Conversation()
    while (line := _read_line(interactive=interactive)) is not None:
        if not _handle_line(line.strip(), conversation=conversation, vlm=vlm, gen=gen):
            break


def _read_line(*, interactive: bool) -> str | None:
    """The next input line, or None at end of input (Ctrl-D)."""
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line if line else None


def _handle_line(line: str, *, conversation: Conversation, vlm: VLM, gen: dict[str, Any]) -> bool:
    """Act on one input line; False means quit."""
    if not line:
        return True
    if line.startswith("/"):
        return _command(line, conversation=conversation)
    conversation.user_turn(line)
    try:
        reply = vlm.chat(conversation.messages, **gen)
    except Exception as exc:
        if not is_user_error(exc):
            raise
        conversation.messages.pop()  # drop the failed turn so the history stays consistent
        print_error(str(exc))
        return True
    conversation.messages.append({"role": "assistant", "content": reply})
    print(reply, flush=True)
    return True


def _command(line: str, *, conversation: Conversation) -> bool:
    name, _, argument = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        conversation.reset()
        note("(conversation cleared)")
    elif name == "/image":
        _attach(argument.strip(), conversation=conversation)
    elif name == "/help":
        note(HELP)
    else:
        print_error(f"unknown command {name!r}; {HELP}")
    return True


def _attach(path: str, *, conversation: Conversation) -> None:
    if not path or path == "-":  # stdin carries the conversation, so it cannot also carry an image
        print_error("/image needs a file path: /image PATH")
        return
    try:
        conversation.pending_images.append(read_image(path))
    except ValueError as exc:  # ImageLoadError: report it and keep chatting
        print_error(str(exc))
        return
    note(f"(attached {path}; it goes with your next message)")
