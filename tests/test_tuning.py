"""Private hyper-parameter tuning: the accountant against Papernot & Steinke's closed forms and dp_accounting, the
trial-count distributions, the search space's errors, and the search end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from accounting.history import HistoryEntry
from accounting.tuning import (ORDERS, PoissonTrials, TruncatedNegativeBinomial, calibrate_trial_noise,
                               delta_from_rdp, epsilon_from_rdp, naive_epsilon, scaled_schedules, schedule_rdp,
                               score_noise_multiplier, single_trial_epsilon, trial_count, trial_rdp, tuned_epsilon)
from tests.test_cli import assert_one_line_user_error, run_in_process

DELTA = 1e-5
DIGITS_LIKE = HistoryEntry(4.0, 256 / 1150, 120)
FASHION_LIKE = HistoryEntry(3.0, 4096 / 54000, 520)


# -- the accountant ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", [DIGITS_LIKE, FASHION_LIKE, HistoryEntry(0.8, 0.01, 3000)])
def test_the_score_noise_keeps_its_rdp_under_the_trial_s_at_every_order(entry):
    """The Gaussian score (sensitivity 1) at sigma_s has RDP lambda / (2 sigma_s^2) <= the training's at every order,
    with equality at one: a 1% smaller sigma_s would exceed it (the score would then cost epsilon)."""
    sigma = score_noise_multiplier(entry)
    orders, training = np.asarray(ORDERS), schedule_rdp(entry)
    assert np.all(orders / (2 * sigma ** 2) <= training * (1 + 1e-12))
    assert np.any(orders / (2 * (0.99 * sigma) ** 2) > training)

def test_geometric_case_matches_theorem_2_in_closed_form():
    """η = 1, Q the Gaussian mechanism with ε(λ) = ρλ: Theorem 2's min over λ̂ of (1 − 1/λ̂)ρλ̂ + log(1/γ)/λ̂ is
    2√(ρ·log(1/γ)) − ρ (at λ̂ = √(log(1/γ)/ρ)), so ε'(λ) = ρλ + 2(2√(ρ log(1/γ)) − ρ) + log(1/γ)/(λ − 1), E[K] = 1/γ."""
    rho, mean = 0.01, 10.0
    orders = np.round(np.arange(1.01, 300, 0.01), 2)
    count = TruncatedNegativeBinomial.with_mean(mean, shape=1.0)
    assert count.gamma == pytest.approx(1 / mean)
    log_inv_gamma = math.log(mean)
    assert 1 < math.sqrt(log_inv_gamma / rho) < 300
    closed = rho * orders + 2 * (2 * math.sqrt(rho * log_inv_gamma) - rho) + log_inv_gamma / (orders - 1)
    closed = np.array([closed[i:].min() for i in range(len(closed))])  # RDP is non-decreasing in λ
    np.testing.assert_allclose(count.selection_rdp(orders, rho * orders), closed, rtol=1e-6, atol=1e-7)


def test_logarithmic_and_negative_shapes_follow_theorem_2_term_by_term():
    """For any η the added cost at order λ is (1+η)·min_λ̂[...] + log E[K]/(λ−1) (computed here by brute force)."""
    rho = 0.02
    orders = np.arange(1.5, 200, 0.5)
    for shape in (-0.5, 0.0, 0.5, 2.0):
        count = TruncatedNegativeBinomial.with_mean(6.0, shape)
        hat = min((1 - 1 / h) * rho * h + math.log(1 / count.gamma) / h for h in orders)
        raw = [rho * a + (1 + shape) * hat + math.log(6.0) / (a - 1) for a in orders]
        expected = [min(raw[i:]) for i in range(len(raw))]
        np.testing.assert_allclose(count.selection_rdp(orders, rho * orders), expected, rtol=1e-9)


@pytest.mark.parametrize("shape", [0.0, 0.5, 1.0, 2.0, math.inf])
def test_tuned_epsilon_matches_dp_accounting_repeat_and_select(shape):
    """dp_accounting implements Theorems 2 and 6 independently (its own subsampled-Gaussian RDP, γ and δ̂). On
    integer orders: there both compute the subsampled Gaussian exactly (at fractional orders and large q,
    dp_accounting 0.6 falls back to a looser bound that is not even monotone in λ)."""
    orders = [order for order in ORDERS if order == int(order)]
    dp_event = pytest.importorskip("dp_accounting.dp_event")
    rdp_accountant = pytest.importorskip("dp_accounting.rdp.rdp_privacy_accountant")
    mean, entry = 5.0, DIGITS_LIKE
    count = PoissonTrials(mean) if shape == math.inf else TruncatedNegativeBinomial.with_mean(mean, shape)
    event = dp_event.RepeatAndSelectDpEvent(
        dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(entry.sample_rate,
                                                                      dp_event.GaussianDpEvent(entry.noise_multiplier)),
                                     entry.steps), mean, shape)
    accountant = rdp_accountant.RdpAccountant(orders=orders)
    accountant.compose(event)
    assert tuned_epsilon([entry], count, DELTA, orders=orders) == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-6)


