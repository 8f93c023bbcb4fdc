"""Labeling interfaces for Label Studio, and strict validation of what comes back.

Three round kinds:

- ``binary`` (Lee et al.): one image and its prompt; good / bad; optional critique;
- ``pairwise`` (D3PO, Diffusion-DPO): two images of one prompt side by side;
  left / right / tie; optional critique;
- ``best_of_k`` (k ≤ 4): pick the best image; stored as k−1 pairs.

Label Studio stores any result an API client sends, whether or not it matches the
labeling config, so every result read back is validated here and rejected with a
reason instead of being stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RoundKind = Literal["binary", "pairwise", "best_of_k"]
IMAGE_KEYS = ("image_0", "image_1", "image_2", "image_3")
CRITIQUE = "critique"

_CRITIQUE_XML = (f'<TextArea name="{CRITIQUE}" toName="image_0" rows="2" maxSubmissions="1" '
                 'placeholder="What is wrong or right about it? (optional)"/>')


def choices_for(kind: RoundKind, k: int = 2) -> list[str]:
    if kind == "binary":
        return ["good", "bad"]
    if kind == "pairwise":
        return ["left", "right", "tie"]
    return [f"image {i + 1}" for i in range(k)]


def label_config(kind: RoundKind, k: int = 2) -> str:
    """The Label Studio XML for a round kind (each image in a flex: 1 view, full size)."""
    if kind == "binary":
        images = '<Image name="image_0" value="$image_0" maxWidth="384px" smoothing="false"/>'
        question = "Does the image match the prompt?"
    else:
        n = 2 if kind == "pairwise" else k
        if not 2 <= n <= len(IMAGE_KEYS):
            raise ValueError(f"best_of_k needs 2 ≤ k ≤ {len(IMAGE_KEYS)}, got {k}")
        titles = ["Left", "Right"] if kind == "pairwise" else [f"Image {i + 1}" for i in range(n)]
        images = "".join(f'<View style="flex: 1"><Header value="{title}"/>'
                         f'<Image name="image_{i}" value="$image_{i}" smoothing="false"/></View>'
                         for i, title in enumerate(titles))
        images = f'<View style="display: flex; gap: 8px">{images}</View>'
        question = "Which image matches the prompt better?" if kind == "pairwise" else "Which image matches best?"
    choices = "".join(f'<Choice value="{c}"/>' for c in choices_for(kind, k))
    return (f'<View><Header value="$prompt" name="prompt"/>{images}<Header value="{question}"/>'
            f'<Choices name="choice" toName="image_0" choice="single" showInline="true" required="true">{choices}</Choices>'
            f'{_CRITIQUE_XML}</View>')


@dataclass(frozen=True)
class ParsedResult:
    choice: str
    critique: str


class InvalidResult(ValueError):
    """A result that does not match the round's labeling config."""


def parse_result(kind: RoundKind, result: list, k: int = 2) -> ParsedResult:
    """The choice and critique of one annotation's result; InvalidResult says what is wrong."""
    if not isinstance(result, list):
        raise InvalidResult(f"result must be a list of regions, got {type(result).__name__}")
    allowed = choices_for(kind, k)
    choice, critique = None, ""
    for region in result:
        if not isinstance(region, dict):
            raise InvalidResult("result region is not an object")
        name, rtype, value = region.get("from_name"), region.get("type"), region.get("value")
        if not isinstance(value, dict):
            raise InvalidResult(f"region {name!r} has no value object")
        if name == "choice" and rtype == "choices":
            picked = value.get("choices")
            if not isinstance(picked, list) or len(picked) != 1:
                raise InvalidResult(f"choice must hold exactly one of {allowed}, got {picked!r}")
            if picked[0] not in allowed:
                raise InvalidResult(f"unknown choice {picked[0]!r} (expected one of {allowed})")
            if choice is not None:
                raise InvalidResult("more than one choice region")
            choice = picked[0]
        elif name == CRITIQUE and rtype == "textarea":
            text = value.get("text")
            if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
                raise InvalidResult(f"critique must be a list of strings, got {text!r}")
            critique = " ".join(t.strip() for t in text).strip()
        else:
            raise InvalidResult(f"unexpected region {name!r} of type {rtype!r}")
    if choice is None:
        raise InvalidResult("missing the required choice")
    return ParsedResult(choice=choice, critique=critique)


def make_result(kind: RoundKind, choice: str, critique: str = "", k: int = 2) -> list[dict]:
    """A result as the Label Studio UI would submit it (used by the simulated annotators)."""
    if choice not in choices_for(kind, k):
        raise ValueError(f"unknown choice {choice!r} for {kind}")
    result = [{"from_name": "choice", "to_name": "image_0", "type": "choices", "value": {"choices": [choice]}}]
    if critique:
        result.append({"from_name": CRITIQUE, "to_name": "image_0", "type": "textarea", "value": {"text": [critique]}})
    return result
