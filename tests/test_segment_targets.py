"""Pixel-only stage-1 targets: flat-colour regions and their per-patch statistics."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vlmkit.training.recipes.segment_targets import CLASSES, STATS, components, kmeans, segment_targets

BACKGROUND, RED, BLUE, GREEN = (30, 30, 30), (220, 40, 40), (40, 80, 230), (40, 200, 80)


def _scene() -> torch.Tensor:
    """64 px: a red square in patch cells (1..2, 1..2), a blue circle at (5, 1), a green triangle at (5, 5)."""
    image = Image.new("RGB", (64, 64), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 23, 23), fill=RED)  # exactly patches (1,1) (1,2) (2,1) (2,2)
    draw.ellipse((8, 40, 23, 55), fill=BLUE)
    draw.polygon([(40, 55), (55, 55), (47.5, 40)], fill=GREEN)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # [1, 3, 64, 64]


def _patch(row: int, col: int) -> int:
    return row * 8 + col


def test_components_find_each_flat_region_once():
    labels = components(_scene())[0]
    assert len(labels.unique()) == 4  # background + three shapes
    assert labels[8:24, 8:24].unique().numel() == 1
    assert labels[12, 12] != labels[48, 16] != labels[50, 47]


def test_near_colours_join_but_distinct_colours_do_not():
    image = _scene()
    noisy = image.clone()
    jitter = torch.randint(0, 10, (1, 3, 16, 16), dtype=torch.uint8)
    noisy[:, :, 8:24, 8:24] += jitter  # inside the square only
    labels = components(noisy)[0]
    assert labels[8:24, 8:24].unique().numel() == 1
    touching = image.clone()
    touching[:, :, 8:24, 24:32] = torch.tensor(BLUE, dtype=torch.uint8).view(1, 3, 1, 1)  # blue touches red
    labels = components(touching)[0]
    assert labels[12, 12] != labels[12, 28]


def test_fill_ratio_tells_squares_circles_and_triangles_apart():
    targets = segment_targets(_scene(), patch_size=8)
    fill = targets.stats[0, :, 0]
    assert fill[_patch(1, 1)] == pytest.approx(1.0)
    assert fill[_patch(6, 1)] == pytest.approx(0.785, abs=0.05)  # the circle
    assert fill[_patch(6, 6)] == pytest.approx(0.5, abs=0.08)  # the triangle
    assert targets.stats.shape == (1, 64, STATS)


def _polygon(corners: int, *, angle: float, radius: float = 20.0) -> torch.Tensor:
    """One regular polygon (``corners`` 0: a circle) of the given radius at the centre of a 64 px image."""
    image = Image.new("RGB", (64, 64), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if corners == 0:
        draw.ellipse((32 - radius, 32 - radius, 32 + radius, 32 + radius), fill=RED)
    else:
        turns = [angle + 2 * np.pi * i / corners for i in range(corners)]
        draw.polygon([(32 + radius * np.cos(t), 32 + radius * np.sin(t)) for t in turns], fill=RED)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]


@pytest.mark.parametrize(("corners", "expected"), [(3, 0.41), (4, 0.64), (6, 0.83), (0, 1.0)])
def test_roundness_names_the_shape_at_any_rotation_where_fill_cannot(corners, expected):
    angles = (0.0, 0.3, np.pi / 4, 1.1)
    targets = segment_targets(torch.cat([_polygon(corners, angle=a) for a in angles]), patch_size=8)
    centre = _patch(4, 4)
    roundness = targets.stats[:, centre, 7]
    assert targets.foreground[:, centre].all()
    # pixelisation costs a few hundredths (the radius is measured to the farthest pixel's outer edge)
    assert roundness.sub(expected).abs().max() < 0.08, roundness
    assert roundness.max() - roundness.min() < 0.04  # rotation barely moves it ...
    if corners == 4:  # ... while a square's fill of its bounding box halves when it turns 45 degrees
        fill = targets.stats[:, centre, 0]
        assert fill[2] > 0.95 and fill[0] < 0.6  # corners on the axes at angle 0: a diamond
    assert targets.classes[:, centre].unique().numel() == 1  # one joint class at every rotation


def test_foreground_and_colour_land_on_the_patches_a_shape_covers():
    targets = segment_targets(_scene(), patch_size=8)
    square = [_patch(r, c) for r in (1, 2) for c in (1, 2)]
    assert targets.foreground[0, square].all()
    assert not targets.foreground[0, [_patch(0, 0), _patch(3, 4), _patch(0, 7)]].any()
    red = torch.tensor(RED) / 127.5 - 1
    assert torch.allclose(targets.colour[0, square], red.expand(4, 3), atol=1e-5)
    # offsets inside the square: top-left patch above/left of the centre, bottom-right below/right
    assert (targets.stats[0, _patch(1, 1), 3:5] < 0).all() and (targets.stats[0, _patch(2, 2), 3:5] > 0).all()


def test_chunking_does_not_change_the_targets():
    images = torch.cat([_scene(), _scene().flip(-1), _scene().flip(-2)])
    whole, chunked = segment_targets(images, patch_size=8), segment_targets(images, patch_size=8, chunk=2)
    assert torch.equal(whole.foreground, chunked.foreground) and torch.equal(whole.stats, chunked.stats)


def test_no_images_and_blank_images_give_empty_or_background_targets():
    assert len(segment_targets(torch.zeros(0, 3, 64, 64, dtype=torch.uint8), patch_size=8)) == 0
    blank = segment_targets(torch.full((2, 3, 64, 64), 200, dtype=torch.uint8), patch_size=8)
    assert not blank.foreground.any() and (blank.classes == 0).all()


def test_bad_image_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of 8"):
        segment_targets(torch.zeros(1, 3, 60, 60, dtype=torch.uint8), patch_size=8)
    with pytest.raises(ValueError, match=r"\[n, 3, S, S\]"):
        segment_targets(torch.zeros(3, 64, 64, dtype=torch.uint8), patch_size=8)


def test_joint_classes_bind_colour_to_shape():
    images = torch.cat([_scene(), _scene().flip(-1)])
    targets = segment_targets(images, patch_size=8)
    classes = targets.classes[0]
    assert (classes[~targets.foreground[0]] == 0).all() and (classes[targets.foreground[0]] > 0).all()
    square, circle, triangle = classes[_patch(1, 1)], classes[_patch(6, 1)], classes[_patch(6, 6)]
    assert len({square.item(), circle.item(), triangle.item()}) == 3
    # the same shape gets the same class wherever it sits (the flipped image mirrors columns)
    assert targets.classes[1, _patch(1, 6)] == square and targets.classes[1, _patch(6, 6)] == circle
    assert int(targets.classes.max()) < CLASSES


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-0.8, -0.8, 0.0], [0.8, 0.0, -0.5], [0.0, 0.9, 0.9]])
    points = (centres[:, None] + 0.02 * torch.randn(3, 200, 3, generator=generator)).flatten(0, 1)
    found = kmeans(points, k=3, seed=1)
    assert torch.cdist(centres, found).min(-1).values.max() < 0.05
    few = kmeans(points[:2], k=5, seed=0)  # fewer points than clusters: duplicate centres, no crash
    assert few.shape == (5, 3) and torch.cdist(points[:2], few).min(-1).values.max() < 1e-6
