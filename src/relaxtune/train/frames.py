"""The few DFT frames of a relaxation pair (``relaxtune.data.pairs.dft_frames``) one optimizer step fits.

Fitting every frame of every structure at every step (a double backward each) dominates the cost of the
``structure+forces`` objective. ``sample_frames`` picks the relaxed frame plus one frame per equal stratum of the
rest of the path, with weights that make the weighted sum an unbiased estimate of the mean over all frames: the
same objective in expectation, a noisier gradient, a fraction of the cost.
"""

from __future__ import annotations

import numpy as np


def sample_frames(n_frames: int, k: int, rng: np.random.Generator) -> list[tuple[int, float]]:
    """(frame index, weight) pairs, weights summing to 1: every frame at weight 1/n when ``k`` is 0 or
    covers them all; else the last (relaxed) frame at 1/n and one frame drawn uniformly from each of k - 1
    equal strata of the others, at (stratum size)/n, so that E[Σ w·term] is the mean term over all frames."""
    if n_frames <= 0:
        return []
    if k <= 0 or k >= n_frames:
        return [(i, 1.0 / n_frames) for i in range(n_frames)]
    if k == 1:
        return [(n_frames - 1, 1.0)]  # the relaxed frame alone (no longer an estimate of the mean)
    strata = np.array_split(np.arange(n_frames - 1), k - 1)
    picks = [(int(rng.choice(s)), len(s) / n_frames) for s in strata if len(s)]
    return picks + [(n_frames - 1, 1.0 / n_frames)]


def frame_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one structure's frame draw in one epoch: independent of batching and of the global
    RNG, so a resumed run draws the same frames."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])
