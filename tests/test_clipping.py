"""The same-model DP-SGD baseline: ``make_private(mechanism="clipping", max_grad_norm=C)`` (``lipdp.clipping``).

The clipped sums are checked against torch.func ground truth computed independently (a materialised copy of the
model, per-record gradients of the real loss, the mean over views, clipped jointly to C), on random
architectures and the orthogonal networks, inputs at the norm bound; each record's contribution is checked <= C on
inputs optimised to maximise its gradient; the release is (sum + N(0, sigma^2 C^2)) / B with the same accounting
as the certified mechanism; misuse is refused.
"""

from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lipdp import LipDPEngine
from lipdp.augment import RandomShift
from lipdp.clipping import SQUARED_NORM_ERROR, PerRowGradients, PerSampleClipping, squared_norms
from lipdp.layer_gradients import record_norm_bounds
from lipdp.hooks import RepeatedPassError
from lipdp.losses import LipschitzCrossEntropy
from lipdp.reparametrization import MaterializedWeights
from lipdp.models import orthogonal_cnn, orthogonal_mlp, orthogonal_patch_cnn
from tests.soundness_utils import materialize, random_architecture

CRITERION = LipschitzCrossEntropy(temperature=8.0)


def at_norm_bound(n: int, shape: tuple[int, ...], radius: float, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))
    return x * (radius / x.flatten(1).norm(dim=1)).view(-1, *([1] * len(shape)))


def attach(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float, batch_size: int = 8,
           input_norm_bound: float = 1.0, **kwargs):
    engine = LipDPEngine(seed=3)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size), criterion=kwargs.pop("criterion", CRITERION),
        noise_multiplier=1.0, input_norm_bound=input_norm_bound, mechanism="clipping", max_grad_norm=max_grad_norm,
        **kwargs)
    return engine, model, optimizer, loader


def record_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, views: int = 1) -> dict[str, torch.Tensor]:
    """Ground truth: each record's gradient (mean over its ``views`` view-major rows) on a materialised copy, in the
    model's float32 (a float64 forward differs by more than float error where the loss saturates)."""
    twin = materialize(model).float()
    params = {name: p.detach() for name, p in twin.named_parameters()}

    def loss(params, x, y):
        return CRITERION(functional_call(twin, params, (x[None],)), y[None])

    rows = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {name: value.double().reshape(views, -1, *value.shape[1:]).mean(0) for name, value in rows.items()}


def clipped_sum(per_record: dict[str, torch.Tensor], max_grad_norm: float) -> dict[str, torch.Tensor]:
    """sum_i clip_C(g_i), and (key None) sum_i ||clip_C(g_i)||: the scale of float error in the sum."""
    norms = sum(value.flatten(1).pow(2).sum(1) for value in per_record.values()).sqrt()
    factors = (max_grad_norm / norms).clamp(max=1.0)
    return {**{name: torch.tensordot(factors, value, dims=1) for name, value in per_record.items()},
            None: (factors * norms).sum()}