def test_conversions_match_opacus():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    curve = compute_rdp(q=0.01, noise_multiplier=1.1, steps=1000, orders=list(ORDERS))
    assert epsilon_from_rdp(ORDERS, curve, DELTA) == pytest.approx(get_privacy_spent(orders=list(ORDERS), rdp=curve,
                                                                                     delta=DELTA)[0], rel=1e-12)
    epsilon = epsilon_from_rdp(ORDERS, curve, DELTA)
    assert delta_from_rdp(ORDERS, curve, epsilon) == pytest.approx(DELTA, rel=1e-6)


@pytest.mark.parametrize("entry", [DIGITS_LIKE, FASHION_LIKE])
@pytest.mark.parametrize("count", [TruncatedNegativeBinomial.with_mean(3, 1.0), TruncatedNegativeBinomial.with_mean(10, 0.0),
                                   TruncatedNegativeBinomial.with_mean(30, 1.0), PoissonTrials(3), PoissonTrials(30)],
                         ids=lambda c: f"{c.name}-{c.mean:g}")
def test_the_search_costs_more_than_one_trial_and_less_than_composing_its_mean(entry, count):
    one = single_trial_epsilon([entry], DELTA)
    total = tuned_epsilon([entry], count, DELTA)
    naive = naive_epsilon([entry] * math.ceil(count.mean), DELTA)
    assert one < total < naive


def test_more_trials_cost_more_and_spent_mechanisms_are_added():
    costs = [tuned_epsilon([DIGITS_LIKE], TruncatedNegativeBinomial.with_mean(m, 0.0), DELTA) for m in (2, 4, 8, 16)]
    assert costs == sorted(costs) and costs[0] < costs[-1]
    mean_release = HistoryEntry(10.0, 1.0, 1)
    count = TruncatedNegativeBinomial.with_mean(4, 0.0)
    assert tuned_epsilon([DIGITS_LIKE], count, DELTA, spent=[mean_release]) > tuned_epsilon([DIGITS_LIKE], count, DELTA)


def test_a_random_schedule_is_accounted_as_its_worst_case():
    schedules = [HistoryEntry(4.0, 0.2, 60), HistoryEntry(3.0, 0.1, 200)]
    curves = [trial_rdp([entry]) for entry in schedules]
    np.testing.assert_array_equal(trial_rdp(schedules), np.maximum(*curves))


def test_calibration_meets_the_target_and_is_tight():
    schedules = [(256 / 1150, 60), (512 / 1150, 60), (256 / 1150, 120)]
    count = TruncatedNegativeBinomial.with_mean(4, 0.0)
    entries = calibrate_trial_noise(3.0, DELTA, schedules, count, rtol=1e-3)
    assert [(e.sample_rate, e.steps) for e in entries] == schedules
    assert tuned_epsilon(entries, count, DELTA) <= 3.0
    sigma = max(e.noise_multiplier for e in entries)
    assert tuned_epsilon(scaled_schedules(sigma / 1.001, schedules), count, DELTA) > 3.0
    # q·√T scaling: the costliest schedule (twice the batch, same steps) carries σ, the others proportionally less
    assert entries[1].noise_multiplier == sigma
    assert entries[0].noise_multiplier == pytest.approx(sigma / 2)
    assert entries[2].noise_multiplier == pytest.approx(sigma / math.sqrt(2))


def test_an_unreachable_target_says_what_to_change():
    with pytest.raises(ValueError, match="Fix: raise the target"):
        calibrate_trial_noise(1e-4, DELTA, [(0.5, 10_000)], TruncatedNegativeBinomial.with_mean(50, 1.0))


# -- the trial-count distributions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [TruncatedNegativeBinomial.with_mean(4, 1.0), TruncatedNegativeBinomial.with_mean(4, 0.0),
                                   TruncatedNegativeBinomial.with_mean(4, -0.5), TruncatedNegativeBinomial.with_mean(4, 3.0),
                                   PoissonTrials(4.0)], ids=lambda c: f"{c.name}-{c.to_dict().get('shape', '')}")
