"""Scene description -> pixels. Pure and deterministic: the same scene always gives the same image.

Shapes are drawn without anti-aliasing; documents use Pillow's bundled font (``ImageFont.load_default``,
Aileron when Pillow has FreeType, else its bitmap font), scaled with the canvas so that a 64x64 document
has ~5 px wide glyphs on an 11 px line pitch: five short lines that a 64-pixel, patch-8 tower can resolve.
"""

from __future__ import annotations

import functools
import math

from PIL import Image, ImageDraw, ImageFont

from vlmkit.data.synth_scene import BACKGROUNDS, COLOURS, GRID, DocumentScene, Scene, Shape, ShapeScene

PAPER = (250, 250, 244)
INK = (20, 20, 20)
SMALL_RADIUS = 0.08  # of the canvas size
LARGE_RADIUS = 0.14
# font size / line pitch / margin at a 64-pixel canvas, scaled linearly with the canvas
_FONT_AT_64, _PITCH_AT_64, _MARGIN_AT_64 = 9, 11, 4


def render_scene(scene: Scene) -> Image.Image:
    """An RGB image of ``scene`` (``scene.size`` pixels square)."""
    if isinstance(scene, ShapeScene):
        return _render_shapes(scene)
    if isinstance(scene, DocumentScene):
        return _render_document(scene)
    raise TypeError(f"expected a ShapeScene or DocumentScene, got {type(scene).__name__}")


def shape_geometry(shape: Shape, *, size: int) -> tuple[float, float, float]:
    """(centre x, centre y, radius) in pixels: the cell centre moved by the jitter within the free room."""
    cell = size / GRID
    radius = (LARGE_RADIUS if shape.size == "large" else SMALL_RADIUS) * size
    room = max(0.0, cell / 2 - radius - 1)  # keeps every shape inside its own cell
    return (shape.col + 0.5) * cell + shape.dx * room, (shape.row + 0.5) * cell + shape.dy * room, radius


def _render_shapes(scene: ShapeScene) -> Image.Image:
    image = Image.new("RGB", (scene.size, scene.size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        draw_shape(draw, shape, size=scene.size, fill=COLOURS[shape.colour])
    return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, *, size: int, fill: int | tuple[int, ...]) -> None:
    """Draw one shape; also used to render label maps (``fill`` = a class id) with the exact same pixels."""
    x, y, r = shape_geometry(shape, size=size)
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "square":
        half = r * 0.9  # a square of the same radius looks bigger than the circle
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif shape.kind == "triangle":
        dx = r * math.sqrt(3) / 2
        draw.polygon([(x, y - r), (x - dx, y + r / 2), (x + dx, y + r / 2)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


@functools.lru_cache(maxsize=8)
def document_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font at the size used for a ``size``-pixel document (no system fonts: reproducible)."""
    points = max(4, round(_FONT_AT_64 * size / 64))
    try:
        return ImageFont.load_default(size=points)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _render_document(scene: DocumentScene) -> Image.Image:
    size = scene.size
    image = Image.new("RGB", (size, size), PAPER)
    draw = ImageDraw.Draw(image)
    font = document_font(size)
    margin = round(_MARGIN_AT_64 * size / 64)
    pitch = _PITCH_AT_64 * size / 64
    for index, line in enumerate(scene.lines()):
        draw.text((margin, round(margin + index * pitch) - 2), line, fill=INK, font=font)
    return image
