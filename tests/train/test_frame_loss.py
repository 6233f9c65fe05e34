"""The DFT-frame loss: each frame's topology is built once and reused, with the same terms and gradients."""

from __future__ import annotations

import torch

from relaxtune.data import load_pairs
from relaxtune.potentials import load_model
from relaxtune.train.config import TrainConfig
from relaxtune.train.frame_loss import FrameLoss


def test_frame_terms_from_kept_topologies_equal_a_fresh_prepare():
    pair = next(p for p in load_pairs("builtin:si-defects-mini") if p.split == "train")
    model = load_model("chgnet", dtype=torch.float64)
    loss = FrameLoss(TrainConfig(), model, torch.float64, torch.device("cpu"), {id(pair): 0})
    frames = loss.frames(pair)
    ref = frames[-1]
    prepares = []
    original = model.prepare_parts
    model.prepare_parts = lambda batch: prepares.append(batch.n_systems) or original(batch)
    first = loss.terms(ref, [frames[0], ref])
    again = loss.terms(ref, [frames[1], frames[0], ref])  # only frames[1] is new
    assert prepares == [2, 1]
    model.prepare_parts = original
    loss._parts.clear()
    expected = loss.terms(ref, [frames[1], frames[0], ref])
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first, expected[1:], rtol=1e-12, atol=1e-12)
    assert bool((expected > 0).all())
    params = [p for p in model.parameters() if p.requires_grad]
    g_kept = torch.autograd.grad(loss.terms(ref, [frames[1], ref]).sum(), params, allow_unused=True)
    loss._parts.clear()
    g_fresh = torch.autograd.grad(loss.terms(ref, [frames[1], ref]).sum(), params, allow_unused=True)
    for a, b in zip(g_kept, g_fresh):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
