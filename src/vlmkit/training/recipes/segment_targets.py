"""Dense per-patch targets computed from pixels alone: statistics of flat-colour segments.

Users' own data has no scene labels, and the question-conditioned answer probe alone gives a new tower one
sparse signal per question, which stalls on binding questions ("What colour is the square?"). Simple images —
shapes, diagrams, rendered text — are made of flat-colour regions, and a region's statistics say what it is:
a square fills its bounding box (fill 1.0), a circle fills 0.79 of it, a triangle half. Fill changes when a
shape turns (a square at 45 degrees fills half its box), so each region also gets its roundness, the area over
the circle through its farthest pixel: rotation-invariant, 0.41 for a triangle, 0.64 a square, 0.83 a hexagon,
1.0 a circle (pixelised a few hundredths lower). Every patch is told the statistics of the region it covers, so the tower learns shape, size and colour per patch, as the dense scene
labels teach it, without any annotation. On photographs the regions are fragments and the targets carry little;
the recipe's ``stage1.segments`` switches them off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

STATS = 8  # fill, aspect, size, offset y/x inside the region, region centre y/x, roundness
# shape bins of the joint class: roundness between regular polygons' values (triangle 0.41, square 0.64,
# pentagon 0.76, hexagon 0.83, circle 1.0; below 0.3 thin or star-like), then fill below a triangle's minimum
# (0.5 of its bounding box at any rotation: stars, crosses, rings) or not
ROUND_EDGES = (0.3, 0.52, 0.7, 0.86)
FILL_EDGE = 0.46
SHAPE_BINS = 2 * (len(ROUND_EDGES) + 1)
PALETTE = 16  # colour clusters
CLASSES = 1 + PALETTE * SHAPE_BINS  # background + colour cluster x shape bin
OUTPUTS = 1 + STATS + 3 + CLASSES  # foreground logit, statistics, colour, joint class logits


@dataclass
class SegmentTargets:
    foreground: torch.Tensor  # [images, patches] bool: a non-background region covers the patch
    stats: torch.Tensor  # [images, patches, STATS] float
    colour: torch.Tensor  # [images, patches, 3] the region's mean colour in [-1, 1]
    classes: torch.Tensor  # [images, patches] long: 0 background, else 1 + colour cluster x fill bin

    def __len__(self) -> int:
        return self.foreground.shape[0]


def components(images: torch.Tensor, *, tolerance: int = 24, max_iterations: int = 256) -> torch.Tensor:
    """4-connected regions of similar colour.  images uint8 [n, 3, S, S] -> labels [n, S, S] int64.

    A region's label is the smallest flat pixel index in it. Neighbours join when no channel differs by more
    than ``tolerance``, so anti-aliased or JPEG edges do not shatter a flat region. Min-label propagation with
    pointer jumping: a handful of iterations for convex regions.
    """
    n, _, size, _ = images.shape
    pixels = images.to(torch.int16)
    right = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(1) <= tolerance  # [n, S, S-1]
    down = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(1) <= tolerance  # [n, S-1, S]
    labels = torch.arange(size * size).view(1, size, size).expand(n, size, size).clone()
    never = size * size  # larger than any label: "no neighbour here"
    for _ in range(max_iterations):
        new = labels.clone()
        new[..., :, :-1] = torch.minimum(new[..., :, :-1], labels[..., :, 1:].masked_fill(~right, never))
        new[..., :, 1:] = torch.minimum(new[..., :, 1:], labels[..., :, :-1].masked_fill(~right, never))
        new[..., :-1, :] = torch.minimum(new[..., :-1, :], labels[..., 1:, :].masked_fill(~down, never))
        new[..., 1:, :] = torch.minimum(new[..., 1:, :], labels[..., :-1, :].masked_fill(~down, never))
        flat = new.view(n, -1)
        new = torch.minimum(flat, flat.gather(1, flat)).view(n, size, size)  # pointer jumping
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def segment_targets(images: torch.Tensor, *, patch_size: int, chunk: int = 512) -> SegmentTargets:
    """Per-patch region statistics for uint8 images [n, 3, S, S] (computed ``chunk`` images at a time)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % patch_size:
        shape = tuple(images.shape)
        raise ValueError(f"expected uint8 images [n, 3, S, S] with S a multiple of {patch_size}, got {shape}")
    parts = [_chunk_targets(images[i : i + chunk], patch_size) for i in range(0, len(images), chunk)]
    if not parts:
        grid = (images.shape[-1] // patch_size) ** 2
        empty = torch.zeros(0, grid, dtype=torch.bool)
        return SegmentTargets(empty, torch.zeros(0, grid, STATS), torch.zeros(0, grid, 3), empty.long())
    foreground, stats, colour = (torch.cat([p[i] for p in parts]) for i in range(3))
    return SegmentTargets(
        foreground, stats, colour, joint_classes(foreground=foreground, stats=stats, colour=colour)
    )


def joint_classes(
    *, foreground: torch.Tensor, stats: torch.Tensor, colour: torch.Tensor, seed: int = 0
) -> torch.Tensor:
    """Colour cluster x shape bin (roundness, fill) per foreground patch: a label that binds colour to shape.

    A class forces the tower to make "red square" and "red circle" linearly separable per patch, the form
    an LM's attention can pick out; the colour clusters are k-means over the data's own region colours.
    """
    if not foreground.any():
        return torch.zeros(foreground.shape, dtype=torch.long)
    centres = kmeans(colour[foreground], k=PALETTE, seed=seed)  # fitted on foreground colours only
    cluster = torch.cdist(colour.flatten(0, 1), centres).argmin(-1).view(foreground.shape)
    roundness = torch.bucketize(stats[..., 7].contiguous(), torch.tensor(ROUND_EDGES))
    shape = 2 * roundness + (stats[..., 0] >= FILL_EDGE).long()
    return torch.where(foreground, 1 + cluster * SHAPE_BINS + shape, 0)


def kmeans(
    points: torch.Tensor, *, k: int, seed: int, iterations: int = 20, sample: int = 20000
) -> torch.Tensor:
    """Plain Lloyd k-means on at most ``sample`` points -> [k, dim] centres (duplicates when fewer distinct)."""
    generator = torch.Generator().manual_seed(seed)
    if len(points) > sample:
        points = points[torch.randperm(len(points), generator=generator)[:sample]]
    centres = points[torch.randperm(len(points), generator=generator)[:k]]
    if len(centres) < k:  # fewer points than clusters: duplicate centres, which argmin never prefers
        centres = torch.cat([centres, centres[:1].expand(k - len(centres), -1)])
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(-1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).float()[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def _region_tables(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-label area, bounding box, centroid and mean colour, indexed by label ([n, S*S] each)."""
    n, _, size, _ = images.shape
    flat = labels.view(n, -1)
    ones = torch.ones(n, size * size)
    ys = torch.arange(size).repeat_interleave(size).float().expand(n, -1)
    xs = torch.arange(size).repeat(size).float().expand(n, -1)

    def reduce(values: torch.Tensor, how: str, start: float) -> torch.Tensor:
        return torch.full((n, size * size), start).scatter_reduce(1, flat, values, how)

    area = reduce(ones, "sum", 0.0)
    tables = {
        "area": area,
        "ymin": reduce(ys, "amin", float(size)), "ymax": reduce(ys, "amax", -1.0),
        "xmin": reduce(xs, "amin", float(size)), "xmax": reduce(xs, "amax", -1.0),
        "cy": reduce(ys, "sum", 0.0) / area.clamp(min=1), "cx": reduce(xs, "sum", 0.0) / area.clamp(min=1),
    }  # fmt: skip
    for c in range(3):
        tables[f"c{c}"] = reduce(images[:, c].reshape(n, -1).float(), "sum", 0.0) / area.clamp(min=1)
    # roundness: area over the circle (centred on the centroid) through the farthest pixel's outer edge
    far = (ys - tables["cy"].gather(1, flat)) ** 2 + (xs - tables["cx"].gather(1, flat)) ** 2
    radius = reduce(far, "amax", 0.0).sqrt() + 0.5
    tables["round"] = area / (torch.pi * radius**2)
    return tables


def _chunk_targets(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(foreground, stats, colour) for one chunk; the joint classes need every chunk's colours."""
    n, _, size, _ = images.shape
    grid = size // patch
    labels = components(images)
    tables = _region_tables(images, labels)
    background = tables["area"].argmax(1)  # the largest region
    by_patch = labels.view(n, grid, patch, grid, patch).permute(0, 1, 3, 2, 4).reshape(n, grid * grid, -1)
    # each patch takes the foreground region covering most of its pixels; background pixels get unique
    # values above every label so they never form the mode unless the patch has no foreground at all
    unique = size * size + torch.arange(patch * patch)
    is_background = by_patch == background.view(n, 1, 1)
    region = torch.where(is_background, unique, by_patch).mode(-1).values  # [n, G*G]
    foreground = region < size * size
    region = torch.where(foreground, region, background[:, None].expand(-1, grid * grid))

    def at(name: str) -> torch.Tensor:
        return tables[name].gather(1, region)

    height, width = at("ymax") - at("ymin") + 1, at("xmax") - at("xmin") + 1
    centre = torch.arange(grid).float() * patch + patch / 2
    patch_y, patch_x = centre.repeat_interleave(grid), centre.repeat(grid)
    stats = torch.stack([
        at("area") / (height * width), torch.log(width / height), torch.log(at("area")) / 4,
        (patch_y - at("cy")) / height, (patch_x - at("cx")) / width, at("cy") / size, at("cx") / size,
        at("round"),
    ], -1)  # fmt: skip
    colour = torch.stack([at(f"c{c}") for c in range(3)], -1) / 127.5 - 1
    return foreground, stats, colour


def segment_loss(outputs: torch.Tensor, targets: SegmentTargets, index: torch.Tensor) -> torch.Tensor:
    """outputs [batch, patches, OUTPUTS] from a linear head on the tower's tokens; ``index`` picks the images."""
    loss = F.binary_cross_entropy_with_logits(outputs[..., 0], targets.foreground[index].float())
    loss = loss + 4 * F.mse_loss(outputs[..., 1 : 1 + STATS], targets.stats[index])
    loss = loss + F.mse_loss(outputs[..., 1 + STATS : 4 + STATS], targets.colour[index])
    return loss + F.cross_entropy(outputs[..., 4 + STATS :].flatten(0, 1), targets.classes[index].flatten())
