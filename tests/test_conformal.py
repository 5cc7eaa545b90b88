"""Conformal prediction (lipdp.conformal): score constants and bounds, split conformal coverage, robust sets under
attack, and the private quantile's privacy, coverage and convergence."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from orthogonium.layers import OrthoLinear
from torch import nn

import lipdp
from lipdp.attacks import l2_pgd
from lipdp.conformal import (
    SigmoidScore,
    SoftmaxScore,
    conformal_quantile,
    conformal_rank,
    corrected_target,
    coverage,
    default_grid,
    logit_radius,
    make_score,
    mean_set_size,
    prediction_sets,
    private_conformal_quantile,
    private_target,
    true_label_scores,
)
from lipdp.conformal.private_quantile import exponential_mechanism_probabilities
from lipdp.datasets import load_dataset
from lipdp.losses import LipschitzCrossEntropy
from lipdp.models import orthogonal_cnn

SCORES = [SoftmaxScore(3.0), SigmoidScore(3.0, bias=0.5)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread is faster, and much faster on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- score constants


@pytest.mark.parametrize("score", SCORES, ids=repr)
def test_score_gradient_never_exceeds_its_lipschitz_constant(score):
    torch.manual_seed(0)
    logits = torch.randn(400, 5, dtype=torch.float64) * 2
    logits[:100, 2:] = -30.0  # nearly two-class rows, where the softmax constant is approached
    logits[:100, :2] = 0.01 * torch.randn(100, 2, dtype=torch.float64)
    logits.requires_grad_(True)
    values = score(logits)
    for label in range(5):
        (grad,) = torch.autograd.grad(values[:, label].sum(), logits, retain_graph=True)
        norms = grad.norm(dim=1)
        assert norms.max() <= score.lipschitz * (1 + 1e-9)
    assert norms.max() >= 0.9 * score.lipschitz  # the constant is not loose by much


def test_softmax_constant_is_tight_for_two_classes():
    score = SoftmaxScore(temperature=2.0)
    logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(score(logits)[0, 0], logits)
    assert grad.norm().item() == pytest.approx(math.sqrt(2) * 2.0 / 4)
    assert score.lipschitz == pytest.approx(math.sqrt(2) * 2.0 / 4)


def test_softmax_log_odds_match_softmax():
    logits = torch.randn(50, 7, dtype=torch.float64)
    score = SoftmaxScore(1.7)
    h, grad_norm = score.log_odds(logits)
    assert torch.allclose(torch.sigmoid(h), torch.softmax(1.7 * logits, dim=1))
    assert (grad_norm <= math.sqrt(2) * 1.7 + 1e-12).all() and (grad_norm >= 1.7).all()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    temperature=st.floats(0.1, 20.0),
    rho=st.floats(0.0, 2.0),
    spread=st.floats(0.01, 10.0),
    kind=st.sampled_from(["softmax", "sigmoid"]),
)
def test_score_bounds_contain_every_perturbed_score(seed, temperature, rho, spread, kind):
    """Random points of the logit ball (surface and inside) and logit-space PGD never leave the bounds."""
    generator = torch.Generator().manual_seed(seed)
    score = make_score(kind, temperature)
    logits = spread * torch.randn(8, 4, generator=generator, dtype=torch.float64)
    bounds = score.bounds(logits, rho)
    assert (bounds.lower <= score(logits) + 1e-12).all() and (score(logits) <= bounds.upper + 1e-12).all()
    assert (bounds.upper - bounds.lower <= 2 * score.lipschitz * rho + 1e-12).all()  # never looser than Lipschitz
    for _ in range(3):
        direction = torch.randn(logits.shape, generator=generator, dtype=torch.float64)
        length = rho * torch.rand(8, 1, generator=generator, dtype=torch.float64) ** 0.25
        moved = score(logits + length * direction / direction.norm(dim=1, keepdim=True))
        assert (moved >= bounds.lower - 1e-12).all() and (moved <= bounds.upper + 1e-12).all()
    labels = torch.arange(8) % 4
    for sign in (1.0, -1.0):
        attacked = l2_pgd(lambda z: sign * true_label_scores(score(z), labels), logits, rho, steps=10,
                          generator=generator)
        value = true_label_scores(score(attacked), labels)
        assert (value >= true_label_scores(bounds.lower, labels) - 1e-12).all()
        assert (value <= true_label_scores(bounds.upper, labels) + 1e-12).all()


def test_sigmoid_bounds_are_attained():
    score = SigmoidScore(4.0)
    logits = torch.randn(10, 3, dtype=torch.float64)
    bounds = score.bounds(logits, 0.3)
    up = logits.clone()
    up[:, 1] -= 0.3
    assert torch.allclose(score(up)[:, 1], bounds.upper[:, 1])


# ------------------------------------------------------------------------------- robust bound vs input attacks


@functools.lru_cache(maxsize=2)
def _digits_model(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small orthogonal CNN trained a few non-private steps on digits (enough for non-trivial logits)."""
    torch.manual_seed(seed)
    splits = load_dataset("digits", seed=seed)
    x, y = splits.train.tensors
    model = orthogonal_cnn(splits.input_shape, splits.num_classes, widths=(8, 16), input_norm_bound=8.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = LipschitzCrossEntropy(temperature=4.0)
    for step in range(30):
        batch = torch.randint(0, len(x), (128,))
        optimizer.zero_grad()
        loss(model(x[batch]), y[batch]).backward()
        optimizer.step()
    model.eval()
    return model, *splits.test.tensors


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_input_space_attack_never_beats_the_certified_score_bound(kind):
    model, x, y = _digits_model(seed=0)
    x, y = x[:48], y[:48]
    lip = lipdp.lipschitz_constant(model, tuple(x.shape[1:]))
    score = make_score(kind, temperature=4.0)
    radius = 0.5
    with torch.no_grad():
        logits = model(x)
    bounds = score.bounds(logits, logit_radius(lip, radius))
    generator = torch.Generator().manual_seed(1)
    for sign in (1.0, -1.0):
        attacked = l2_pgd(lambda inputs: sign * true_label_scores(score(model(inputs)), y), x, radius, steps=10,
                          generator=generator)
        assert ((attacked - x).flatten(1).norm(dim=1) <= radius * (1 + 1e-5)).all()
        with torch.no_grad():
            values = true_label_scores(score(model(attacked)), y)
        assert (values <= true_label_scores(bounds.upper, y) + 1e-6).all()
        assert (values >= true_label_scores(bounds.lower, y) - 1e-6).all()
    # The attack moves the scores (the test is not vacuous).
    assert (values - true_label_scores(score(logits), y)).abs().max() > 1e-3


def test_robust_sets_at_attacked_inputs_contain_the_clean_vanilla_sets():
    model, x, y = _digits_model(seed=1)
    lip = lipdp.lipschitz_constant(model, tuple(x.shape[1:]))
    score = SoftmaxScore(4.0)
    radius = 0.3
    with torch.no_grad():
        clean_scores = score(model(x))
    threshold = conformal_quantile(true_label_scores(clean_scores[:200], y[:200]), 0.1)
    x_test, y_test = x[200:260], y[200:260]
    rho = logit_radius(lip, radius)
    attacked = l2_pgd(lambda inputs: true_label_scores(score.bounds(model(inputs), rho).lower, y_test), x_test,
                      radius, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        robust = prediction_sets(score.bounds(model(attacked), rho).lower, threshold)
    vanilla = prediction_sets(clean_scores[200:260], threshold)
    assert (robust | ~vanilla).all()  # vanilla clean set is a subset of the attacked robust set
    assert coverage(robust, y_test) >= coverage(vanilla, y_test)


def test_linear_orthogonal_model_attack_reaches_the_bound():
    """For logits = W x with orthogonal W the bound of the sigmoid score is exact: PGD must get close to it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), OrthoLinear(16, 16, bias=False))
    x = torch.randn(32, 1, 4, 4)
    y = torch.randint(0, 16, (32,))
    lip = lipdp.lipschitz_constant(model, (1, 4, 4))
    score = SigmoidScore(2.0)
    with torch.no_grad():
        upper = true_label_scores(score.bounds(model(x), logit_radius(lip, 0.4)).upper, y)
    attacked = l2_pgd(lambda inputs: true_label_scores(score(model(inputs)), y), x, 0.4, steps=30)
    with torch.no_grad():
        values = true_label_scores(score(model(attacked)), y)
    assert (values <= upper + 1e-6).all()
    assert (upper - values).max() < 2e-3


# ---------------------------------------------------------------------------------------- split conformal


def _coverage_tolerance(n: int, n_test: int, splits: int, alpha: float) -> float:
    """4 standard deviations of the mean coverage over independent splits (beta law of the conformal coverage
    plus binomial test noise)."""
    r = conformal_rank(n, alpha)
    a, b = r, n + 1 - r
    beta_var = a * b / ((a + b) ** 2 * (a + b + 1))
    mean = a / (a + b)
    return 4 * math.sqrt((beta_var + mean * (1 - mean) / n_test) / splits)


@pytest.mark.parametrize("alpha", [0.1, 0.05])
@pytest.mark.parametrize("ties", [False, True])
def test_split_conformal_coverage_across_random_splits(alpha, ties):
    rng = np.random.default_rng(0)
    n, n_test, splits = 200, 200, 2000
    draws = rng.beta(2.0, 5.0, size=(splits, n + n_test))
    if ties:
        draws = np.round(draws * 20) / 20  # 21 distinct values: many ties
    scores = torch.from_numpy(draws)
    thresholds = torch.tensor([conformal_quantile(row[:n], alpha) for row in scores])
    per_split = (scores[:, n:] <= thresholds[:, None]).double().mean(dim=1)
    tolerance = _coverage_tolerance(n, n_test, splits, alpha)
    assert per_split.mean() >= 1 - alpha - tolerance
    if not ties:  # continuous scores: coverage is exactly r / (n + 1) in expectation
        assert per_split.mean() <= conformal_rank(n, alpha) / (n + 1) + tolerance


def test_conformal_quantile_is_the_ceil_order_statistic():
    scores = torch.arange(1.0, 11.0)  # 1..10
    assert conformal_quantile(scores.flip(0), 0.1) == 10.0  # ceil(11 * 0.9) = 10
    assert conformal_quantile(scores, 0.2) == 9.0  # ceil(11 * 0.8) = 9
    assert conformal_rank(99, 0.07) == 93  # float (n + 1)(1 - alpha) = 93.00000000000001 must not give 94


def test_sets_and_metrics():
    scores = torch.tensor([[0.1, 0.5, 0.9], [0.6, 0.2, 0.3]])
    sets = prediction_sets(scores, 0.4)
    assert sets.tolist() == [[True, False, False], [False, True, True]]
    assert coverage(sets, torch.tensor([0, 0])) == 0.5
    assert mean_set_size(sets) == 1.5


# ------------------------------------------------------------------------------------------- private quantile


def _neighbours(scores: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Add-one and remove-one neighbours, with new values at ties, grid points and random places."""
    out = []
    for value in (scores[0], 0.5, 1.0, 0.0, rng.uniform()):
        out.append(np.append(scores, value))
    for index in (0, len(scores) - 1, int(rng.integers(len(scores)))):
        out.append(np.delete(scores, index))
    return out


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_private_quantile_is_epsilon_dp_exactly(epsilon):
    """Exact output laws of neighbouring calibration sets (add/remove one) differ by at most e^eps."""
    rng = np.random.default_rng(3)
    grid = default_grid(41)
    gamma = private_target(800, 0.1, epsilon, grid.size).gamma  # fixed in advance (strict add/remove)
    for trial in range(20):
        scores = np.round(rng.beta(2, 5, size=800), 2 if trial % 2 else 6)
        base = exponential_mechanism_probabilities(
            scores, grid, corrected_target(len(scores), 0.1, epsilon, grid.size, gamma).target, epsilon)
        for other in _neighbours(scores, rng):
            target = corrected_target(len(other), 0.1, epsilon, grid.size, gamma).target
            law = exponential_mechanism_probabilities(other, grid, target, epsilon)
            assert np.abs(np.log(law) - np.log(base)).max() <= epsilon + 1e-9


def test_private_quantile_coverage_across_random_splits():
    rng = np.random.default_rng(1)
    alpha, epsilon, n, n_test, splits = 0.1, 1.0, 500, 200, 1000
    covered, thresholds = [], []
    for _ in range(splits):
        draws = rng.beta(2.0, 5.0, size=n + n_test)
        release = private_conformal_quantile(draws[:n], alpha, epsilon, generator=rng)
        covered.append(np.mean(draws[n:] <= release.threshold))
        thresholds.append(release.threshold)
    tolerance = _coverage_tolerance(n, n_test, splits, alpha)
    assert np.mean(covered) >= 1 - alpha - tolerance
    assert np.mean(covered) < 0.99  # the correction does not degenerate into the trivial threshold
    assert release.plan.feasible and release.epsilon == epsilon


def test_private_quantile_converges_to_the_non_private_one():
    rng = np.random.default_rng(2)
    alpha, n = 0.1, 1000
    grid = default_grid(2001)
    errors = []
    for epsilon in (0.5, 2.0, 10.0, 100.0, 1e5):
        gaps = []
        for _ in range(30):
            scores = rng.beta(2.0, 5.0, size=n)
            exact = conformal_quantile(torch.from_numpy(scores), alpha)
            private = private_conformal_quantile(scores, alpha, epsilon, grid=grid, generator=rng).threshold
            gaps.append(private - exact)
        errors.append(np.mean(np.abs(gaps)))
        if epsilon == 1e5:  # the grid round-up of the non-private quantile
            assert all(0 <= gap <= grid[1] for gap in gaps)
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[0] > 10 * errors[-1]


def test_private_target_trades_gamma_for_rank():
    plan = private_target(2000, 0.1, 1.0, 1001)
    assert plan.feasible and 0 < plan.gamma < 1
    assert plan.rank >= conformal_rank(2000, 0.1) and plan.target > plan.rank - 1
    assert private_target(2000, 0.1, 1e6, 1001).rank == conformal_rank(2000, 0.1)


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), "0.1"])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha must be in"):
        conformal_quantile(torch.rand(100), alpha)
    with pytest.raises(ValueError, match="alpha must be in"):
        private_conformal_quantile(np.random.rand(100), alpha, 1.0)


