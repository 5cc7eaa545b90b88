"""The bound plan (docs/design.md §3): cached and drifted numbers are never below a fresh exact analysis.

Over many optimizer steps with large learning rates on random dense and conv models, the engine's plan (rules
resolved once, Weyl drift ||W||_2 <= ||W0||_2 + c ||W - W0||_F between exact refreshes) must give, at every step,
a Lipschitz constant and sensitivities >= a fresh exact analysis of the same weights, and it must refresh
exactly every ``refresh_every`` steps.
"""

from __future__ import annotations

import random

import pytest
import torch
from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lipdp
from lipdp import LipDPEngine
from lipdp.bounds import CertifiedNormCache
from lipdp.layers import GlobalL2Pool2d, InputNormClip, L2NormPool2d
from lipdp.losses import LipschitzCrossEntropy
from lipdp.optimizer import BOUNDS_KEY

REFRESH_EVERY = 4


def _dense_model(rng: random.Random, features: int) -> nn.Module:
    widths = [features] + [rng.choice([6, 12, 24]) for _ in range(rng.randint(1, 3))] + [3]
    layers: list[nn.Module] = [InputNormClip(1.0)]
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        linear = OrthoLinear(a, b, bias=rng.random() < 0.5) if rng.random() < 0.3 else nn.Linear(a, b, bias=rng.random() < 0.7)
        layers.append(linear)
        if i < len(widths) - 2:
            layers.append(nn.ReLU() if rng.random() < 0.5 else MaxMin())
    return nn.Sequential(*layers)


def _conv_model(rng: random.Random, channels: int) -> nn.Module:
    width = rng.choice([4, 6])
    stride = rng.choice([1, 2])
    first = (AdaptiveOrthoConv2d(channels, width, 3, padding="same", padding_mode="zeros", bias=False)
             if rng.random() < 0.4 else
             nn.Conv2d(channels, width, 3, stride=stride, padding=1, bias=rng.random() < 0.5))
    return nn.Sequential(InputNormClip(1.0), first, MaxMin(), L2NormPool2d(2),
                         nn.Conv2d(width, width, 3, padding=1, padding_mode=rng.choice(["zeros", "circular"])),
                         nn.ReLU(), GlobalL2Pool2d(), nn.Linear(width, 3))


def _engine(model: nn.Module, shape: tuple[int, ...], optimizer: str, lr: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, *shape, generator=generator)
    x = x / x.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))
    y = torch.randint(0, 3, (64,), generator=generator)
    engine = LipDPEngine(accountant="rdp", seed=seed)
    opt = (torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    criterion = LipschitzCrossEntropy(temperature=6.0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=16),
        criterion=criterion, noise_multiplier=0.05, input_norm_bound=1.0, input_shape=shape)
    engine.mechanism.norm_cache.refresh_every = REFRESH_EVERY
    engine.mechanism.norm_cache.refresh_tolerance = 1e9  # only the clock refreshes: the drift path is exercised
    return engine, model, opt, loader, criterion


def _fresh(engine: LipDPEngine, model: nn.Module, shape) -> lipdp.BoundReport:
    mechanism = engine.mechanism
    return lipdp.analyze(model, mechanism.config.input_norm_bound, mechanism.config.loss_lipschitz, shape,
                         norm_cache=CertifiedNormCache(), weights=mechanism._weights())


