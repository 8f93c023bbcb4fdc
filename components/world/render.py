"""Render a composition as a 32×32 RGB image of filled, non-overlapping shapes."""

from __future__ import annotations

import numpy as np

from components.world.grammar import BACKGROUND_RGB, PALETTE, Composition

IMAGE_SIZE = 32
MIN_SIZE, MAX_SIZE = 8, 12  # side / diameter in pixels
GAP = 2  # pixels kept free between shapes, so they stay separate components


def _shape_mask(shape: str, size: int) -> np.ndarray:
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    centre = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre) ** 2 + (xx - centre) ** 2 <= (size / 2) ** 2


def shape_corners(image: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Bool (H, W): the pixels of each shape's bounding box outside its inscribed disc.

    There, and only there, a square and a circle of the same box differ: the pixels
    that make the shape word matter to a denoising loss.
    """
    from scipy import ndimage

    corners = np.zeros(image.shape[:2], dtype=bool)
    labels, _ = ndimage.label(np.any(image != np.asarray(background, dtype=image.dtype), axis=-1))
    for box in ndimage.find_objects(labels):
        side = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
        disc = _shape_mask("circle", side)[:box[0].stop - box[0].start, :box[1].stop - box[1].start]
        corners[box] |= ~disc
    return corners


def render(composition: Composition, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A uint8 (size, size, 3) image; random sizes and positions drawn from ``rng``."""
    for _attempt in range(200):
        image = np.empty((size, size, 3), dtype=np.uint8)
        image[:] = BACKGROUND_RGB[composition.background]
        occupied = np.zeros((size, size), dtype=bool)
        placed = 0
        for _ in range(composition.count):
            for _try in range(50):
                s = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
                y, x = (int(v) for v in rng.integers(0, size - s + 1, size=2))
                y0, x0 = max(0, y - GAP), max(0, x - GAP)
                if occupied[y0:y + s + GAP, x0:x + s + GAP].any():
                    continue
                mask = _shape_mask(composition.shape, s)
                image[y:y + s, x:x + s][mask] = PALETTE[composition.colour]
                occupied[y:y + s, x:x + s] = True
                placed += 1
                break
        if placed == composition.count:
            return image
    raise RuntimeError(f"could not place {composition.count} shapes in {size}×{size}")


def render_batch(compositions: list[Composition], seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """Deterministic batch (N, size, size, 3) from one seed."""
    rng = np.random.default_rng(seed)
    return np.stack([render(c, rng, size) for c in compositions])
