"""The bounds-vs-clipping comparison and the tightness measurement, on small real runs (their tables in RESULTS.md
come from the full runs: ``python -m benchmarks.bounds_vs_clipping``, ``python -m benchmarks.tightness``)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bounds_vs_clipping, tightness


def test_tightness_is_a_real_ratio_within_the_bound_for_every_parameter():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(24, 1, 8, 8, generator=generator)
    labels = torch.arange(24) % 3
    for kind, widths, input_norm_bound in (("cnn", (4,), 1.0), ("patch", (4,), 1.0), ("patch", (4,), 4.0)):
        # X0 = 4: inputs of norm ~4.6 reach the projection's sphere, the bounds scale with X0
        before, after = tightness.measure(kind, widths, input_norm_bound, images[:8], labels[:8], images, labels,
                                          steps=2, seed=0)
        assert (before["steps"], after["steps"]) == (0, 2)
        for row in (before, after):
            assert row["tightness"] and set(row["tightness"]) == set(row["layers"])
            # real per-sample gradients never exceed the certified bound (float error aside)
            assert all(0 < value <= 1 + 1e-5 for value in row["tightness"].values()), row["tightness"]
            assert 0 < row["whole"] <= 1 + 1e-5
    assert "median real / bound" in tightness.render([before, after], 8)


def test_tightness_under_a_logit_clip_shrinks_bound_and_gradients_together():
    """With loss_grad_clip C the engine's bounds shrink by C / sqrt(2) and the real gradients are clipped the same
    way: the ratio stays within 1, and the clipped bound is the unclipped one times C / sqrt(2)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(16, 1, 8, 8, generator=generator)
    labels = torch.arange(16) % 3
    (plain,) = tightness.measure("cnn", (4,), 1.0, images[:8], labels[:8], images, labels, steps=0, seed=0)
    (clipped,) = tightness.measure("cnn", (4,), 1.0, images[:8], labels[:8], images, labels, steps=0, seed=0,
                                   loss_grad_clip=0.1)
    assert clipped["total_bound"] == pytest.approx(plain["total_bound"] * 0.1 / 2 ** 0.5, rel=1e-5)
    assert all(0 < value <= 1 + 1e-5 for value in clipped["tightness"].values()), clipped["tightness"]
    assert clipped["whole"] > plain["whole"]  # a clip below the typical logit gradient tightens the bound
    assert "| cnn (4,), X0 = 1 | " in tightness.render([plain, clipped], 8)
    assert "| 0.1 | 0 |" in tightness.render([clipped], 8)


@pytest.mark.slow
def test_bounds_and_clipping_train_the_same_network_on_digits():
    runs = [bounds_vs_clipping.train_one("digits-mlp", 3.0, mechanism, clip, True, 0)
            for mechanism, clip in (("bounds", None), ("clipping", 1.0))]
    for run in runs:
        assert run["evaluated_on"] == "validation" and 0.3 < run["accuracy"] <= 1
        assert run["epsilon_spent"] == pytest.approx(3.0, rel=1e-3)
        assert run["step_seconds"] > 0 and run["peak_rss_bytes"] > 0
    assert runs[0]["noise_multiplier"] == runs[1]["noise_multiplier"]  # same sampling, steps and accountant
    assert runs[0]["steps"] == runs[1]["steps"]
    table = bounds_vs_clipping.render([{**run, "evaluated_on": "test"} for run in runs], runs[1:], {2}, [0.0])
    assert "| digits-mlp | mlp 64 | 30 x 256 | 3 |" in table
    assert "{" not in table and "0.2 validation split" in table  # every placeholder formatted
