"""Frame sampling of the structure+forces objective: the relaxed frame always, one frame per stratum, unbiased."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from relaxtune.train.frames import frame_rng, sample_frames


@pytest.mark.parametrize("n_frames,k", [(30, 4), (23, 4), (7, 3), (5, 2)])
def test_a_draw_holds_the_relaxed_frame_and_one_frame_per_stratum(n_frames, k):
    picks = sample_frames(n_frames, k, np.random.default_rng(0))
    indices = [i for i, _ in picks]
    assert len(picks) == k and indices[-1] == n_frames - 1
    assert sum(w for _, w in picks) == pytest.approx(1.0)
    strata = np.array_split(np.arange(n_frames - 1), k - 1)
    assert all(i in s for i, s in zip(indices[:-1], strata))


def test_the_weighted_draw_is_an_unbiased_estimate_of_the_mean_over_all_frames():
    """Enumerate every possible draw (one frame per stratum, uniform): the expectation of Σ w·term is the mean."""
    n_frames, k = 11, 4
    terms = np.random.default_rng(1).random(n_frames) * 10
    strata = np.array_split(np.arange(n_frames - 1), k - 1)
    expectation = 0.0
    for combo in itertools.product(*strata):
        probability = np.prod([1.0 / len(s) for s in strata])
        weights = [len(s) / n_frames for s in strata] + [1.0 / n_frames]
        expectation += probability * float(np.dot(weights, terms[list(combo) + [n_frames - 1]]))
    assert expectation == pytest.approx(terms.mean(), rel=1e-12)
    # and the function draws from that distribution: its weights are those weights
    picks = sample_frames(n_frames, k, np.random.default_rng(2))
    assert [w for _, w in picks] == pytest.approx([len(s) / n_frames for s in strata] + [1.0 / n_frames])


def test_zero_or_enough_frames_means_every_frame_at_equal_weight():
    for k in (0, 9, 12):
        assert sample_frames(9, k, np.random.default_rng(0)) == [(i, 1.0 / 9) for i in range(9)]
    assert sample_frames(9, 1, np.random.default_rng(0)) == [(8, 1.0)]
    assert sample_frames(0, 4, np.random.default_rng(0)) == []


def test_a_resumed_run_draws_the_same_frames():
    a = sample_frames(40, 4, frame_rng(3, 7, 5))
    b = sample_frames(40, 4, frame_rng(3, 7, 5))
    c = sample_frames(40, 4, frame_rng(3, 8, 5))
    assert a == b
    assert a != c or sample_frames(40, 4, frame_rng(3, 9, 5)) != a  # another epoch draws anew
