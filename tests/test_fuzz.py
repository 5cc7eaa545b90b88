"""Bad input and abuse, fuzzed (hypothesis): the public API answers with a clear error, or takes a private step
whose noise is the data-independent, certified one. Never a silent step with wrong noise or a broken bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lipdp.audit import ScaledNoise
from lipdp import LipDPEngine, PrivacyBudgetExceeded
from lipdp.layers import InputNormClip
from lipdp.losses import LipschitzCrossEntropy
from lipdp.noise import effective_noise_multiplier
from lipdp.sampling import PoissonBatchSampler

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
CLEAR_ERRORS = (ValueError, TypeError)
ROOT2 = math.sqrt(2)

absurd = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2, True, 1e-300, 1e300, float("nan"), float("inf"), -float("inf")]),
    st.integers(-5, 5),
    st.just("1.0"),
)


def unit_rows(n: int, features: int = 8, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def attach(n=32, batch_size=8, clip_layer=True, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(*([InputNormClip(1.0)] if clip_layer else []), nn.Linear(8, 3))
    dataset = TensorDataset(unit_rows(n), torch.randint(0, 3, (n,)))
    engine = LipDPEngine(accountant="rdp", seed=0)
    arguments = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                     data_loader=DataLoader(dataset, batch_size=batch_size), criterion=LipschitzCrossEntropy(),
                     noise_multiplier=1.0, input_norm_bound=1.0)
    arguments.update(kwargs)
    model, optimizer, loader = engine.make_private(**arguments)
    return engine, model, optimizer, loader


def parameters_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_certified_step(engine: LipDPEngine, sigma: float, clip: float | None, bound: float) -> None:
    """One step was accounted, with sigma_eff = sigma and the analytic sensitivities of Linear after a clip."""
    lipschitz = ROOT2 if clip is None else min(ROOT2, clip)
    deltas = engine.sensitivities()
    (weight,) = (name for name in deltas if name.endswith("weight"))
    assert deltas[weight] == pytest.approx(lipschitz * min(1.0, bound))
    assert effective_noise_multiplier(deltas, engine.noise_stds()) == pytest.approx(sigma, rel=1e-9)
    assert engine.accountant.total_steps == 1


VALID = {
    "noise_multiplier": st.floats(0.05, 20), "input_norm_bound": st.floats(1e-3, 1e3),
    "loss_grad_clip": st.one_of(st.none(), st.floats(1e-3, 10)), "max_epsilon": st.none() | st.floats(0.1, 50),
    "target_delta": st.floats(1e-9, 0.5), "noise_strategy": st.sampled_from(["global", "per_layer", "min_energy"]),
}


@FUZZ
@given(data=st.data(), corrupted=st.sets(st.sampled_from(sorted(VALID)), max_size=2), n=st.integers(0, 33),
       batch_size=st.integers(-2, 40))
def test_hyper_parameters_give_a_clear_error_or_a_certified_step(data, corrupted, n, batch_size):
    """A valid configuration with up to two fields replaced by absurd values (and any dataset/batch size)."""
    config = {name: data.draw(absurd if name in corrupted else strategy, label=name)
              for name, strategy in VALID.items()}
    sigma, bound, clip = config["noise_multiplier"], config["input_norm_bound"], config["loss_grad_clip"]
    try:
        engine, model, optimizer, loader = attach(n=n, batch_size=batch_size, **config)
    except CLEAR_ERRORS as error:
        assert str(error)
        return
    before = parameters_of(model)
    x, y = next(iter(loader))
    try:
        optimizer.zero_grad()
        LipschitzCrossEntropy()(model(x), y).backward()  # e.g. unit-norm data above input_norm_bound: refused
        optimizer.step()
    except (ValueError, PrivacyBudgetExceeded, FloatingPointError) as error:  # nothing released, nothing counted
        assert str(error) and engine.accountant.total_steps == 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return
    assert_certified_step(engine, sigma, clip, bound)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    event("certified step")


@FUZZ
@given(batch=st.integers(0, 5), shape=st.sampled_from([(8,), (7,), (9,), (8, 1), ()]),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]),
       scale=st.sampled_from([0.0, 1e-30, 1.0, 1e3, 1e30]), poison=st.sampled_from([None, "nan", "inf", "-inf"]),
       clip_layer=st.booleans())
def test_bad_inputs_are_refused_or_take_the_certified_data_independent_step(batch, shape, dtype, scale, poison,
                                                                            clip_layer):
    engine, model, optimizer, _ = attach(clip_layer=clip_layer, noise_multiplier=0.7)
    x = (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch)) * scale)
    if poison is not None and x.numel():
        x.view(-1)[0] = float(poison)
    x = x.to(dtype)
    before = parameters_of(model)
    try:
        optimizer.zero_grad()
        LipschitzCrossEntropy()(model(x), torch.zeros(batch, dtype=torch.long)).backward()
        optimizer.step()
    except (ValueError, TypeError, RuntimeError, FloatingPointError) as error:  # torch's dtype errors included
        assert str(error) and engine.accountant.total_steps == 0
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return
    # accepted: a well-formed input within the bound, and the noise did not depend on it
    assert shape == (8,) and poison is None or batch == 0
    assert_certified_step(engine, 0.7, None, 1.0)


@FUZZ
@given(factor=st.one_of(st.floats(-1e30, 1e30), st.sampled_from([1e30, -1e30, 1e6, float("nan"), float("inf")])),
       batch=st.integers(1, 8), clip=st.sampled_from([None, 0.5]))
def test_an_abused_loss_never_breaks_the_sensitivity_bound(factor, batch, clip):
    """Back-propagating another loss than the declared criterion (scaled, negated, NaN): the step is refused,
    or each sample's logit gradient is clipped at the certified constant, so the summed gradient stays within
    batch x Delta in every group (checked with the noise scaled to zero by the audit's broken noise source)."""
    engine, model, optimizer, _ = attach(loss_grad_clip=clip)
    engine.mechanism.noise = ScaledNoise(engine.mechanism.noise, 0.0)  # isolate the deterministic part
    x, y = unit_rows(batch, seed=1), torch.arange(batch) % 3
    optimizer.zero_grad()
    (LipschitzCrossEntropy()(model(x), y) * factor).backward()
    try:
        optimizer.step()
    except FloatingPointError:
        assert not math.isfinite(factor) and engine.accountant.total_steps == 0
        return
    deltas = engine.sensitivities()
    for name, parameter in model.named_parameters():
        summed = parameter.grad * engine.mechanism.config.expected_batch_size
        assert summed.norm().item() <= batch * deltas[name] * (1 + 1e-4), name


@FUZZ
@given(n=st.integers(-3, 50), rate=absurd, steps=st.integers(0, 3))
def test_poisson_sampler_arguments(n, rate, steps):
    try:
        sampler = PoissonBatchSampler(n, rate, steps, torch.Generator().manual_seed(0))
    except CLEAR_ERRORS as error:
        assert str(error)
        return
    assert n > 0 and 0 < rate <= 1
    batches = list(sampler)
    assert len(batches) == steps and all(0 <= i < n for batch in batches for i in batch)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(target=absurd, epochs=absurd, n=st.integers(0, 40))
def test_make_private_with_epsilon_arguments(target, epochs, n):
    torch.manual_seed(0)
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    dataset = TensorDataset(unit_rows(n), torch.zeros(n, dtype=torch.long))
    engine = LipDPEngine(accountant="rdp", seed=0)
    try:
        engine.make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(dataset, batch_size=min(8, max(n, 1))), criterion=LipschitzCrossEntropy(),
            target_epsilon=target, target_delta=1e-5, epochs=epochs, input_norm_bound=1.0)
    except CLEAR_ERRORS as error:
        assert str(error)
        return
    assert math.isfinite(engine.noise_multiplier) and engine.noise_multiplier > 0