def lipdp_sums(engine, model, x, y) -> dict[str, torch.Tensor]:
    """The clipper's sums after one ordinary forward/backward of the batch (x, y) with a mean loss."""
    engine.optimizer.zero_grad()
    CRITERION(model(x), y).backward()
    return {name: value.double() for name, value in engine.mechanism.clipping.sums.items()}


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal up to float32 error (lipdp computes in the model's float32), relative to sum_i ||clip_C(g_i)||."""
    expected = dict(expected)
    scale = expected.pop(None).item()
    assert set(got) == set(expected)
    for name in expected:
        assert (got[name] - expected[name]).norm().item() <= 1e-5 * scale, name


def models():
    # Seed 9 rescales its inputs onto a sphere of radius 2 > X0 = 1 (InputNormClip mode "scale"): the engine refuses
    # it before any gradient, which is not what this test is about.
    for seed in [seed for seed in range(16) if seed != 9]:
        architecture = random_architecture(seed)
        yield f"random{seed}", copy.deepcopy(architecture.model), architecture.input_shape, architecture.input_radius, \
            architecture.input_norm_bound
    torch.manual_seed(0)
    yield "orthogonal_cnn", orthogonal_cnn((1, 8, 8), 3, widths=(4, 8)), (1, 8, 8), 1.0, 1.0
    yield "orthogonal_mlp", orthogonal_mlp(12, 3, hidden=(16,)), (12,), 1.0, 1.0
    yield "orthogonal_patch_cnn", orthogonal_patch_cnn((1, 8, 8), 3, widths=(4, 8), dense_width=16, depth=2), \
        (1, 8, 8), 1.0, 1.0
    yield "orthogonal_patch_cnn_28", orthogonal_patch_cnn((1, 28, 28), 3, widths=(4,), dense_width=64), \
        (1, 28, 28), 1.0, 1.0


@pytest.mark.parametrize("name, model, shape, radius, bound", list(models()), ids=lambda v: v if isinstance(v, str) else "")
def test_clipped_sums_match_torch_func_ground_truth(name, model, shape, radius, bound):
    x = at_norm_bound(16, shape, radius, seed=1)
    classes = model(x[:1]).shape[-1]
    y = torch.arange(16) % classes
    truth = record_gradients(model, x, y)
    norms = sum(v.flatten(1).pow(2).sum(1) for v in truth.values()).sqrt()
    max_grad_norm = norms.median().item()  # half the records clipped, half not
    engine, private, _, _ = attach(model, x, y, max_grad_norm, input_norm_bound=bound)
    assert_close(lipdp_sums(engine, private, x, y), clipped_sum(truth, max_grad_norm))


@pytest.mark.parametrize("network", ["cnn", "patch"])  # both take the replay: K views give dense layers K rows
def test_views_are_averaged_per_record_before_clipping(network):
    torch.manual_seed(0)
    model = orthogonal_cnn((1, 8, 8), 3, widths=(4,)) if network == "cnn" else \
        orthogonal_patch_cnn((1, 8, 8), 3, widths=(4,), dense_width=64)
    x, y = at_norm_bound(12, (1, 8, 8), 1.0, seed=2), torch.arange(12) % 3
    views = torch.cat([x, RandomShift(1)(x, torch.Generator().manual_seed(0))])
    truth = record_gradients(model, views, y.repeat(2), views=2)
    engine, private, _, _ = attach(model, x, y, 0.3, views=2, augment=RandomShift(1))
    assert_close(lipdp_sums(engine, private, views, y.repeat(2)), clipped_sum(truth, 0.3))


def test_a_record_contributes_at_most_C_even_at_inputs_that_maximise_its_gradient():
    torch.manual_seed(0)
    model = orthogonal_cnn((1, 8, 8), 3, widths=(4, 8))
    reference = copy.deepcopy(model)
    y = torch.tensor([0])
    x = at_norm_bound(1, (1, 8, 8), 1.0, seed=4).requires_grad_(True)
    search = torch.optim.Adam([x], lr=0.05)
    for _ in range(30):  # gradient ascent on the record's gradient norm (torch.func ground truth), on the sphere
        point = x / x.norm()
        twin = materialize(reference)
        params = dict(twin.named_parameters())
        gradients = torch.autograd.grad(CRITERION(functional_call(twin, params, (point.double(),)), y),
                                        list(params.values()), create_graph=True)
        loss = -sum(g.pow(2).sum() for g in gradients)
        search.zero_grad()
        loss.backward()
        search.step()
    point = (x / x.norm()).detach()
    largest = record_gradients(reference, point, y)
    norm = sum(v.pow(2).sum() for v in largest.values()).sqrt().item()
    max_grad_norm = norm / 4  # the optimised record's gradient is 4 C: it must be clipped to C
    engine, private, _, _ = attach(model, point.repeat(8, 1, 1, 1), y.repeat(8), max_grad_norm)
    sums = lipdp_sums(engine, private, point, y)
    assert sum(v.pow(2).sum() for v in sums.values()).sqrt().item() == pytest.approx(max_grad_norm, rel=1e-5)


@pytest.mark.parametrize("columns", [1, 63, 64, 65, 4097, 200_704])
def test_squared_norms_are_within_their_stated_error_and_the_margin_makes_them_upper_bounds(columns):
    """Float32 block norms summed in float64 against the exact float64 sum, on rows built to stress the sum: many
    equal coordinates (rounding accumulates), one coordinate dominating tiny ones, a wide dynamic range, zeros."""
    generator = torch.Generator().manual_seed(columns)
    rows = torch.stack([
        torch.full((columns,), 0.1),
        torch.cat([torch.tensor([1e3]), torch.full((columns - 1,), 1e-3)]),
        torch.randn(columns, generator=generator) * torch.logspace(-6, 6, columns),
        torch.randn(columns, generator=generator),
        torch.zeros(columns),
    ])
    exact = rows.double().pow(2).sum(1)
    computed = squared_norms(rows)
    assert ((computed - exact).abs() <= SQUARED_NORM_ERROR * exact).all()
    assert (computed * (1 + SQUARED_NORM_ERROR) >= exact).all()
    assert computed[-1] == 0.0


def plain_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))