def test_trial_counts_are_drawn_from_the_declared_distribution(count):
    """Mean and variance in closed form against the pmf summed (light tails; the η < 0 tail is summed further in
    the next test), and against 40,000 draws: the mean within 5 standard errors, P[K = 1, 2, 3] within 5."""
    heavy = isinstance(count, TruncatedNegativeBinomial) and count.shape < 0
    assert count.mean == pytest.approx(4.0, rel=1e-9)
    if not heavy:
        ks = np.arange(400)
        pmf = np.array([count.pmf(int(k)) for k in ks])
        assert pmf.sum() == pytest.approx(1.0, abs=1e-9)
        assert (ks * pmf).sum() == pytest.approx(count.mean, rel=1e-9)
        assert (ks ** 2 * pmf).sum() - count.mean ** 2 == pytest.approx(count.variance, rel=1e-9)
    rng = np.random.default_rng(1)
    draws = np.array([count.sample(rng) for _ in range(40_000)])
    assert abs(draws.mean() - count.mean) < 5 * math.sqrt(count.variance / len(draws))
    if not heavy:  # the sample variance of a heavy tail converges too slowly to test
        assert draws.var() == pytest.approx(count.variance, rel=0.1)
    for k in (1, 2, 3):
        p = count.pmf(k)
        assert abs((draws == k).mean() - p) < 5 * math.sqrt(p * (1 - p) / len(draws))


def test_heavy_tailed_shape_moments_against_a_long_sum():
    count = TruncatedNegativeBinomial.with_mean(4, -0.5)
    p, total, first, second = count.pmf(1), 0.0, 0.0, 0.0
    for k in range(1, 2_000_000):
        total, first, second = total + p, first + k * p, second + k * k * p
        p *= (1 - count.gamma) * (k + count.shape) / (k + 1)
    assert total == pytest.approx(1.0, abs=1e-9)
    assert first == pytest.approx(count.mean, rel=1e-6)
    assert second - first ** 2 == pytest.approx(count.variance, rel=1e-3)


def test_bad_distributions_say_how_to_fix_them():
    for call in (lambda: TruncatedNegativeBinomial.with_mean(1.0), lambda: TruncatedNegativeBinomial(-1.0, 0.5),
                 lambda: TruncatedNegativeBinomial(1.0, 1.0), lambda: trial_count("uniform", 4.0),
                 lambda: PoissonTrials(0.0)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="Fix: ask for a mean above 1"):
        trial_count("negative_binomial", 0.5)


# -- the search space and the search ---------------------------------------------------------------------------------

def _space(**changes):
    from lipdp.tuning import SearchSpace

    values = dict(learning_rate=(0.05,), temperature=(8.0,), loss_grad_clip=(None, 0.5), epochs=(1,), batch_size=(256,))
    return SearchSpace(**{**values, **changes})


@pytest.mark.parametrize("changes, words", [
    (dict(learning_rate=()), "non-empty"), (dict(learning_rate=(-0.1,)), "finite numbers > 0"),
    (dict(epochs=(2.5,)), "whole numbers"), (dict(batch_size=(0,)), "whole numbers"),
    (dict(temperature=(1.0, 1.0)), "repeats"), (dict(loss_grad_clip=(math.nan,)), "finite"),
    (dict(learning_rate=0.1), "list of choices"),
])
def test_bad_search_spaces_raise_a_clear_error_with_a_fix(changes, words):
    with pytest.raises(ValueError, match=f"{words}.*Fix: "):
        _space(**changes)


def test_the_default_space_is_centred_on_the_preset():
    from lipdp.presets import train_preset
    from lipdp.tuning import SearchSpace

    preset = train_preset("digits")
    space = SearchSpace.around(preset)
    for name in ("learning_rate", "temperature", "epochs", "batch_size"):
        assert preset[name] in getattr(space, name)
    assert len(space.schedules()) == len(space.epochs) * len(space.batch_size)


def test_the_search_releases_its_best_trial_within_the_budget():
    from lipdp.datasets import load_dataset
    from lipdp.models import orthogonal_mlp
    from lipdp.tuning import tune

    splits = load_dataset("digits")
    count = TruncatedNegativeBinomial.with_mean(2.0, 1.0)
    result = tune(lambda: orthogonal_mlp(64, 10, hidden=(16,)), splits.train, _space(batch_size=(256, 512)), 3.0,
                  DELTA, count, seed=3, progress=False)
    assert len(result.trials) >= 1 and result.model is not None
    assert result.epsilon <= 3.0
    assert result.trial_epsilon < result.epsilon
    best = max(result.trials, key=lambda t: (t.validation_accuracy, -t.index))
    assert result.best == best
    for trial in result.trials:  # each trial ran at no less noise than the accounting assumed, on its schedule
        key = f"{trial.settings['epochs']} epochs x batch {trial.settings['batch_size']}"
        assert trial.noise_multiplier >= result.planned_noise[key]
    record = json.loads(json.dumps(result.to_dict(), default=str))
    assert record["trials"] == len(result.trials) and record["best"]["index"] == best.index


