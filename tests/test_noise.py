"""Noise allocation: every strategy is one Gaussian mechanism with sigma_eff = sigma (docs/design.md §1)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipdp.noise import effective_noise_multiplier, noise_energy, noise_stds

groups = st.dictionaries(
    st.text(alphabet="abcdefgh", min_size=1, max_size=4),
    st.tuples(st.floats(0.01, 100.0), st.integers(1, 100_000)),
    min_size=1, max_size=12,
)


@settings(max_examples=100, deadline=None)
@given(groups, st.floats(0.1, 10.0), st.sampled_from(["global", "per_layer", "min_energy"]))
def test_every_strategy_has_effective_multiplier_sigma(groups, sigma, strategy):
    deltas = {name: d for name, (d, _) in groups.items()}
    sizes = {name: n for name, (_, n) in groups.items()}
    stds = noise_stds(deltas, sizes, sigma, strategy)
    assert effective_noise_multiplier(deltas, stds) == pytest.approx(sigma, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(groups, st.floats(0.1, 10.0))
def test_min_energy_never_spends_more_noise_energy_than_global(groups, sigma):
    deltas = {name: d for name, (d, _) in groups.items()}
    sizes = {name: n for name, (_, n) in groups.items()}
    best = noise_energy(noise_stds(deltas, sizes, sigma, "min_energy"), sizes)
    assert best <= noise_energy(noise_stds(deltas, sizes, sigma, "global"), sizes) * (1 + 1e-9)
    assert best <= noise_energy(noise_stds(deltas, sizes, sigma, "per_layer"), sizes) * (1 + 1e-9)
    # closed form: sigma^2 (sum_d Delta_d sqrt(n_d))^2
    assert best == pytest.approx(sigma**2 * sum(d * math.sqrt(sizes[k]) for k, d in deltas.items()) ** 2)


def test_per_layer_is_not_accounted_as_separate_mechanisms():
    deltas, sizes = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 0.5}, {"a": 10, "b": 10, "c": 10, "d": 10}
    stds = noise_stds(deltas, sizes, 1.5, "per_layer")
    assert stds["a"] == pytest.approx(1.5 * 2 * 1.0)  # sigma * sqrt(D) * Delta, D = 4
    assert effective_noise_multiplier(deltas, stds) == pytest.approx(1.5)


def test_min_energy_matches_global_when_sensitivity_proportional_to_sqrt_size():
    sizes = {"a": 4, "b": 100}
    deltas = {k: 0.3 * math.sqrt(n) for k, n in sizes.items()}
    energy = {s: noise_energy(noise_stds(deltas, sizes, 1.0, s), sizes) for s in ("global", "min_energy")}
    assert energy["min_energy"] == pytest.approx(energy["global"])


def test_bad_strategy_and_sigma_are_refused():
    with pytest.raises(ValueError, match="noise_strategy"):
        noise_stds({"a": 1.0}, {"a": 1}, 1.0, "uniform")
    with pytest.raises(ValueError, match="noise_multiplier"):
        noise_stds({"a": 1.0}, {"a": 1}, 0.0, "global")
