"""The mechanism on a CUDA device (docs/design.md §3 "Device"): noise drawn there, bounds equal to the CPU ones.

The CUDA tests are skipped without CUDA; ``python -m benchmarks.gpu`` runs them (``pytest -m gpu``). The last two
tests check the CPU-checkable parts of that script (no marker: they run everywhere).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lipdp
from lipdp import LipDPEngine
from lipdp.bounds import CertifiedNormCache
from lipdp.losses import LipschitzCrossEntropy
from lipdp.models import orthogonal_cnn, orthogonal_mlp
from lipdp.noise import GaussianNoise

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPE = (1, 12, 12)


def _private(model, device: str):
    x = torch.rand(64, *SHAPE)
    y = torch.randint(0, 10, (64,))
    engine = LipDPEngine(accountant="rdp", seed=0)
    model, optimizer, loader = engine.make_private(
        module=model.to(device), optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=16), criterion=LipschitzCrossEntropy(8.0),
        noise_multiplier=1.0, input_norm_bound=1.0, input_shape=SHAPE)
    # The engine owns its generator's device; the mechanism draws on the gradients' device from a generator there.
    engine.mechanism.noise = GaussianNoise(torch.Generator(device=device).manual_seed(1))
    return engine, model, optimizer, loader


@pytest.mark.gpu
@needs_cuda
def test_cuda_model_trains_with_noise_on_cuda_and_bounds_equal_the_cpu_ones() -> None:
    torch.manual_seed(0)
    cpu_model = orthogonal_cnn(SHAPE, 10, widths=(8, 16))
    engine, model, optimizer, loader = _private(copy.deepcopy(cpu_model), "cuda")
    criterion = LipschitzCrossEntropy(8.0)
    before = [p.detach().clone() for p in model.parameters()]
    for step, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        criterion(model(x.cuda()), y.cuda()).backward()
        optimizer.step()
        assert all(p.grad is None or p.grad.is_cuda for p in model.parameters())
        if step == 2:
            break
    assert engine.accountant.total_steps == 3
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    cuda_bounds = engine.current_bounds()
    cpu_copy = copy.deepcopy(model).cpu()
    cpu_bounds = lipdp.analyze(cpu_copy, 1.0, engine.mechanism.config.loss_lipschitz, SHAPE,
                               norm_cache=CertifiedNormCache())
    for name, value in cpu_bounds.sensitivities.items():
        assert cuda_bounds.sensitivities[name] >= value * (1 - 1e-9)
        assert cuda_bounds.sensitivities[name] == pytest.approx(value, rel=1e-3)


@pytest.mark.gpu
@needs_cuda
def test_noise_is_drawn_on_the_gradients_device() -> None:
    grads = {"a": torch.zeros(3, 4, device="cuda"), "b": torch.zeros(5, device="cuda")}
    draws = GaussianNoise(torch.Generator(device="cuda").manual_seed(0)).sample(grads, {"a": 1.0, "b": 2.0})
    assert all(d.is_cuda and d.shape == grads[k].shape for k, d in draws.items())


@pytest.mark.gpu
@needs_cuda
def test_cuda_dense_bounds_equal_cpu_bounds_at_make_private() -> None:
    torch.manual_seed(0)
    model = orthogonal_mlp(8, 3, hidden=(16,))
    cpu = lipdp.analyze(model, 1.0, 1.0, (8,), norm_cache=CertifiedNormCache()).sensitivities
    gpu = lipdp.analyze(copy.deepcopy(model).cuda(), 1.0, 1.0, (8,), norm_cache=CertifiedNormCache()).sensitivities
    assert gpu == pytest.approx(cpu, rel=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_clipping_mechanism_on_cuda_matches_the_cpu_clipped_sums() -> None:
    """mechanism='clipping' on a CUDA model: per-record gradients (the layer rows, lipdp.layer_gradients) and clipped
    sums equal the CPU ones."""
    torch.manual_seed(0)
    cpu_model = orthogonal_cnn(SHAPE, 10, widths=(8, 16))
    x = torch.rand(16, *SHAPE)
    y = torch.arange(16) % 10
    sums = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(cpu_model).to(device)
        engine = LipDPEngine(seed=0)
        model, optimizer, _ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=16), criterion=LipschitzCrossEntropy(8.0),
            noise_multiplier=1.0, input_norm_bound=1.0, mechanism="clipping", max_grad_norm=0.1)
        optimizer.zero_grad()
        LipschitzCrossEntropy(8.0)(model(x.to(device)), y.to(device)).backward()
        sums[device] = {name: value.cpu() for name, value in engine.mechanism.clipping.sums.items()}
        optimizer.step()
        assert all(p.grad is None or p.grad.device.type == device for p in model.parameters())
    for name, value in sums["cpu"].items():
        assert torch.allclose(sums["cuda"][name], value, atol=1e-5 * 16 * 0.1)


# --- benchmarks/gpu.py, the parts a CPU can check ---------------------------------------------------------------
def test_gpu_script_refuses_without_cuda_in_one_line(monkeypatch, capsys) -> None:
    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--skip-tests"]) == 2
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


def test_gpu_script_arguments_and_table() -> None:
    from benchmarks import gpu

    args = gpu.build_parser().parse_args(["--batch-sizes", "256", "512", "--methods", "lipdp", "--steps", "2"])
    assert args.batch_sizes == [256, 512] and args.methods == ["lipdp"] and args.steps == 2
    assert gpu.build_parser().parse_args([]).batch_sizes[-1] == 65536
    rows = [{"method": "lipdp", "batch_size": 256, "status": "ok", "seconds": 0.0123, "peak_bytes": 3 * 2**20},
            {"method": "lipdp", "batch_size": 512, "status": "oom", "seconds": None, "peak_bytes": None}]
    text = gpu.markdown(rows, "Test GPU", "1 passed", ["lipdp"], [256, 512])
    assert "Test GPU" in text and "| 256 | 12.3 |" in text and "| 256 | 3 |" in text and "| 512 | oom |" in text
    assert "| lipdp | 256 |" in text
