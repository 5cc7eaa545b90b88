"""LipDPEngine: noise, normalisation, accounting, budget, checkpoints and bad input (issue 4)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lipdp.audit import ScaledNoise
from lipdp import LipDPEngine, PrivacyBudgetExceeded
from lipdp.layers import InputNormClip, SampleCentring
from lipdp.losses import LipschitzCrossEntropy
from lipdp.models import orthogonal_cnn, orthogonal_mlp
from lipdp.noise import effective_noise_multiplier


def make_data(n=64, features=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def private_setup(model=None, batch_size=16, strategy="global", sigma=1.0, lr=0.0, seed=0, **kwargs):
    torch.manual_seed(seed)
    dataset = kwargs.pop("dataset", None) or make_data()
    model = model or nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    engine = LipDPEngine(accountant=kwargs.pop("accountant", "rdp"), seed=seed)
    criterion = kwargs.pop("criterion", None) or LipschitzCrossEntropy()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        data_loader=DataLoader(dataset, batch_size=batch_size), criterion=criterion,
        noise_multiplier=sigma, input_norm_bound=1.0, noise_strategy=strategy, **kwargs)
    return engine, model, optimizer, loader, criterion


@pytest.mark.parametrize("strategy", ["global", "per_layer", "min_energy"])
def test_noise_std_on_zero_gradient_matches_design(strategy):
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128))
    engine, model, optimizer, loader, _ = private_setup(
        model, strategy=strategy, sigma=0.8, dataset=make_data(features=64), batch_size=16)
    optimizer.zero_grad()
    (model(torch.zeros(4, 64)).sum() * 0).backward()  # zero gradient: what remains is the noise
    optimizer.step()
    stds = engine.noise_stds()
    assert effective_noise_multiplier(engine.sensitivities(), stds) == pytest.approx(0.8, rel=1e-9)
    for name, parameter in model.named_parameters():
        if parameter.numel() >= 2000:
            measured = (parameter.grad * 16).std().item()
            assert measured == pytest.approx(stds[name], rel=0.03), name


def test_global_strategy_std_formula():
    engine, model, optimizer, *_ = private_setup(sigma=1.3)
    optimizer.zero_grad()
    optimizer.step()
    deltas = engine.sensitivities()
    expected = 1.3 * math.sqrt(sum(d * d for d in deltas.values()))
    assert all(s == pytest.approx(expected) for s in engine.noise_stds().values())
    # Linear after a unit-norm input with CE: Delta_W = sqrt(2) * 1, Delta_b = sqrt(2).
    assert deltas == pytest.approx({"1.weight": math.sqrt(2), "1.bias": math.sqrt(2)}, rel=1e-5)


def test_gradient_is_normalised_by_expected_not_actual_batch_size():
    engine, model, optimizer, loader, criterion = private_setup(batch_size=16)
    engine.mechanism.noise = ScaledNoise(engine.mechanism.noise, 0.0)  # isolate the deterministic part
    x, y = next(iter(make_data(n=5).tensors[0:1])), make_data(n=5).tensors[1]
    reference = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    nn.CrossEntropyLoss(reduction="sum")(reference(x), y).backward()
    optimizer.zero_grad()
    criterion(model(x), y).backward()
    optimizer.step()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad / 16, msg=name)


def test_accountant_steps_equal_optimizer_steps_including_empty_batches():
    engine, model, optimizer, loader, criterion = private_setup(dataset=make_data(n=20), batch_size=1)
    sizes = []
    for x, y in loader:
        sizes.append(len(x))
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    assert 0 in sizes, "rate 1/20 over 20 steps should give an empty batch"
    assert engine.accountant.total_steps == len(sizes) == loader.steps_per_epoch == 20


def test_loss_grad_clip_bounds_output_gradient_and_lowers_sensitivity():
    engine, model, optimizer, *_ = private_setup(loss_grad_clip=0.5)
    optimizer.zero_grad()
    optimizer.step()
    assert engine.sensitivities()["1.bias"] == pytest.approx(0.5)
    out = model(make_data(n=8).tensors[0])
    captured = {}
    out.register_hook(lambda g: captured.setdefault("g", g))  # runs after the engine's hook
    (out * 100).sum().backward()
    assert captured["g"].norm(dim=1).max() <= 0.5 + 1e-6


def test_virtual_batches_take_one_noisy_step_per_logical_batch():
    engine, model, optimizer, loader, criterion = private_setup(batch_size=32, dataset=make_data(n=64), lr=1.0)
    engine.mechanism.noise = ScaledNoise(engine.mechanism.noise, 0.0)  # isolate the deterministic part
    reference = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    state = engine.sampling_generator.get_state()
    logical = list(loader)
    engine.sampling_generator.set_state(state)
    micro = 0
    with engine.virtual_batches(max_physical_batch_size=5) as batches:
        for x, y in batches:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            last_of_logical = not optimizer.skip_next_step
            optimizer.step()
            micro += 1
            if last_of_logical:
                break
    assert micro == max(1, -(-len(logical[0][0]) // 5))
    assert engine.accountant.total_steps == 1
    x, y = logical[0]
    nn.CrossEntropyLoss(reduction="sum")(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), (q - q.grad / 32).detach())


def test_orthogonium_weights_get_noise_on_the_materialised_weight_then_backpropagate():
    model = orthogonal_cnn((1, 8, 8), 3, widths=(4, 8))
    dataset = TensorDataset(torch.rand(32, 1, 8, 8) / 8, torch.randint(0, 3, (32,)))
    engine, model, optimizer, loader, criterion = private_setup(model, dataset=dataset, lr=0.1)
    keys = set(engine.current_bounds().sensitivities)
    assert "1.weight" in keys and not any("original" in k for k in keys)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for x, y in loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        break
    raw = dict(model.named_parameters())
    assert raw["1.parametrizations.weight.original"].grad is not None
    assert set(engine.noise_stds()) == keys
    assert any(not torch.equal(before[n], p) for n, p in raw.items())
    assert engine.lipschitz_constant() <= 1.01


def test_budget_exceeded_fires_before_the_step_that_would_exceed():
    engine, model, optimizer, loader, criterion = private_setup(
        sigma=2.0, batch_size=16, lr=0.1, max_epsilon=3.0, target_delta=1e-5)
    allowed = engine.accountant.max_additional_steps(2.0, 16 / 64, 3.0, 1e-5)
    assert 0 < allowed < 200
    taken = 0
    with pytest.raises(PrivacyBudgetExceeded, match="max_epsilon"):
        for _ in range(200):
            x, y = make_data(n=4).tensors
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            taken += 1
    assert taken == allowed == engine.accountant.total_steps
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert engine.get_epsilon(1e-5) <= 3.0


RESUME_SCRIPT = textwrap.dedent("""
    import sys, torch, json
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from lipdp import LipDPEngine
    from lipdp.losses import LipschitzCrossEntropy
    from lipdp.models import orthogonal_mlp
    mode, path, steps, save_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    x = torch.randn(64, 8); x = x / x.norm(dim=1, keepdim=True); y = torch.randint(0, 3, (64,))
    model = orthogonal_mlp(8, 3, hidden=(16,))
    engine = LipDPEngine(accountant="prv", seed=7)
    criterion = LipschitzCrossEntropy()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.Adam(model.parameters(), 1e-2),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=16), criterion=criterion,
        noise_multiplier=1.0, input_norm_bound=1.0)
    if mode == "resume":
        engine.load_checkpoint(path)
    done = 0
    while done < steps:
        for xb, yb in loader:
            opt.zero_grad(); criterion(model(xb), yb).backward(); opt.step(); done += 1
            if mode == "full" and done == save_at: engine.save_checkpoint(path)  # saving must not perturb the run
            if done == steps: break
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    print(json.dumps({"params": flat.tolist(), "eps": engine.get_epsilon(1e-5), "steps": engine.accountant.total_steps}))
""")


@pytest.mark.slow
def test_checkpoint_resumed_in_new_process_is_bit_identical(tmp_path):
    import json

    def run(*args):
        out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, *args], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    full = run("full", str(tmp_path / "ckpt.pt"), "8", "4")  # 8 steps, checkpointed after the 4th
    resumed = run("resume", str(tmp_path / "ckpt.pt"), "4", "0")
    assert resumed["params"] == full["params"]
    assert resumed["steps"] == full["steps"] == 8
    assert resumed["eps"] == pytest.approx(full["eps"], rel=1e-12)


# --- bad input -------------------------------------------------------------------------------------
def test_nan_input_is_refused():
    _, model, *_ = private_setup()
    x = make_data(n=4).tensors[0].clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(x)


@pytest.mark.parametrize("bad", [float("inf"), -float("inf")])
def test_infinite_input_is_refused(bad):
    _, model, *_ = private_setup()
    x = make_data(n=4).tensors[0].clone()
    x[2, 5] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x)


def test_huge_finite_inputs_whose_sum_overflows_are_accepted_when_the_model_clips_them():
    model = orthogonal_mlp(8, 3, hidden=(16,))  # Flatten -> InputNormClip -> ...
    _, model, *_ = private_setup(model)
    assert torch.isinf(torch.full((2, 8), 3e38).sum())
    assert model(torch.full((2, 8), 3e38)).shape == (2, 3)


def test_wrong_input_shape_is_refused():
    _, model, *_ = private_setup()
    with pytest.raises(ValueError, match="per-sample shape"):
        model(torch.zeros(4, 9))


def test_inputs_above_the_bound_pass_when_the_model_clips_them_after_a_flatten():
    model = orthogonal_mlp(8, 3, hidden=(16,))  # Flatten -> InputNormClip -> ...
    _, model, *_ = private_setup(model)
    assert model(torch.full((2, 8), 10.0)).shape == (2, 3)


def test_inputs_above_the_bound_pass_when_the_model_centres_them_then_clips_them():
    model = nn.Sequential(SampleCentring(), InputNormClip(1.0), nn.Linear(8, 3))  # raw inputs centred, then clipped
    _, model, *_ = private_setup(model)
    assert model(torch.arange(16.0).view(2, 8)).shape == (2, 3)


def test_centring_without_a_clip_after_it_does_not_excuse_large_inputs():
    model = nn.Sequential(SampleCentring(), nn.Linear(8, 3))
    _, model, *_ = private_setup(model)
    with pytest.raises(ValueError, match="InputNormClip"):
        model(torch.arange(16.0).view(2, 8))


def test_a_clip_layer_wider_than_the_declared_bound_does_not_excuse_large_inputs():
    model = nn.Sequential(nn.Flatten(), InputNormClip(5.0), nn.Linear(8, 3))  # declared bound is 1.0
    _, model, *_ = private_setup(model)
    with pytest.raises(ValueError, match="input_norm_bound"):
        model(torch.full((2, 8), 10.0))


def test_integer_input_is_refused():
    _, model, *_ = private_setup()
    with pytest.raises(TypeError, match="floating point"):
        model(torch.zeros(4, 8, dtype=torch.int64))


def test_input_above_norm_bound_is_refused_without_clip_layer():
    model = nn.Sequential(nn.Linear(8, 3))
    _, model, *_ = private_setup(model)
    with pytest.raises(ValueError, match="InputNormClip"):
        model(torch.ones(2, 8))


def test_batchnorm_model_is_refused_with_path_and_fix():
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\).*Fix"):
        private_setup(model)


def test_non_lipschitz_loss_is_refused():
    with pytest.raises(ValueError, match="MSELoss is not Lipschitz"):
        private_setup(criterion=nn.MSELoss())


@pytest.mark.parametrize("bound", [0, -1.0])
def test_nonpositive_input_norm_bound_is_refused(bound):
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    engine = LipDPEngine(seed=0)
    with pytest.raises(ValueError, match="input_norm_bound"):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=DataLoader(make_data(), batch_size=8), criterion=LipschitzCrossEntropy(),
                            noise_multiplier=1.0, input_norm_bound=bound)


def test_iterable_dataset_is_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(*make_data().tensors)

    model = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    engine = LipDPEngine(seed=0)
    with pytest.raises(TypeError, match="map-style"):
        engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=DataLoader(Stream(), batch_size=8), criterion=LipschitzCrossEntropy(),
                            noise_multiplier=1.0, input_norm_bound=1.0)


def test_mismatched_loss_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        private_setup(criterion=LipschitzCrossEntropy(reduction="sum"))


def test_nan_gradient_releases_nothing():
    engine, model, optimizer, *_ = private_setup()
    optimizer.zero_grad()
    (model(make_data(n=2).tensors[0]).sum() * float("nan")).backward()
    with pytest.raises(FloatingPointError):
        optimizer.step()
    assert engine.accountant.total_steps == 0
