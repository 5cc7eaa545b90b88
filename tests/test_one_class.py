"""Private one-class classification (OCSDF, issue 6): loss constant, negative sampler, certified AUROC,
attack vs certificate, the private training step, and the recipe end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lipdp.bounds import analyze, lipschitz_constant
from lipdp.models import orthogonal_mlp
from lipdp.averaging import WeightAverage
from lipdp.one_class import (
    BallPrior,
    BoxPrior,
    NegativeSampler,
    OneClassHKR,
    attack_scores,
    attacked_auroc,
    auroc,
    certified_auroc,
    ocsdf_step_loss,
    scores,
    train_ocsdf,
)


class Affine(nn.Module):
    """f(x) = w.x + b with ||w|| = 1: 1-Lipschitz, and one Newton step lands exactly on a level set."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w / w.norm())
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, x):
        return (x.flatten(1) @ self.w + self.b)[:, None]


class DistanceToBall(nn.Module):
    """f(x) = 1 - ||x||: positive inside the unit ball, a true signed distance (concave, 1-Lipschitz)."""

    def forward(self, x):
        return 1.0 - x.flatten(1).norm(dim=1, keepdim=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one thread avoids oversubscribing the (shared) CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _separable_scores(seed=0, n=60, gap=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) + gap, torch.randn(n, generator=g)


# ---------------------------------------------------------------------------------------------------- loss


def test_loss_lipschitz_constant_bounds_the_score_derivative():
    criterion = OneClassHKR(margin=0.2, lam=100.0, reduction="sum")
    assert criterion.lipschitz_constant == 101.0
    f = torch.linspace(-3, 3, 601, requires_grad=True)
    (grad,) = torch.autograd.grad(criterion(f), f)
    assert grad.abs().max().item() == pytest.approx(101.0)  # reached where the hinge is active (f < m)
    assert grad.abs().max().item() <= criterion.lipschitz_constant
    (grad_q,) = torch.autograd.grad(criterion.negative_loss(f), f)
    assert grad_q.abs().max().item() <= criterion.lipschitz_constant


def test_loss_values_and_bad_input():
    criterion = OneClassHKR(margin=0.5, lam=2.0, reduction="none")
    f = torch.tensor([[1.0], [0.0], [-1.0]])
    assert criterion(f).tolist() == pytest.approx([-1.0, 1.0, 4.0])  # -f + 2 relu(0.5 - f)
    assert criterion.negative_loss(f).tolist() == pytest.approx([4.0, 1.0, -1.0])  # f + 2 relu(0.5 + f)
    with pytest.raises(ValueError, match="shape"):
        criterion(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="margin"):
        OneClassHKR(margin=0.0)
    with pytest.raises(ValueError, match="lam"):
        OneClassHKR(lam=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        OneClassHKR(reduction="max")


def test_private_term_per_sample_gradients_within_engine_bounds():
    """The engine bounds one normal sample's gradient by (1 + lambda) x network bounds: check per sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    criterion = OneClassHKR(margin=5.0, lam=3.0, reduction="sum")  # large margin: the hinge is active
    x = torch.randn(16, 5)
    x = x / x.norm(dim=1, keepdim=True) * 2.0
    bounds = analyze(model, 2.0, criterion.lipschitz_constant, input_shape=(5,)).sensitivities
    for i in range(len(x)):
        model.zero_grad()
        criterion(model(x[i : i + 1])).backward()
        for name, p in model.named_parameters():
            assert p.grad.norm().item() <= bounds[name] * (1 + 1e-5), name


# ------------------------------------------------------------------------------------------- the sampler


def test_priors_stay_in_their_support():
    g = torch.Generator().manual_seed(0)
    box = BoxPrior((3, 4), low=-1.0, high=2.0).sample(500, g)
    assert box.shape == (500, 3, 4) and box.min() >= -1.0 and box.max() <= 2.0
    ball = BallPrior((10,), radius=3.0, fold=True).sample(500, g)
    assert (ball.norm(dim=1) <= 3.0 + 1e-5).all() and (ball >= 0).all()
    sphere = BallPrior((10,), radius=3.0, surface=True).sample(50, g)
    assert torch.allclose(sphere.norm(dim=1), torch.full((50,), 3.0))
    assert torch.allclose(BallPrior((2,), 1.0).project(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))
    with pytest.raises(ValueError, match="radius"):
        BallPrior((2,), radius=0.0)
    with pytest.raises(ValueError, match="low < high"):
        BoxPrior((2,), low=1.0, high=1.0)
    with pytest.raises(ValueError, match="shape"):
        BoxPrior(())


def test_newton_step_lands_on_the_level_set_of_an_affine_score():
    torch.manual_seed(0)
    f = Affine(torch.randn(6), b=-5.0)
    sampler = NegativeSampler(BallPrior((6,), radius=2.0), steps=1, level=0.5, random_step=False)
    z0 = sampler.sample(f, 64, torch.Generator().manual_seed(1), steps=0)
    z1 = sampler.sample(f, 64, torch.Generator().manual_seed(1))
    assert (f(z0) < 0.5).all()  # every prior point is below the level (|w.x| <= 2 < 5.5)
    # project() would pull points beyond the ball back; this level set (w.x = 5.5) lies outside it
    sampler_free = NegativeSampler(BallPrior((6,), radius=100.0), steps=1, level=0.5, random_step=False)
    z = BallPrior((6,), radius=2.0).sample(64, torch.Generator().manual_seed(1))
    moved = sampler_free._step(f, z, None)
    assert torch.allclose(f(moved), torch.full((64, 1), 0.5), atol=1e-4)
    assert (f(z1) >= f(z0) - 1e-6).all()


def test_newton_steps_move_negatives_toward_the_level_set():
    """f increases toward `level` at every step and never overshoots (concave f: steps land at or below)."""
    f = DistanceToBall()
    level = 0.0
    sampler = NegativeSampler(BallPrior((5,), radius=4.0), steps=1, level=level, step_size=0.8)
    z = BallPrior((5,), radius=4.0).sample(200, torch.Generator().manual_seed(0))
    z = z[f(z)[:, 0] < level]
    g = torch.Generator().manual_seed(1)
    previous = f(z)[:, 0]
    for _ in range(4):
        z = sampler._step(f, z, g)
        current = f(z)[:, 0]
        assert (current >= previous - 1e-6).all()
        assert (current <= level + 1e-5).all()
        previous = current
    assert (level - previous).mean() < 0.5 * (level - f(BallPrior((5,), 4.0).sample(200, g))[:, 0]).clamp_min(0).mean()


def test_newton_steps_on_a_network_reduce_the_gap_and_leave_points_above_the_level_alone():
    torch.manual_seed(0)
    model = orthogonal_mlp(8, 1, hidden=(16,), input_norm_bound=10.0)
    prior = BallPrior((8,), radius=3.0)
    z0 = prior.sample(256, torch.Generator().manual_seed(0))
    level = model(z0).median().item()
    sampler = NegativeSampler(prior, steps=3, level=level, random_step=False, step_size=0.5)
    z = sampler.sample(model, 256, torch.Generator().manual_seed(0))
    before, after = model(z0)[:, 0], model(z)[:, 0]
    below = before < level
    assert (level - after[below]).clamp_min(0).mean() < 0.5 * (level - before[below]).mean()
    assert torch.allclose(z[~below], z0[~below], atol=1e-6)  # relu(level - f) = 0: no move
    assert not any(p.grad is not None for p in model.parameters())  # sampling touches no parameter gradient


def test_sampler_bad_input():
    prior = BallPrior((2,), 1.0)
    with pytest.raises(ValueError, match="steps"):
        NegativeSampler(prior, steps=-1)
    with pytest.raises(ValueError, match="step_size"):
        NegativeSampler(prior, step_size=0.0)
    with pytest.raises(ValueError, match="n must be"):
        NegativeSampler(prior).sample(DistanceToBall(), 0)


# ------------------------------------------------------------------------------------------------ metrics


def test_certified_auroc_is_auroc_at_radius_zero_and_known_values():
    normal, anomaly = _separable_scores()
    assert certified_auroc(normal, anomaly, 0.0) == auroc(normal, anomaly)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    # gaps are exactly 1, 2, 2, 3: radius 0.75 (shift 1.5 on the gap) keeps 3 pairs of 4
    assert certified_auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]), 0.75) == 0.75
    assert certified_auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0]), 0.25, lipschitz=3.0) == 0.75


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), radii=st.lists(st.floats(0.0, 3.0), min_size=2, max_size=6))
def test_certified_auroc_decreases_with_radius(seed, radii):
    normal, anomaly = _separable_scores(seed, n=30, gap=1.0)
    values = [certified_auroc(normal, anomaly, r) for r in sorted(radii)]
    assert values[0] <= auroc(normal, anomaly)
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_metrics_bad_input():
    normal, anomaly = _separable_scores()
    for radius in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="radius"):
            certified_auroc(normal, anomaly, radius)
    with pytest.raises(ValueError, match="lipschitz"):
        certified_auroc(normal, anomaly, 0.1, lipschitz=0.0)
    with pytest.raises(ValueError, match="normal_scores"):
        auroc(torch.zeros(3, 2), anomaly)
    with pytest.raises(ValueError, match="anomaly_scores"):
        auroc(normal, torch.zeros(0))
    with pytest.raises(ValueError, match="non-finite"):
        auroc(torch.tensor([0.0, math.nan]), anomaly)


def _trained_toy_detector(seed=0):
    """A small orthogonal MLP trained a few steps on a Gaussian blob (normal) in the plane."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(256, 2, generator=g) * 0.3 + torch.tensor([1.0, 1.0])
    model = orthogonal_mlp(2, 1, hidden=(16, 16), input_norm_bound=4.0)
    sampler = NegativeSampler(BoxPrior((2,), -1.0, 3.0), steps=2)
    loader = DataLoader(TensorDataset(normal, torch.zeros(256)), batch_size=64, shuffle=True, generator=g)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_ocsdf(model, loader, optimizer, OneClassHKR(0.1, 10.0, reduction="sum"), sampler, epochs=5,
                expected_batch_size=64, warm_start_steps=4, generator=g, progress=False)
    anomaly = torch.rand(200, 2, generator=g) * 4 - 1
    anomaly = anomaly[(anomaly - torch.tensor([1.0, 1.0])).norm(dim=1) > 1.0]
    test_normal = torch.randn(200, 2, generator=g) * 0.3 + torch.tensor([1.0, 1.0])
    return model, test_normal, anomaly


def test_attack_never_beats_the_certificate():
    model, normal, anomaly = _trained_toy_detector()
    lip = lipschitz_constant(model)
    assert lip <= 1.0 + 1e-3
    clean = auroc(scores(model, normal), scores(model, anomaly))
    assert clean > 0.8
    for radius in (0.05, 0.2, 0.5):
        certified = certified_auroc(scores(model, normal), scores(model, anomaly), radius, lipschitz=lip)
        attacked = attacked_auroc(model, normal, anomaly, radius, steps=10, generator=torch.Generator().manual_seed(0))
        assert certified <= attacked + 1e-12 <= clean + 1e-12
    # the attack is real: it lowers normal scores and raises anomaly scores, never by more than lip * r
    s_normal = scores(model, normal)
    attacked_normal = attack_scores(model, normal, True, 0.25, steps=10)
    assert (attacked_normal <= s_normal + 1e-6).all() and (attacked_normal >= s_normal - 0.25 * lip - 1e-5).all()
    assert (s_normal - attacked_normal).max() > 0.1


# ---------------------------------------------------------------------------------------------- training


def test_step_loss_weights_negatives_as_a_mean_whatever_the_divisor():
    torch.manual_seed(0)
    model = orthogonal_mlp(4, 1, hidden=(8,), input_norm_bound=2.0)
    criterion = OneClassHKR(0.2, 5.0, reduction="sum")
    x, z = torch.randn(7, 4), torch.randn(11, 4)
    grads = []
    for divisor in (1.0, 16.0):
        model.zero_grad()
        ocsdf_step_loss(model, x, z, criterion, expected_batch_size=16, gradient_divisor=divisor).backward()
        grads.append([p.grad.clone() / divisor for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
    empty = ocsdf_step_loss(model, x[:0], z, criterion, expected_batch_size=16)  # empty Poisson batch
    assert torch.isfinite(empty)
    with pytest.raises(ValueError, match="reduction"):
        ocsdf_step_loss(model, x, z, OneClassHKR(reduction="mean"), expected_batch_size=16)


def test_weight_average_averages_parameters_and_copies_into_a_clean_module():
    model = nn.Linear(3, 1)
    ema = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update()
    assert torch.allclose(ema.average["weight"], model.weight - 1.0)
    current = model.weight.detach().clone()
    with ema.applied() as averaged:
        assert torch.allclose(averaged.weight, current - 1.0)
    assert torch.equal(model.weight, current)  # restored
    clean = ema.copy_into(nn.Linear(3, 1))
    assert torch.allclose(clean.weight, current - 1.0) and torch.equal(model.weight, current)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_private_training_with_the_engine():
    """Through LipDPEngine: the sensitivity uses 1 + lambda, the negatives are the same as on the plain
    model (the engine's hooks leave them alone with loss_reduction='sum'), and training runs and accounts."""
    engine_module = pytest.importorskip("lipdp.engine")
    torch.manual_seed(0)
    x = torch.randn(128, 6).abs()
    x = x / x.norm(dim=1, keepdim=True) * 3.0
    model = orthogonal_mlp(6, 1, hidden=(16,), input_norm_bound=3.0)
    plain = orthogonal_mlp(6, 1, hidden=(16,), input_norm_bound=3.0)
    plain.load_state_dict(model.state_dict())
    criterion = OneClassHKR(0.2, 10.0, reduction="sum")
    engine = engine_module.LipDPEngine(accountant="rdp", seed=0)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        data_loader=DataLoader(TensorDataset(x, torch.zeros(128)), batch_size=32), criterion=criterion,
        noise_multiplier=1.0, input_norm_bound=3.0, loss_reduction="sum")
    sampler = NegativeSampler(BallPrior((6,), 3.0, fold=True), steps=3)
    assert torch.allclose(sampler.sample(model, 20, torch.Generator().manual_seed(3)),
                          sampler.sample(plain, 20, torch.Generator().manual_seed(3)), atol=1e-5)
    expected = analyze(plain, 3.0, 11.0, input_shape=(6,)).sensitivities
    x_batch, _ = next(iter(loader))
    optimizer.zero_grad()
    ocsdf_step_loss(model, x_batch, sampler.sample(model, 32), criterion, 32, gradient_divisor=32).backward()
    optimizer.step()
    for name, value in engine.sensitivities().items():  # the first step's bounds: the initial weights'
        assert value == pytest.approx(expected[name], rel=1e-6)
    train_ocsdf(model, loader, optimizer, criterion, sampler, epochs=1, expected_batch_size=32,
                gradient_divisor=32, generator=torch.Generator().manual_seed(0), progress=False)
    assert engine.accountant.total_steps == 5
    assert 0 < engine.get_epsilon(1e-5) < math.inf


# ------------------------------------------------------------------------------------------------- recipe


def test_recipe_help():
    from recipes import one_class

    with pytest.raises(SystemExit) as info:
        one_class.parse_args(["--help"])
    assert info.value.code == 0
    with pytest.raises(ValueError, match="--radii"):
        one_class.parse_args(["--radii", "-1"])


@pytest.mark.slow
def test_recipe_end_to_end_on_breast_cancer(tmp_path):
    pytest.importorskip("lipdp.engine")
    from recipes import one_class

    out = tmp_path / "oc.json"
    results = one_class.run(one_class.parse_args([
        "--dataset", "breast_cancer", "--normal-class", "1", "--epsilon", "8", "--nonprivate-reference",
        "--isolation-forest", "--epochs", "5", "--attack-steps", "5", "--attack-samples", "40",
        "--radii", "0", "0.25", "1", "--quiet", "--json", str(out),
    ]))
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    (result,) = results
    for method in ("nonprivate", "private"):
        run = result[method]
        assert 0.0 <= run["auroc"] <= 1.0 and run["lipschitz"] <= 1.0 + 1e-3
        assert run["certified"]["0.0"] == run["auroc"]
        assert run["certified"]["0.25"] >= run["certified"]["1.0"]
        for r, value in run["attack_subset"]["attacked"].items():
            assert value >= run["attack_subset"]["certified"][r] - 1e-12
    assert result["private"]["epsilon"] <= 8.0 + 1e-6 and result["private"]["delta"] == 1e-5
    assert 0.0 <= result["isolation_forest"] <= 1.0


@pytest.mark.slow
def test_recipe_end_to_end_on_digits_images():
    """The pixel path: orthogonal CNN with a dense head, box prior, radii in raw pixel units (16 per unit)."""
    pytest.importorskip("lipdp.engine")
    from recipes import one_class

    (result,) = one_class.run(one_class.parse_args([
        "--dataset", "digits", "--detector", "ocsdf", "--features", "input", "--normal-class", "3", "--epsilon", "8",
        "--epochs", "2", "--batch-size", "32",
        "--newton-steps", "2", "--radii", "0", "0.5", "--quiet",
    ]))
    run = result["private"]
    assert result["raw_radius_factor"] == 16.0  # digits: pixel values 0..16, scaled by 1/16 in the loader
    assert 0.0 <= run["auroc"] <= 1.0 and run["lipschitz"] <= 1.0 + 1e-3
    assert run["certified"]["0.0"] == run["auroc"] >= run["certified"]["0.5"]
    assert run["epsilon"] <= 8.0 + 1e-6