def test_the_release_is_the_clipped_sum_plus_sigma_C_noise_over_B_with_the_same_accounting():
    x, y = at_norm_bound(64, (20,), 1.0), torch.arange(64) % 4
    engine, model, optimizer, _ = attach(plain_mlp(), x, y, max_grad_norm=0.1, batch_size=16)
    sums = lipdp_sums(engine, model, x[:16], y[:16])
    optimizer.step()
    stds = engine.noise_stds()
    assert set(stds.values()) == {engine.noise_multiplier * 0.1}
    assert set(engine.sensitivities().values()) == {0.1}
    noise = torch.cat([(p.grad.double() - sums[name] / 16).flatten() * 16 for name, p in model.named_parameters()])
    assert noise.std().item() == pytest.approx(0.1 * engine.noise_multiplier, rel=0.05)  # 1668 coordinates
    certified, other = LipDPEngine(seed=3), plain_mlp()
    certified.make_private(module=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
                           data_loader=DataLoader(TensorDataset(x, y), batch_size=16), criterion=CRITERION,
                           noise_multiplier=1.0, input_norm_bound=1.0)
    certified.accountant.step(noise_multiplier=1.0, sample_rate=16 / 64)
    assert engine.get_epsilon(1e-5) == certified.get_epsilon(1e-5)


def test_micro_batches_accumulate_the_same_clipped_sum_and_sums_are_reset_after_the_step():
    x, y = at_norm_bound(32, (20,), 1.0), torch.arange(32) % 4
    truth = clipped_sum(record_gradients(plain_mlp(), x, y), 0.05)
    engine, model, optimizer, _ = attach(plain_mlp(), x, y, max_grad_norm=0.05, batch_size=32)
    optimizer.zero_grad()
    engine.passes.allow()  # two micro-batches of disjoint records in this step (as virtual_batches does)
    for part in (slice(0, 10), slice(10, 32)):  # a mean loss per micro-batch: the output hook makes it a sum
        CRITERION(model(x[part]), y[part]).backward()
    assert_close({name: value.double() for name, value in engine.mechanism.clipping.sums.items()}, truth)
    optimizer.step()
    assert engine.mechanism.clipping.sums == {}


def test_a_record_reaching_the_loss_twice_is_refused_under_clipping_too():
    x, y = at_norm_bound(16, (20,), 1.0), torch.arange(16) % 4
    engine, model, optimizer, _ = attach(plain_mlp(), x, y, max_grad_norm=0.1)
    optimizer.zero_grad()
    (CRITERION(model(x), y) + CRITERION(model(x), y)).backward()
    with pytest.raises(RepeatedPassError):
        optimizer.step()
    assert engine.accountant.total_steps == 0


def test_training_with_clipping_learns():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 20, generator=generator)
    y = torch.arange(256) % 4
    x = centres[y] + 0.3 * torch.randn(256, 20, generator=generator)
    x = x / x.norm(dim=1, keepdim=True)
    engine = LipDPEngine(seed=0)
    torch.manual_seed(0)
    model = orthogonal_mlp(20, 4, hidden=(32,))
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=128), criterion=CRITERION, noise_multiplier=0.5,
        input_norm_bound=1.0, mechanism="clipping", max_grad_norm=1.0)
    for _ in range(15):
        for xb, yb in loader:
            optimizer.zero_grad()
            CRITERION(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean().item() > 0.8


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_grad_norm=1.0), TypeError, "mechanism='clipping'"),
    (dict(mechanism="clipping"), ValueError, "needs the norm C.*max_grad_norm=C"),
    (dict(mechanism="clipping", max_grad_norm=-1.0), ValueError, "max_grad_norm"),
    (dict(mechanism="clipping", max_grad_norm=1.0, noise_strategy="per_layer"), ValueError, "global"),
    (dict(mechanism="clip"), ValueError, "mechanism must be one of"),
])
def test_misuse_of_the_mechanism_arguments_is_refused(kwargs, error, match):
    x, y = at_norm_bound(16, (20,), 1.0), torch.arange(16) % 4
    model = plain_mlp()
    with pytest.raises(error, match=match):
        LipDPEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   data_loader=DataLoader(TensorDataset(x, y), batch_size=8), criterion=CRITERION,
                                   noise_multiplier=1.0, input_norm_bound=1.0, **kwargs)


