"""Privacy audit (lipdp.audit): the one-run bound is sound, and it has power against an under-noised engine."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats

from lipdp.audit import (
    epsilon_from_scores,
    gradient_canary_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from lipdp.cli import main


def test_p_value_without_delta_is_the_binomial_tail_of_randomised_response():
    p = math.exp(1.0) / (1 + math.exp(1.0))
    assert one_run_p_value(1000, 100, 80, 1.0, 0.0) == pytest.approx(scipy.stats.binom.sf(79, 100, p))
    assert one_run_p_value(1000, 100, 80, 1.0, 1e-5) > one_run_p_value(1000, 100, 80, 1.0, 0.0)
    values = [one_run_p_value(1000, 100, 80, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)


def test_all_correct_guesses_give_the_closed_form_bound():
    # delta = 0, v = r: p-value = p(eps)^r, so eps_lower = logit(alpha^(1/r)).
    r, alpha = 100, 0.05
    expected = math.log(alpha ** (1 / r) / (1 - alpha ** (1 / r)))
    assert one_run_epsilon_lower_bound(1000, r, r, 0.0, alpha) == pytest.approx(expected, abs=1e-5)
    assert one_run_epsilon_lower_bound(1000, r, r // 2, 0.0, alpha) == 0.0  # chance level refutes nothing


def test_bound_is_sound_on_randomised_response_of_known_epsilon():
    """An eps0-DP mechanism (randomised response on each canary's membership): the audited lower bound must
    exceed eps0 in at most ~5% of runs."""
    eps0, canaries, runs = 1.0, 1000, 40
    rng = np.random.default_rng(0)
    exceed = 0
    for _ in range(runs):
        included = rng.random(canaries) < 0.5
        truthful = rng.random(canaries) < math.exp(eps0) / (1 + math.exp(eps0))
        scores = np.where(truthful, included, ~included) + 0.1 * rng.random(canaries)  # random tie-break
        lower, _, _ = epsilon_from_scores(scores, included, delta=0.0, confidence=0.95)
        exceed += lower > eps0
    assert exceed <= 5  # expected <= 2 of 40 at 95% confidence; the bound is also Bonferroni-corrected


def test_bad_audit_arguments_are_refused():
    with pytest.raises(ValueError, match="correct <= guesses"):
        one_run_p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(ValueError, match="batch_size"):
        gradient_canary_audit(canaries=10, batch_size=20)
    with pytest.raises(ValueError, match="noise_scale"):
        gradient_canary_audit(noise_scale=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        epsilon_from_scores(np.array([0.0, np.nan]), np.array([True, False]), 1e-5)


def test_audit_of_the_real_engine_stays_below_the_claim():
    result = gradient_canary_audit(canaries=1000, batch_size=100, steps=50, noise_multiplier=1.5, seed=0)
    assert result.steps == 50 and result.sample_rate == 0.1
    assert 0 < result.epsilon_lower < result.claimed_epsilon
    assert not result.violation


def test_audit_flags_an_under_noised_engine():
    """The test-only switch multiplies the engine's noise by 0.1: the claim (same sigma on paper) is false."""
    result = gradient_canary_audit(canaries=1000, batch_size=100, steps=50, noise_multiplier=1.5, seed=0,
                                   noise_scale=0.1)
    assert result.violation
    assert result.epsilon_lower > 1.2 * result.claimed_epsilon


def test_cli_audit_exit_status_reports_the_violation(tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["audit", "--canaries", "400", "--batch-size", "40", "--steps", "30", "--noise-multiplier", "2",
                 "--noise-scale", "0.1", "--json", str(out)]) == 1
    assert "VIOLATION" in capsys.readouterr().out
    assert json.loads(out.read_text())["violation"] is True
