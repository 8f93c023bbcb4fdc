"""A programmatic judge: does an image show what its prompt says?

Robust to the noise of generated images: the background is the nearest palette
background of the border pixels; each pixel takes the nearest palette colour (or the
background, if nearer); shapes are connected components above a minimum area, told
apart by their bounding box's corners: a square fills them, a disc leaves them empty.
Generated squares come out pinched (notched edges, rounded corners) and fill about 0.85
of their box, as much as a small rendered disc, so the fill ratio cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from components.world.grammar import BACKGROUND_RGB, COLOURS, COUNTS, PALETTE, Composition, parse_prompt

MIN_AREA = 10  # pixels; smaller blobs are noise
MIN_CONTRAST = 40.0  # RGB distance from the background below which a pixel is background noise
CORNER_FILL = 0.3  # share of the bounding box outside its inscribed ellipse (×1.1) filled: above, a square

_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
_BACKGROUNDS = list(BACKGROUND_RGB)
_BACKGROUND_RGB = np.array([BACKGROUND_RGB[b] for b in _BACKGROUNDS], dtype=np.float32)


@dataclass
class Verdict:
    count: bool
    colour: bool
    shape: bool
    background: bool
    found_count: int
    found_colours: list[str] = field(default_factory=list)
    found_shapes: list[str] = field(default_factory=list)
    found_background: str = ""
    reason: str = ""

    @property
    def aligned(self) -> bool:
        return self.count and self.colour and self.shape and self.background

    @property
    def score(self) -> int:
        """How many of the four attributes are right (graded preference signal)."""
        return int(self.count) + int(self.colour) + int(self.shape) + int(self.background)


def corner_fill(blob: np.ndarray) -> float:
    """Filled share of a blob's bounding-box corners (outside 1.1× its inscribed ellipse)."""
    h, w = blob.shape
    yy, xx = np.mgrid[:h, :w]
    corners = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 > 1.21
    return float(blob[corners].mean()) if corners.any() else 0.0


def _number(n: int) -> str:
    return COUNTS[n - 1] if 1 <= n <= len(COUNTS) else str(n)


def inspect(image: np.ndarray) -> tuple[str, list[tuple[str, str]]]:
    """(background name, [(colour, shape) per object]) seen in a uint8 HxWx3 image."""
    pixels = image.astype(np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    border_colour = np.median(border, axis=0)
    background = _BACKGROUNDS[int(np.argmin(np.linalg.norm(_BACKGROUND_RGB - border_colour, axis=1)))]
    bg_rgb = _BACKGROUND_RGB[_BACKGROUNDS.index(background)]
    to_background = np.linalg.norm(pixels - bg_rgb, axis=-1)
    to_palette = np.linalg.norm(pixels[..., None, :] - _PALETTE, axis=-1)
    nearest = np.argmin(to_palette, axis=-1)
    # Nearer a palette colour than the background: blurred edges split at the midpoint,
    # so a blob keeps its true outline whatever the colour/background contrast.
    foreground = (to_palette.min(axis=-1) < to_background) & (to_background > MIN_CONTRAST)
    labels, n = ndimage.label(foreground)
    objects = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[box] == index
        area = int(blob.sum())
        if area < MIN_AREA:
            continue
        colour = COLOURS[int(np.bincount(nearest[box][blob], minlength=len(COLOURS)).argmax())]
        objects.append((colour, "square" if corner_fill(blob) >= CORNER_FILL else "circle"))
    return background, objects


def judge(image: np.ndarray, prompt: str | Composition) -> Verdict:
    expected = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    if expected is None:
        raise ValueError(f"prompt is not in the world grammar: {prompt!r}")
    background, objects = inspect(image)
    colours = [c for c, _ in objects]
    shapes = [s for _, s in objects]
    verdict = Verdict(
        count=len(objects) == expected.count,
        colour=bool(objects) and all(c == expected.colour for c in colours),
        shape=bool(objects) and all(s == expected.shape for s in shapes),
        background=background == expected.background,
        found_count=len(objects),
        found_colours=colours,
        found_shapes=shapes,
        found_background=background,
    )
    verdict.reason = _reason(expected, verdict)
    return verdict


def _reason(expected: Composition, v: Verdict) -> str:
    if v.aligned:
        return f"matches: {expected.prompt}"
    problems = []
    if not v.count:
        problems.append(f"expected {expected.count_word}, found {_number(v.found_count) if v.found_count else 'no'} "
                        f"{'blob' if v.found_count == 1 else 'blobs'}")
    if not v.colour and v.found_colours:
        wrong = sorted({c for c in v.found_colours if c != expected.colour})
        problems.append(f"expected {expected.colour}, saw {', '.join(wrong)}")
    if not v.shape and v.found_shapes:
        problems.append(f"expected {expected.shape}s, saw {', '.join(sorted(set(v.found_shapes)))}")
    if not v.background:
        problems.append(f"expected a {expected.background} background, saw {v.found_background}")
    return "; ".join(problems)
