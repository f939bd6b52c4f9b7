"""Float tolerances for comparisons whose two sides are computed along different paths (batched or
alone, cached or not, one search or another, mt or another engine), so their rounding depends on the
order in which a CPU's kernels sum: other GEMM blocking under AVX2, AVX-512 or AMX, other thread counts.

A search score is a sum of token log-probabilities (or that sum over a length penalty). Each term
carries a rounding error of a few ulps of the logits it came from, so two paths agree to a relative
error of the sum plus an absolute floor per token: ``score_close``. Outputs that are equal by
construction (the same numbers on the same path) are compared exactly where they are compared at all.
"""

from __future__ import annotations

import pytest

SCORE_REL = 1e-5  # of the score itself: 2e-7 relative has been seen between CPUs (AVX2 vs AMX)
SCORE_ABS_PER_TOKEN = 1e-5  # ~100 ulps of a logit of 10, per summed term


def score_slack(score: float, length: int) -> float:
    """How far two paths' values of a ``length``-token score may differ."""
    return SCORE_REL * abs(score) + SCORE_ABS_PER_TOKEN * length


def score_close(expected: float, length: int):
    """``actual == score_close(expected, length)``: equal up to ``score_slack``."""
    return pytest.approx(expected, rel=0, abs=score_slack(expected, length))
