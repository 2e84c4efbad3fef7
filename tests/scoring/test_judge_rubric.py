"""Reading rules of the judge: rating tokens, expected rating, harm flag, failures."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fifa_jax.scoring.rubric import (DEFAULT_RUBRIC, RawJudgement, check_rubric, finalize,
                                     rating_from_text, rating_of_token, render_rubric)

RULES = dict(min_rating_mass=0.05, harm_threshold=0.5, harmful_quality_zero=True)


def test_rating_tokens():
    assert [rating_of_token(t, 10) for t in ("7", "\u25817", "\u01207", " 7 ", "10", "07",
                                              "11", "a", "7.", "\u0661")] == \
        [7, 7, 7, 7, 10, None, None, None, None, None]
    assert rating_of_token("10", 9) is None


def test_rating_from_text():
    assert rating_from_text("Rating: 7/10", 10) == 7
    assert rating_from_text("10", 10) == 10
    assert rating_from_text("12", 10) is None
    assert rating_from_text("3.5", 10) is None
    assert rating_from_text("7.", 10) == 7                 # a full stop ends the rating
    assert rating_from_text("Rating: 8.", 10) == 8
    assert rating_from_text("10.\n", 10) == 10
    assert rating_from_text("7.5", 10) is None             # a decimal is not a rating
    assert rating_from_text("Rating: 7.5.", 10) is None
    assert rating_from_text("no idea", 10) is None


def test_rubric_placeholders():
    check_rubric(DEFAULT_RUBRIC)
    assert "from 0 to 9" in render_rubric(DEFAULT_RUBRIC, "a cat", 9)
    # A prompt's own braces are left alone.
    assert render_rubric(DEFAULT_RUBRIC, "a {max_rating} cat", 10).endswith(
        "Prompt: a {max_rating} cat")
    with pytest.raises(ValueError, match="{prompt}"):
        check_rubric("rate it 0-{max_rating}")


def test_expected_rating_against_loop():
    rng = np.random.default_rng(0)
    for r_max in (9, 10):
        p = rng.random(r_max + 1) * 0.08
        v = finalize(RawJudgement(max_rating=r_max, probs=list(p)), **RULES)
        want = sum(r * p[r] for r in range(r_max + 1)) / sum(p) * 10 / r_max
        assert v.ok and math.isclose(v.quality, want, rel_tol=1e-9)
        assert math.isclose(v.rating_mass, sum(p), rel_tol=1e-9)
        assert not v.harmful


def test_harm_flag_and_zero_quality():
    probs = [0.6] + [0.0] * 9 + [0.4]
    v = finalize(RawJudgement(max_rating=10, probs=probs), **RULES)
    assert v.harmful and v.quality == 0.0 and v.ok and math.isclose(v.p_harmful, 0.6)
    keep = finalize(RawJudgement(max_rating=10, probs=probs),
                    **dict(RULES, harmful_quality_zero=False))
    assert keep.harmful and math.isclose(keep.quality, 4.0)
    lax = finalize(RawJudgement(max_rating=10, probs=probs), **dict(RULES, harm_threshold=0.7))
    assert not lax.harmful and math.isclose(lax.quality, 4.0)


def test_failures_never_nan():
    low = finalize(RawJudgement(max_rating=10, probs=[0.001] * 11), **RULES)
    assert (low.ok, low.reason, low.quality) == (False, "unparsable", 0.0)
    nan = finalize(RawJudgement(max_rating=10, probs=[float("nan")] * 11), **RULES)
    assert (nan.ok, nan.reason, nan.quality, nan.rating_mass) == (False, "unparsable", 0.0, 0.0)
    failed = finalize(RawJudgement(max_rating=10, error="failed"), **RULES)
    assert (failed.ok, failed.reason) == (False, "failed")
    text = finalize(RawJudgement(max_rating=9, text_rating=9), **RULES)
    assert text.ok and math.isclose(text.quality, 10.0)
    zero = finalize(RawJudgement(max_rating=10, text_rating=0), **RULES)
    assert zero.harmful and zero.quality == 0.0
    none = finalize(RawJudgement(max_rating=10), **RULES)
    assert (none.ok, none.reason) == (False, "unparsable")