@pytest.mark.parametrize("seed", range(6))
def test_plan_numbers_never_below_a_fresh_exact_analysis(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if seed % 2 == 0:
        shape = (rng.choice([5, 8]),)
        model = _dense_model(rng, shape[0])
    else:
        shape = (rng.choice([1, 2]), 8, 8)
        model = _conv_model(rng, shape[0])
    optimizer, lr = rng.choice([("sgd", 0.2), ("adam", 0.05)])
    engine, model, opt, loader, criterion = _engine(model, shape, optimizer, lr, seed)
    cache = engine.mechanism.norm_cache
    operators = len(engine.mechanism.plan.context.operator_requests)
    assert operators > 0
    loose = False
    steps = 0
    while steps < 3 * REFRESH_EVERY + 1:
        for x, y in loader:
            before = cache.exact_computations
            # The report the step will use (same weights as the step's own evaluation), then the step itself.
            planned = engine.current_bounds()
            fresh = _fresh(engine, model, shape)
            assert planned.lipschitz >= fresh.lipschitz * (1 - 1e-12), (steps, planned.lipschitz, fresh.lipschitz)
            assert planned.output_bound >= fresh.output_bound * (1 - 1e-12)
            for name, value in fresh.sensitivities.items():
                assert planned.sensitivities[name] >= value * (1 - 1e-12), (steps, name)
            loose |= planned.lipschitz > fresh.lipschitz * (1 + 1e-4)
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
            assert engine.sensitivities() == planned.sensitivities
            refreshed = cache.exact_computations - before
            assert refreshed == (operators if steps % REFRESH_EVERY == 0 and steps > 0 else 0), steps
            steps += 1
            if steps > 3 * REFRESH_EVERY:
                break
    assert loose, "the learning rate must move the weights enough for the drift path to matter"


def test_drift_cache_refreshes_every_k_steps_and_only_grows_bounds() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    cache = CertifiedNormCache(refresh_tolerance=1e9, refresh_every=3)
    plan = lipdp.bounds.BoundPlan(nn.Sequential(layer), 1.0, 1.0, (6,), norm_cache=cache)
    counts = []
    for step in range(7):
        with torch.no_grad():
            layer.weight.add_(0.5 * torch.randn_like(layer.weight))
        value = plan.report().lipschitz
        assert value >= torch.linalg.matrix_norm(layer.weight.double(), ord=2).item()
        counts.append(cache.exact_computations)
        cache.advance()
    assert counts == [1, 1, 1, 2, 2, 2, 3]


def test_plan_sees_a_dropout_switched_to_training_and_an_unfrozen_parameter() -> None:
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).eval()
    model[3].bias.requires_grad_(False)
    plan = lipdp.bounds.BoundPlan(model, 1.0, 1.0, (4,), norm_cache=CertifiedNormCache())
    assert "3.bias" not in plan.report().sensitivities
    model[3].bias.requires_grad_(True)
    assert "3.bias" in plan.report().sensitivities
    model.train()
    with pytest.raises(lipdp.UnsupportedModuleError, match="dropout"):
        plan.report()


def test_plan_rebuilds_when_a_layer_is_swapped() -> None:
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    plan = lipdp.bounds.BoundPlan(model, 1.0, 1.0, (4,), norm_cache=CertifiedNormCache())
    model[3] = nn.Linear(4, 2)
    with torch.no_grad():
        model[3].weight.mul_(10)
    report = plan.report()
    assert report.lipschitz == pytest.approx(lipdp.analyze(model, 1.0, 1.0, (4,), norm_cache=CertifiedNormCache()).lipschitz)
    model[2] = nn.GELU()
    with pytest.raises(lipdp.ModelValidationError):
        plan.report()


def test_checkpointed_references_are_recomputed_not_trusted(tmp_path) -> None:
    torch.manual_seed(0)
    shape = (5,)
    engine, model, opt, loader, criterion = _engine(_dense_model(random.Random(0), 5), shape, "adam", 0.05, 0)
    for x, y in loader:
        opt.zero_grad(); criterion(model(x), y).backward(); opt.step()
    state = opt.state_dict()
    assert state[BOUNDS_KEY]["steps"] == engine.accountant.total_steps
    cache = engine.mechanism.norm_cache
    cache.load_state_dict(state[BOUNDS_KEY])
    before = cache.exact_computations
    restored = engine.current_bounds()
    assert cache.exact_computations > before  # adopted references: exact norms recomputed from the saved W0
    assert restored.lipschitz >= _fresh(engine, model, shape).lipschitz


def test_torch_compiled_model_trains_under_the_engine() -> None:
    """``torch.compile(model)`` (the OptimizedModule wrapper) gets the bounds of the model it wraps."""
    torch.manual_seed(0)
    shape = (5,)
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(5, 8), MaxMin(), OrthoLinear(8, 3))
    expected = lipdp.analyze(model, 1.0, LipschitzCrossEntropy(6.0).lipschitz_constant, shape,
                             norm_cache=CertifiedNormCache()).sensitivities
    engine, compiled, opt, loader, criterion = _engine(torch.compile(model), shape, "adam", 0.05, 0)
    before = model[1].weight.detach().clone()
    for x, y in loader:
        opt.zero_grad()
        criterion(compiled(x), y).backward()
        opt.step()
    assert engine.accountant.total_steps == len(loader)
    assert set(engine.sensitivities()) == {f"_orig_mod.{name}" for name in expected}
    assert not torch.equal(model[1].weight.detach(), before)