def test_the_orthogonal_networks_clip_from_their_layers_rows_and_other_models_by_the_replay(monkeypatch):
    """The layer path (lipdp.layer_gradients) covers models whose trainable tensors all sit in dense / one-group
    conv layers, where forming per-record gradients costs no more than the one-row layers' forward: the patch CNN
    and the MLP, not the 3x3 orthogonal CNN; a grouped convolution sends the model to the torch.func replay. Both
    match the ground truth (test_clipped_sums_match_torch_func_ground_truth runs random models of both kinds)."""
    x, y = at_norm_bound(8, (1, 28, 28), 1.0), torch.arange(8) % 3
    torch.manual_seed(0)
    models = {"patch": orthogonal_patch_cnn((1, 28, 28), 3, widths=(4,)), "mlp": orthogonal_mlp(784, 3, hidden=(8,)),
              "cnn": orthogonal_cnn((1, 28, 28), 3, widths=(4, 8))}
    attached = {name: attach(model, x, y, 1.0) for name, model in models.items()}

    def replay_called(*args):
        raise AssertionError("replay")

    monkeypatch.setattr(PerRowGradients, "__call__", replay_called)
    for name, (engine, private, _, _) in attached.items():
        assert engine.mechanism.clipping.layers is not None
        if name == "cnn":
            with pytest.raises(AssertionError, match="replay"):
                lipdp_sums(engine, private, x, y)
        else:
            assert lipdp_sums(engine, private, x, y)
    monkeypatch.undo()
    x = at_norm_bound(8, (1, 8, 8), 1.0)
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 3))
    truth = clipped_sum(record_gradients(grouped, x, y), 0.1)
    engine, private, _, _ = attach(grouped, x, y, 0.1)
    assert engine.mechanism.clipping.layers is None
    assert_close(lipdp_sums(engine, private, x, y), truth)


def test_a_layer_run_twice_in_one_forward_is_clipped_by_the_replay():
    """The engine refuses a shared layer (the bound analysis cannot bound it), but the clipper does not rely on that:
    a pass where a layer ran twice is clipped by the replay, whose record gradients include both uses."""
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 3))
    x, y = at_norm_bound(8, (6,), 1.0), torch.arange(8) % 3
    truth = clipped_sum(record_gradients(model, x, y), 0.2)
    clipper = PerSampleClipping(model, MaterializedWeights(model), dict(model.named_parameters()), 0.2)
    assert clipper.layers is not None
    (CRITERION(model(x), y) * len(x)).backward()  # a summed loss: each row's output gradient is its record's
    assert_close({name: value.double() for name, value in clipper.sums.items()}, truth)


def exact_square_norm(rows: torch.Tensor, grads: torch.Tensor, views: int, bias: bool) -> list[Fraction]:
    """||sum_p g_p a_p^T||^2 (+ ||sum_p g_p||^2) per record in exact rational arithmetic on the float rows."""
    records = rows.shape[0] // views
    result = []
    for r in range(records):
        a = [[Fraction(v) for v in row] for k in range(views) for row in rows[k * records + r].double().tolist()]
        g = [[Fraction(v) for v in row] for k in range(views) for row in grads[k * records + r].double().tolist()]
        total = sum(sum(gp[o] * ap[i] for gp, ap in zip(g, a)) ** 2
                    for o in range(len(g[0])) for i in range(len(a[0])))
        if bias:
            total += sum(sum(gp[o] for gp in g) ** 2 for o in range(len(g[0])))
        result.append(total)
    return result


@pytest.mark.parametrize("positions, views, bias", [(1, 1, True), (1, 1, False), (1, 3, True), (7, 1, True),
                                                     (5, 2, False)])
def test_layer_norm_bounds_are_upper_bounds_of_the_exact_norms_even_where_the_sum_cancels(positions, views, bias):
    """Rows built to stress the float sums: random rows, rows whose products cancel to (almost) zero, equal rows,
    a wide dynamic range; the bound must be >= the exact rational norm and within 1e-6 of it (not loose)."""
    generator = torch.Generator().manual_seed(positions * 10 + views)
    n = 4 * views
    rows = torch.randn(n, positions, 3, generator=generator)
    grads = torch.randn(n, positions, 2, generator=generator)
    records = n // views
    rows[1::records] = 0.1  # record 1: equal rows
    grads[2::records] *= torch.logspace(-6, 6, positions * 2).reshape(positions, 2)  # record 2: dynamic range
    if positions * views > 1:  # record 3: its second row undoes its first (exact cancellation, up to rounding)
        flat_rows, flat_grads = rows[3::records].reshape(-1, 3).clone(), grads[3::records].reshape(-1, 2).clone()
        flat_rows[1], flat_grads[1] = flat_rows[0] * (1 + 2.0**-20), -flat_grads[0]
        rows[3::records] = flat_rows.reshape(views, positions, 3)
        grads[3::records] = flat_grads.reshape(views, positions, 2)
    bounds = record_norm_bounds(rows, grads, views, bias)
    for bound, exact in zip(bounds.tolist(), exact_square_norm(rows, grads, views, bias)):
        assert Fraction(bound) >= exact
        scale = float(grads.double().pow(2).sum() * rows.double().pow(2).sum())
        assert bound <= float(exact) * (1 + 1e-6) + 1e-12 * scale
