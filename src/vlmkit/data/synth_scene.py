"""Scene descriptions of the synthetic world, their sampling, and the canonical English built from them.

A scene is a plain frozen dataclass: coloured shapes on a 3x3 grid (``ShapeScene``) or a small rendered
document (``DocumentScene``). Every answer of the synthetic data set is computed from these objects, never
from pixels, and ``render_scene`` (synth_render.py) is a pure function of them. Scenes round-trip through
JSON (``to_dict`` / ``scene_from_dict``), so ``scenes.jsonl`` next to a generated set is enough to re-derive
every answer or to build dense labels (per-cell colour/shape, counts, strings) for vision pre-training.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, TypeAlias

# RGB values are part of the data format: changing them changes every generated image
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 225),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 135, 30),
}
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (250, 250, 250), "grey": (165, 165, 165),
                                                "black": (25, 25, 25)}  # fmt: skip
GRID = 3  # shapes sit in distinct cells of a GRID x GRID grid, so positions and relations are unambiguous
_ROWS = ("top", "", "bottom")
_COLS = ("left", "", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DOC_TYPES = ("invoice", "receipt", "form")
_FIRST = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kim", "Leo", "Mia",
          "Noah", "Omar", "Pia", "Raj", "Sam", "Tia", "Zoe")  # fmt: skip
_LAST = ("Lee", "Diaz", "Roy", "Fox", "Hart", "Khan", "Lund", "Moss", "Park", "Reed", "Shaw", "Wolf",
         "Cole", "Ford", "Nash", "Bell")  # fmt: skip
_STORES = ("Corner Shop", "Deli 24", "Fresh Mart", "Book Nook", "Cafe Blue", "Tech Hub", "Bake House",
           "Pet Stop")  # fmt: skip
_GOODS = ("Tea", "Milk", "Bread", "Eggs", "Rice", "Soap", "Jam", "Pens", "Salt", "Cake")
_CITIES = ("Paris", "Oslo", "Rome", "Lima", "Cairo", "Tokyo", "Delhi", "Perth", "Quito", "Seoul", "Berlin",
           "Madrid")  # fmt: skip


def position_name(*, row: int, col: int) -> str:
    """The canonical answer to "Where is ...?": top left, top, top right, left, centre, right, ..."""
    return " ".join(part for part in (_ROWS[row], _COLS[col]) if part) or "centre"


def position_phrase(*, row: int, col: int) -> str:
    """The position as used in sentences: "at the top left", "on the left", "in the centre"."""
    name = position_name(row=row, col=col)
    if name == "centre":
        return "in the centre"
    return f"on the {name}" if row == 1 else f"at the {name}"


def format_cents(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


@dataclass(frozen=True, kw_only=True)
class Shape:
    """One shape; ``dx``/``dy`` jitter it inside its cell as a fraction (-1..1) of the free room."""

    kind: str
    colour: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def name(self) -> str:
        """Colour + kind: unique within a scene, so it always identifies the shape."""
        return f"{self.colour} {self.kind}"

    @property
    def position(self) -> str:
        return position_name(row=self.row, col=self.col)


@dataclass(frozen=True, kw_only=True)
class ShapeScene:
    size: int
    background: str
    shapes: tuple[Shape, ...]

    def ordered(self) -> list[Shape]:
        """Reading order (row, then column): the order captions and descriptions mention shapes in."""
        return sorted(self.shapes, key=lambda s: (s.row, s.col))

    def count(self, *, kind: str | None = None, colour: str | None = None) -> int:
        return sum(1 for s in self.shapes if kind in (None, s.kind) and colour in (None, s.colour))

    def referent(self, shape: Shape) -> str:
        """The shortest unambiguous name: the kind alone when it is unique, else colour + kind."""
        return shape.kind if self.count(kind=shape.kind) == 1 else shape.name

    def to_dict(self) -> dict[str, Any]:
        return {"type": "shapes", "size": self.size, "background": self.background,
                "shapes": [asdict(s) for s in self.shapes]}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class DocumentScene:
    """An invoice, receipt or form; ``lines()`` is exactly the text that gets rendered."""

    size: int
    doc_type: str
    date: str
    name: str  # billed-to name (invoice), store name (receipt), person (form)
    number: str = ""  # invoice number / form ID; receipts have none
    city: str = ""  # forms only
    items: tuple[tuple[str, int], ...] = ()  # receipt lines: (label, price in cents)
    total_cents: int = 0  # invoices store it; receipts derive it from their items

    @property
    def total(self) -> str:
        return format_cents(self.total_cents)

    def lines(self) -> list[str]:
        if self.doc_type == "invoice":
            return ["INVOICE", f"No {self.number}", self.date, self.name, f"Total {self.total}"]
        if self.doc_type == "receipt":
            goods = [f"{label} {format_cents(cents)}" for label, cents in self.items]
            return [self.name, self.date, *goods, f"Total {self.total}"]
        return ["FORM", f"ID {self.number}", self.name, self.date, self.city]

    def to_dict(self) -> dict[str, Any]:
        return {"type": "document"} | asdict(self) | {"items": [list(item) for item in self.items]}


Scene: TypeAlias = ShapeScene | DocumentScene


def scene_from_dict(data: dict[str, Any]) -> Scene:
    """Inverse of ``to_dict`` (as read back from scenes.jsonl)."""
    fields = {k: v for k, v in data.items() if k != "type"}
    if data.get("type") == "shapes":
        shapes = tuple(Shape(**s) for s in fields.pop("shapes"))
        return ShapeScene(shapes=shapes, **fields)
    if data.get("type") == "document":
        items = tuple((label, cents) for label, cents in fields.pop("items"))
        return DocumentScene(items=items, **fields)
    raise ValueError(f"unknown scene type {data.get('type')!r}")


# ----------------------------------------------------------------------------------------------- sampling


def sample_shapes(rng: random.Random, *, size: int, count: int) -> ShapeScene:
    """``count`` shapes in distinct cells with distinct colour + kind pairs on a random background."""
    cells = rng.sample(range(GRID * GRID), count)
    pairs = rng.sample([(c, k) for c in COLOURS for k in KINDS], count)
    shapes = tuple(
        Shape(
            kind=kind,
            colour=colour,
            size=rng.choice(SIZES),
            row=cell // GRID,
            col=cell % GRID,
            dx=round(rng.uniform(-1, 1), 2),
            dy=round(rng.uniform(-1, 1), 2),
        )  # fmt: skip
        for cell, (colour, kind) in zip(cells, pairs, strict=True)
    )
    return ShapeScene(size=size, background=rng.choice(list(BACKGROUNDS)), shapes=shapes)


def sample_document(rng: random.Random, *, size: int, doc_type: str | None = None) -> DocumentScene:
    doc_type = doc_type or rng.choice(DOC_TYPES)
    date = f"{rng.randint(2020, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    person = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    if doc_type == "invoice":
        return DocumentScene(size=size, doc_type=doc_type, date=date, name=person,
                             number=str(rng.randint(1000, 9999)), total_cents=rng.randint(1000, 9999))  # fmt: skip
    if doc_type == "receipt":
        goods = rng.sample(_GOODS, 2)
        items = tuple((label, rng.randint(50, 1999)) for label in goods)
        return DocumentScene(size=size, doc_type=doc_type, date=date, name=rng.choice(_STORES), items=items,
                             total_cents=sum(cents for _, cents in items))  # fmt: skip
    if doc_type == "form":
        return DocumentScene(size=size, doc_type=doc_type, date=date, name=person,
                             number=str(rng.randint(10000, 99999)), city=rng.choice(_CITIES))  # fmt: skip
    raise ValueError(f"unknown document type {doc_type!r}; use one of {', '.join(DOC_TYPES)}")


# ---------------------------------------------------------------------------------------------- language


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: ShapeScene) -> str:
    """ "a large red circle on the left and a small blue square at the bottom right" (reading order)."""
    return _join([f"a {s.size} {s.colour} {s.kind} {position_phrase(row=s.row, col=s.col)}"
                  for s in scene.ordered()])  # fmt: skip


def relation(a: Shape, b: Shape) -> str | None:
    """How ``a`` relates to ``b``: left of / right of (columns first), else above / below."""
    if a.col != b.col:
        return "left of" if a.col < b.col else "right of"
    if a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


def holds(rel: str, a: Shape, b: Shape) -> bool:
    """Whether ``a`` is ``rel`` ``b`` ("left of", "right of", "above", "below"), judged by grid cells."""
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row,
            "below": a.row > b.row}[rel]  # fmt: skip


def description(scene: ShapeScene) -> str:
    """The multi-sentence answer to "Describe the scene in detail."."""
    shapes = scene.ordered()
    count = len(shapes)
    noun = "shape" if count == 1 else "shapes"
    verb = "is" if count == 1 else "are"
    sentences = [f"There {verb} {NUMBER_WORDS[count]} {noun} on a {scene.background} background."]
    sentences += [
        f"A {s.size} {s.colour} {s.kind} is {position_phrase(row=s.row, col=s.col)}." for s in shapes
    ]
    if count >= 2:
        first, second = shapes[0], shapes[1]
        sentences.append(f"The {first.name} is {relation(first, second)} the {second.name}.")
    return " ".join(sentences)
