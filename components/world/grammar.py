"""The synthetic world's fixed vocabulary and prompt grammar (after Lee et al. 2023).

The vocabulary never changes, so prompts and scores stay comparable across model
versions: counts one–four, four colours, two shapes, three backgrounds = 96
compositions, each with exactly one canonical prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from itertools import product

COUNTS = ("one", "two", "three", "four")
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square")
BACKGROUNDS = ("white", "black", "gray")
ATTRIBUTES = ("count", "colour", "shape", "background")

PALETTE = {"red": (230, 25, 25), "green": (25, 200, 25), "blue": (30, 60, 230), "yellow": (240, 220, 20)}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}

_PROMPT_RE = re.compile(
    rf"^(?P<count>{'|'.join(COUNTS)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})s? "
    rf"on an? (?P<background>{'|'.join(BACKGROUNDS)}) background$"
)


@dataclass(frozen=True, order=True)
class Composition:
    count: int  # 1..4
    colour: str
    shape: str
    background: str

    @property
    def count_word(self) -> str:
        return COUNTS[self.count - 1]

    @property
    def prompt(self) -> str:
        noun = self.shape if self.count == 1 else f"{self.shape}s"
        return f"{self.count_word} {self.colour} {noun} on a {self.background} background"

    def value(self, attribute: str) -> str:
        return self.count_word if attribute == "count" else getattr(self, attribute)

    def with_value(self, attribute: str, word: str) -> Composition:
        if attribute == "count":
            return replace(self, count=COUNTS.index(word) + 1)
        return replace(self, **{attribute: word})

    def perturbations(self) -> list[Composition]:
        """Every composition that differs from this one in exactly one attribute."""
        out = []
        for attribute, words in zip(ATTRIBUTES, (COUNTS, COLOURS, SHAPES, BACKGROUNDS)):
            out += [self.with_value(attribute, w) for w in words if w != self.value(attribute)]
        return out


def all_compositions() -> list[Composition]:
    return [Composition(COUNTS.index(n) + 1, c, s, b) for n, c, s, b in product(COUNTS, COLOURS, SHAPES, BACKGROUNDS)]


def parse_prompt(text: str) -> Composition | None:
    """The composition a prompt describes, or None if it is not in the world grammar."""
    match = _PROMPT_RE.match(" ".join(text.lower().split()))
    if not match:
        return None
    return Composition(COUNTS.index(match["count"]) + 1, match["colour"], match["shape"], match["background"])


def vocabulary() -> list[str]:
    """Every word a world prompt can contain (plus plurals), in a fixed order."""
    words = [*COUNTS, *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *BACKGROUNDS, "on", "a", "background"]
    return list(dict.fromkeys(words))
