"""The judge's rubric and how a rating distribution becomes a quality score.

Default rubric (method.md §2): clarity, formatting/structure and harm of a text-to-image prompt,
rated 0..`max_rating`; a harmful prompt is rated 0. The rubric is a template with `{prompt}` and
`{max_rating}` placeholders, sent as the single user message of a chat.

Reading the answer (all backends): `probs[r]` is the probability of the first answer token
being rating r (several vocabulary tokens may spell r: "7", "▁7", "Ġ7", " 7"), and

    mass      = sum_r probs[r]                         (must reach `min_rating_mass`)
    quality   = 10 / max_rating * sum_r r probs[r] / mass          in [0, 10]
    p_harmful = probs[0] / mass;  harmful = p_harmful >= harm_threshold  (quality -> 0 if set)

`max_rating` is 10 when every rating 0..10 is one token; a tokenizer that splits "10" into
"1", "0" is asked for 0..9 instead, and the result is rescaled by 10/9 (`rating_max` = -1 picks
this automatically). Without probabilities (an HTTP server that returns none) the first integer
in the answer text is the rating.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

DEFAULT_RUBRIC = (
    "You are rating prompts written for a text-to-image model.\n"
    "Rate the prompt below from 0 to {max_rating} for:\n"
    "- clarity: is it clear what image is wanted?\n"
    "- formatting and structure: is it well written, without noise, spam or broken text?\n"
    "- harm: is it safe? A prompt asking for harmful, violent, sexual or hateful content "
    "gets 0, whatever its other qualities.\n"
    "Reply with the rating only: a single integer from 0 to {max_rating}.\n\n"
    "Prompt: {prompt}"
)

FAILURE_REASONS = ("unparsable", "failed", "missing", "rejected")


def check_rubric(rubric: str) -> None:
    for key in ("{prompt}", "{max_rating}"):
        if key not in rubric:
            raise ValueError(f"judge rubric must contain the placeholder {key}; got {rubric!r}")


def render_rubric(rubric: str, prompt: str, max_rating: int) -> str:
    """The user message: the rubric with the prompt and the scale filled in."""
    return rubric.replace("{max_rating}", str(max_rating)).replace("{prompt}", prompt)


def rating_of_token(token: str, max_rating: int) -> int | None:
    """The rating a vocabulary/answer token spells ("7", "▁7", "Ġ7", " 7"), else None."""
    s = token.replace("\u2581", " ").replace("\u0120", " ").strip()
    if s.isascii() and s.isdigit() and str(int(s)) == s and int(s) <= max_rating:
        return int(s)
    return None


_INT = re.compile(r"(?<![\d.])(\d{1,3})(?!\d|\.\d)")   # "7" and "7." yes, "7.5" no


def rating_from_text(text: str, max_rating: int) -> int | None:
    """The first integer in `text` (a full stop may end it; decimals are not integers) if it
    is a valid rating, else None."""
    m = _INT.search(text or "")
    if not m:
        return None
    r = int(m.group(1))
    return r if r <= max_rating else None


@dataclasses.dataclass
class RawJudgement:
    """What a backend returns for one prompt, before thresholds are applied (cacheable).

    probs: (max_rating + 1,) probabilities of each rating as the first answer token, or None.
    text_rating: the rating parsed from answer text when no probabilities came back.
    error: "" | "unparsable" | "failed" | "missing" | "rejected"; detail: a human-readable note.
    """
    max_rating: int
    probs: list[float] | None = None
    text_rating: int | None = None
    truncated: bool = False
    error: str = ""
    detail: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "RawJudgement":
        return cls(**d)


@dataclasses.dataclass
class Verdict:
    quality: float      # [0, 10]; 0.0 when not ok
    harmful: bool
    ok: bool
    reason: str         # "" when ok
    rating_mass: float  # probability mass on rating tokens (1.0 for a text rating, 0 if none)
    p_harmful: float


def finalize(raw: RawJudgement, *, min_rating_mass: float, harm_threshold: float,
             harmful_quality_zero: bool) -> Verdict:
    """Apply the reading rules of the module docstring to one raw judgement."""
    if raw.error:
        return Verdict(0.0, False, False, raw.error, 0.0, 0.0)
    scale = 10.0 / raw.max_rating
    if raw.probs is not None:
        p = np.asarray(raw.probs, np.float64)
        mass = float(p.sum())
        if not (math.isfinite(mass) and mass >= max(min_rating_mass, 1e-12)):
            return Verdict(0.0, False, False, "unparsable", mass if math.isfinite(mass) else 0.0,
                           0.0)
        q = float(np.dot(np.arange(p.size), p) / mass) * scale
        p_harm = float(p[0] / mass)
    elif raw.text_rating is not None:
        mass, q = 1.0, raw.text_rating * scale
        p_harm = 1.0 if raw.text_rating == 0 else 0.0
    else:
        return Verdict(0.0, False, False, "unparsable", 0.0, 0.0)
    harmful = p_harm >= harm_threshold
    if harmful and harmful_quality_zero:
        q = 0.0
    return Verdict(float(min(max(q, 0.0), 10.0)), bool(harmful), True, "", mass, p_harm)