def test_empty_or_too_small_calibration_sets_are_refused():
    with pytest.raises(ValueError, match="empty"):
        conformal_quantile(torch.empty(0), 0.1)
    with pytest.raises(ValueError, match="empty"):
        private_conformal_quantile(np.empty(0), 0.1, 1.0)
    with pytest.raises(ValueError, match="at least 9 calibration samples"):
        conformal_quantile(torch.rand(5), 0.1)
    with pytest.raises(ValueError, match="impossible with n=50"):
        private_conformal_quantile(np.random.rand(50), 0.1, 1.0)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="labels must have shape"):
        true_label_scores(torch.rand(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        true_label_scores(torch.rand(10, 3), torch.full((10,), 3))
    with pytest.raises(ValueError, match="must be 1-D"):
        conformal_quantile(torch.rand(10, 3), 0.1)
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        SoftmaxScore()(torch.rand(10))
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        prediction_sets(torch.rand(10), 0.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        coverage(torch.ones(4, 3, dtype=torch.bool), torch.zeros(5, dtype=torch.long))


def test_other_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="epsilon must be"):
        private_conformal_quantile(np.random.rand(1000), 0.1, 0.0)
    with pytest.raises(ValueError, match="exceeds the grid"):
        private_conformal_quantile(np.random.rand(1000) + 1.0, 0.1, 1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        private_conformal_quantile(np.random.rand(1000), 0.1, 1.0, grid=np.array([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="radius must be"):
        logit_radius(1.0, -0.1)
    with pytest.raises(ValueError, match="certified constant"):
        logit_radius(float("inf"), 0.1)
    with pytest.raises(ValueError, match="temperature must be"):
        SoftmaxScore(0.0)
    with pytest.raises(ValueError, match="unknown score"):
        make_score("aps", 1.0)


# ------------------------------------------------------------------------------------------------ recipe


@pytest.mark.slow
def test_recipe_runs_end_to_end_on_digits(tmp_path):
    from recipes import conformal as recipe

    out = tmp_path / "conformal.json"
    assert recipe.main(["--dataset", "digits", "--epochs", "3", "--batch-size", "256", "--widths", "8", "16",
                        "--input-norm-bound", "8", "--calibration-size", "300", "--test-size", "200",
                        "--calibration-epsilon", "3", "--grid-size", "201", "--radius", "0.25", "--epsilon", "8",
                        "--attack-steps", "5", "--no-progress", "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    rows = {(row["sets"], row["threshold"]): row for row in result["rows"]}
    assert set(rows) == {(s, t) for s in ("vanilla", "robust") for t in ("non-private", "private")}
    for threshold in ("non-private", "private"):
        # Certified: every label of a clean vanilla set stays in the attacked robust set.
        assert rows["robust", threshold]["attacked_coverage"] >= rows["vanilla", threshold]["clean_coverage"]
    assert result["privacy"]["train_epsilon"] <= 8.0 + 1e-6
    assert result["privacy"]["calibration_epsilon"] == 3.0
    assert result["sizes"] == {"train": 1137, "calibration": 300, "test": 200}


def test_recipe_validation_split_leaves_the_test_split_unread_and_clipping_trains_the_same_model():
    """``validation``: the report's inputs come from the training split (its size, and not the test split's
    images); ``mechanism="clipping"`` trains the same network with per-sample clipping, still certified."""
    from lipdp.datasets import load_dataset
    from recipes import conformal as recipe

    result = recipe.run(dataset="digits", validation=0.2, calibration_size=0.2, test_size=None, epochs=1,
                        attack_steps=1, mechanism="clipping", max_grad_norm=1.0, progress=False)
    train_images = len(load_dataset("digits", seed=0).train)
    held_out = round(0.2 * train_images)
    assert result["evaluated"] == "validation"
    assert result["sizes"]["test"] == held_out
    assert result["sizes"]["train"] + result["sizes"]["calibration"] == train_images - held_out
    assert result["train"]["config"]["mechanism"] == "clipping"
    assert result["certificate_violations"] == {"non-private": 0, "private": 0}


@pytest.mark.parametrize("validation", [None, 0.25])
def test_recipe_calibrates_on_half_the_evaluated_split_and_trains_on_the_whole_training_split(validation):
    """``calibration_split="evaluated"`` (the default off digits): the calibration part is cut from the split the
    report evaluates (the test split, or the validation part), by default half of it; the model trains on all the
    rest of the training split, and the report reads only the evaluated samples left after calibration."""
    from lipdp.datasets import load_dataset
    from recipes import conformal as recipe

    splits = load_dataset("digits", seed=0)
    result = recipe.run(dataset="digits", calibration_split="evaluated", validation=validation, epochs=1,
                        attack_steps=1, progress=False)
    held_out = len(splits.test) if validation is None else round(validation * len(splits.train))
    assert result["calibration_split"] == "evaluated"
    assert result["sizes"] == {"train": len(splits.train) - (0 if validation is None else held_out),
                               "calibration": round(0.5 * held_out), "test": held_out - round(0.5 * held_out)}
    assert result["evaluated"] == ("test" if validation is None else "validation")
    assert result["certificate_violations"] == {"non-private": 0, "private": 0}


def test_recipe_defaults_calibrate_on_the_test_split_except_on_digits():
    from recipes import conformal as recipe

    for dataset in ("fashion-mnist", "mnist"):
        assert recipe.DEFAULT_CALIBRATION_SPLIT.get(dataset, recipe.FALLBACK_CALIBRATION_SPLIT) == "evaluated"
    assert recipe.DEFAULT_CALIBRATION_SPLIT["digits"] == "train"


@pytest.mark.parametrize("settings, message", [
    (dict(calibration_split="test"), "not a split of this recipe"),
    (dict(calibration_split="evaluated", calibration_size=400), "does not fit the 360 test samples"),
    (dict(calibration_split="train", calibration_size=1.5), "does not fit the 1437 training samples"),
])
def test_recipe_refuses_a_calibration_part_it_cannot_cut(settings, message):
    from lipdp.cli.errors import UserError
    from recipes import conformal as recipe

    with pytest.raises(UserError, match=message):
        recipe.run(dataset="digits", epochs=1, progress=False, **settings)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5])
def test_recipe_refuses_a_validation_that_is_not_a_fraction(fraction):
    from lipdp.cli.errors import UserError
    from recipes import conformal as recipe

    with pytest.raises(UserError, match="not a fraction"):
        recipe.run(dataset="digits", validation=fraction, epochs=1, progress=False)


@pytest.mark.parametrize("settings, message", [
    (dict(mechanism="bounds", max_grad_norm=1.0), "clips no per-sample gradient"),
    (dict(model="cnn", mechanism="clipping"), "needs a clipping norm"),
])
def test_recipe_refuses_a_clipping_norm_without_clipping_and_clipping_without_a_norm(settings, message):
    from lipdp.cli.errors import UserError
    from recipes import conformal as recipe

    with pytest.raises(UserError, match=message):
        recipe.run(**{"dataset": "digits", "epochs": 1, "progress": False, **settings})


def test_recipe_scattering_pipeline_is_certified_in_pixel_space():
    """``model="scattering"``: the classification recipe's certified pipeline, attacked through its front end in
    pixel space; no label of a clean vanilla set leaves the attacked robust set, and the constant is the pipeline's
    (head x preprocessing), larger than 1 / c alone (c = 2 for the 8x8 digits, whose images have norm ~4)."""
    from recipes import conformal as recipe

    result = recipe.run(dataset="digits", model="scattering", epochs=30, calibration_size=0.25, test_size=120,
                        attack_steps=3, feature_radius=2.0, progress=False)
    assert result["certificate_violations"] == {"non-private": 0, "private": 0}
    assert result["train"]["config"]["noise_strategy"] == "min_energy" and result["train"]["epsilon"] <= 3 + 1e-6
    assert 1 / 2.0 < result["lipschitz"] < float("inf")
    assert result["clean_accuracy"] > 0.5


@pytest.mark.parametrize("settings, message", [
    (dict(model="scattering", mechanism="clipping", max_grad_norm=1.0), "certified bounds only"),
    (dict(model="mlp", feature_radius=8.0), "--feature-radius"),
])
def test_recipe_refuses_settings_of_the_other_model(settings, message):
    from lipdp.cli.errors import UserError
    from recipes import conformal as recipe

    with pytest.raises(UserError, match=message):
        recipe.run(**{"dataset": "digits", "epochs": 1, "progress": False, **settings})


def test_recipe_patch_cnn_is_certified_with_its_logit_clip():
    """``model="patch"``: the patch CNN on the pixels (X0 = 10, the logit-gradient clip of its settings, a margin
    from the flag): attacked in pixel space, no clean vanilla label leaves the attacked robust set, and its certified
    constant is the orthogonal network's, 1 up to the certificate's slack."""
    from recipes import conformal as recipe

    result = recipe.run(dataset="digits", model="patch", epochs=1, batch_size=256, calibration_size=0.25,
                        test_size=60, attack_steps=2, margin=0.5, weight_averaging=0.9, progress=False)
    assert result["certificate_violations"] == {"non-private": 0, "private": 0}
    config = result["train"]["config"]
    assert config["loss_grad_clip"] == recipe.MODEL_SETTINGS["patch"]["loss_grad_clip"] == 1.0
    assert config["input_norm_bound"] == 10.0 and config["margin"] == 0.5 and config["weight_averaging"] == 0.9
    assert config["mechanism"] == "clipping" and config["max_grad_norm"] == recipe.MODEL_SETTINGS["patch"][
        "max_grad_norm"] == 4.0
    assert 1.0 <= result["lipschitz"] < 1.01


def test_recipe_patch_cnn_trains_with_the_certified_bounds_when_asked():
    """``--mechanism bounds`` on the patch CNN, whose default is clipping: its clipping norm is dropped, not refused
    (the user gave none), and the run is certified the same way."""
    from recipes import conformal as recipe

    result = recipe.run(dataset="digits", model="patch", mechanism="bounds", epochs=1, batch_size=256,
                        calibration_size=0.25, test_size=60, attack_steps=2, progress=False)
    config = result["train"]["config"]
    assert config["mechanism"] == "bounds" and config["max_grad_norm"] is None
    assert result["certificate_violations"] == {"non-private": 0, "private": 0}


def test_a_weight_averaging_decay_outside_0_1_is_one_line():
    from tests.test_cli import assert_one_line_user_error, run_in_process

    result = run_in_process("recipes.conformal", "--dataset", "digits", "--epochs", "1", "--weight-averaging", "1.5",
                            "--no-progress")
    assert_one_line_user_error(result, "python -m recipes.conformal", "decay must be in [0, 1), got 1.5",
                               "--weight-averaging")