def test_a_search_with_one_seed_is_the_same_search_twice():
    """The seed fixes every trial's initial weights too (the global generator moved on between the two searches)."""
    from lipdp.datasets import load_dataset
    from lipdp.models import orthogonal_mlp
    from lipdp.tuning import tune

    train = load_dataset("digits").train
    scores = []
    for moved in (1, 2):
        torch.rand(moved)
        result = tune(lambda: orthogonal_mlp(64, 10, hidden=(16,)), train, _space(), 3.0, DELTA,
                      TruncatedNegativeBinomial.with_mean(1.5, 1.0), seed=5, progress=False)
        scores.append([trial.validation_accuracy for trial in result.trials])
    assert scores[0] == scores[1]


def test_trials_are_scored_by_a_noisy_count_and_print_no_exact_accuracy(capsys):
    """The released score is the count of correct validation predictions plus N(0, sigma_s^2) over the part's
    expected size: not the exact accuracy (a non-private function of the validation records), and no exact
    accuracy reaches the console (train_private runs without a held-out set)."""
    from lipdp.datasets import independent_split, load_dataset
    from lipdp.evaluation import correct_predictions
    from lipdp.models import orthogonal_mlp
    from lipdp.tuning import tune

    train = load_dataset("digits").train
    result = tune(lambda: orthogonal_mlp(64, 10, hidden=(16,)), train, _space(), 3.0, DELTA,
                  TruncatedNegativeBinomial.with_mean(1.5, 1.0), seed=4, progress=True)
    printed = capsys.readouterr()
    assert "accuracy" not in printed.out + printed.err
    validation = independent_split(train, 0.2, seed=4)[1]
    best = result.best
    expected_size = 0.2 * len(train)
    assert best.score_noise == score_noise_multiplier(HistoryEntry(best.noise_multiplier, best.sample_rate,
                                                                   best.steps)) > 0
    noise = best.validation_accuracy * expected_size - correct_predictions(result.model, validation)
    assert noise != 0 and abs(noise) < 6 * best.score_noise


def test_batch_sizes_above_the_training_part_are_refused():
    from lipdp.datasets import load_dataset
    from lipdp.tuning import tune

    from lipdp.datasets import independent_split

    left = len(independent_split(load_dataset("digits").train, 0.2, seed=0)[0])
    with pytest.raises(ValueError, match=f"Fix: use batch sizes <= {left}$"):
        tune(lambda: None, load_dataset("digits").train, _space(batch_size=(2048,)), 3.0, DELTA,
             PoissonTrials(2.0), progress=False)


def test_cli_mistakes_are_one_line():
    assert_one_line_user_error(run_in_process("lipdp.cli", "tune", "--mean-trials", "1"), "lipdp tune", "mean")
    assert_one_line_user_error(run_in_process("lipdp.cli", "tune", "--lr", "-1", "--epochs", "1"), "lipdp tune",
                               "learning_rate")


@pytest.mark.slow
def test_lipdp_tune_on_digits_end_to_end(tmp_path):
    path = tmp_path / "tune.json"
    result = run_in_process("lipdp.cli", "tune", "--dataset", "digits", "--epsilon", "3", "--json", str(path),
                            "--epochs", "3", "6", "--mean-trials", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    record = json.loads(path.read_text())
    assert record["epsilon"] <= 3.0 and record["trials"] >= 1
    assert len(record["trial_log"]) == record["trials"]
    assert record["best"]["validation_accuracy"] == max(t["validation_accuracy"] for t in record["trial_log"])
    assert record["trial_epsilon"] < record["epsilon"]
    assert 0 < record["test_accuracy"] <= 1
    assert "trial 1/" in result.stdout and "naive composition" in result.stdout


@pytest.mark.parametrize("held_out", [False, True])
def test_recipe_tune_reports_on_the_test_split_or_a_held_out_part_of_training(tmp_path, held_out):
    from lipdp.datasets import load_dataset
    from recipes import tune as recipe

    path = tmp_path / "tune.json"
    flags = ["--dataset", "digits", "--epsilon", "3", "--epochs", "2", "--batch-size", "256", "--mean-trials", "1.5",
             "--no-progress", "--json", str(path)]
    assert recipe.main(flags + (["--held-out"] if held_out else [])) == 0
    record = json.loads(path.read_text())
    assert record["evaluated_on"] == ("held-out" if held_out else "test")
    splits = load_dataset("digits")
    assert record["evaluated_samples"] == (round(0.1 * len(splits.train)) if held_out else len(splits.test))
    assert record["epsilon"] <= 3.0 and record["trials"] >= 1 and 0.2 < record["accuracy"] <= 1
