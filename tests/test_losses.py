"""Loss constants: no logits and no label may give one sample a logit gradient above the declared constant."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import nn

from lipdp.losses import (
    HKRLoss,
    KRLoss,
    LipschitzCrossEntropy,
    MulticlassHinge,
    NonLipschitzLossError,
    loss_lipschitz,
)
from tests.soundness_utils import record_tightness, single_thread_torch

single_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def _losses(k: int) -> dict[str, nn.Module]:
    weights = torch.linspace(0.2, 1.7, k, dtype=torch.float64)
    signed = torch.linspace(-1.3, 0.9, k, dtype=torch.float64)
    return {
        "LipschitzCrossEntropy": LipschitzCrossEntropy(reduction="sum"),
        "LipschitzCrossEntropy(tau=0.1)": LipschitzCrossEntropy(temperature=0.1, reduction="sum"),
        "LipschitzCrossEntropy(tau=10, smoothing=0.2)": LipschitzCrossEntropy(10.0, 0.2, reduction="sum"),
        "LipschitzCrossEntropy(smoothing=0.9)": LipschitzCrossEntropy(label_smoothing=0.9, reduction="sum"),
        "LipschitzCrossEntropy(tau=2, margin=0.7)": LipschitzCrossEntropy(2.0, reduction="sum", margin=0.7),
        "LipschitzCrossEntropy(tau=10, smoothing=0.2, margin=5)": LipschitzCrossEntropy(10.0, 0.2, reduction="sum",
                                                                                       margin=5.0),
        "MulticlassHinge(margin=0.5)": MulticlassHinge(0.5, reduction="sum"),
        "MulticlassHinge(margin=3)": MulticlassHinge(3.0, reduction="sum"),
        "KRLoss": KRLoss(reduction="sum"),
        "KRLoss(num_classes=K)": KRLoss(num_classes=k, reduction="sum"),
        "HKRLoss(alpha=10)": HKRLoss(alpha=10.0, reduction="sum"),
        "HKRLoss(alpha=0.5, num_classes=K)": HKRLoss(alpha=0.5, margin=2.0, num_classes=k, reduction="sum"),
        "nn.CrossEntropyLoss": nn.CrossEntropyLoss(reduction="sum"),
        "nn.CrossEntropyLoss(smoothing=0.1)": nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.1),
        "nn.CrossEntropyLoss(smoothing=0.6)": nn.CrossEntropyLoss(reduction="sum", label_smoothing=0.6),
        "nn.CrossEntropyLoss(mean)": nn.CrossEntropyLoss(),  # per-sample gradient /B: checked on batch 1 below
        "nn.CrossEntropyLoss(weight)": nn.CrossEntropyLoss(weight=weights, reduction="sum"),
        "nn.CrossEntropyLoss(weight, smoothing=0.3)": nn.CrossEntropyLoss(weight=weights, reduction="sum",
                                                                           label_smoothing=0.3),
        "nn.CrossEntropyLoss(signed weight, smoothing=0.5)": nn.CrossEntropyLoss(weight=signed, reduction="sum",
                                                                                  label_smoothing=0.5),
    }


def _max_logit_gradient(criterion: nn.Module, k: int, seed: int, restarts: int = 24, steps: int = 60) -> float:
    """Largest ||d loss_i / d z_i|| over random logits (several scales) and gradient ascent on the logits."""
    generator = torch.Generator().manual_seed(seed)
    per_sample = getattr(criterion, "reduction", "sum") == "mean"
    targets = torch.arange(restarts) % k

    def norms(z: torch.Tensor) -> torch.Tensor:
        if per_sample:  # reduction="mean": one sample per call, so the per-sample gradient is undivided
            rows = [torch.autograd.grad(criterion(z[i:i + 1], targets[i:i + 1]), z, create_graph=True)[0][i]
                    for i in range(z.shape[0])]
            return torch.stack(rows).norm(dim=1)
        g = torch.autograd.grad(criterion(z, targets), z, create_graph=True)[0]
        return g.norm(dim=1)

    best = 0.0
    for scale in (0.1, 1.0, 5.0, 30.0):
        z = (scale * torch.randn(restarts, k, generator=generator, dtype=torch.float64)).requires_grad_(True)
        best = max(best, norms(z).max().item())
    z = (3 * torch.randn(restarts, k, generator=generator, dtype=torch.float64)).requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=0.2)
    for _ in range(steps):
        values = norms(z)
        best = max(best, values.max().item())
        if not values.requires_grad:  # piecewise-linear loss: the gradient norm is locally constant
            break
        optimizer.zero_grad()
        (-values.sum()).backward()
        optimizer.step()
    return max(best, norms(z).max().item())


@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("name", list(_losses(3)))
def test_loss_gradient_below_constant(name: str, k: int) -> None:
    criterion = _losses(k)[name]
    constant = loss_lipschitz(criterion)
    observed = _max_logit_gradient(criterion, k, seed=zlib.crc32(f"{name}/{k}".encode()))
    assert observed <= constant * (1 + 1e-9), f"{name}, K={k}: ||grad|| {observed} > constant {constant}"
    record_tightness(f"loss {name.split('(')[0]}", observed, constant)


def test_cross_entropy_constant_is_sqrt2_and_nearly_reached() -> None:
    """The supremum sqrt(2) is approached (softmax -> e_j, j != y), so the constant is not loose."""
    criterion = LipschitzCrossEntropy(reduction="sum")
    z = torch.tensor([[0.0, 40.0, 0.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(criterion(z, torch.tensor([0])), z)
    assert g.norm().item() == pytest.approx(math.sqrt(2), rel=1e-9)
    assert loss_lipschitz(criterion) == pytest.approx(math.sqrt(2))


def test_kr_loss_refuses_a_different_number_of_classes() -> None:
    """sqrt(K/(K-1)) decreases in K: logits with fewer classes than declared would exceed the constant."""
    criterion = KRLoss(num_classes=5)
    with pytest.raises(ValueError, match="num_classes=5"):
        criterion(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        KRLoss(num_classes=1)


@pytest.mark.parametrize("criterion", [nn.MSELoss(), nn.GaussianNLLLoss(), nn.PoissonNLLLoss(), nn.KLDivLoss()])
def test_non_lipschitz_losses_are_refused(criterion: nn.Module) -> None:
    with pytest.raises(NonLipschitzLossError, match="Fix"):
        loss_lipschitz(criterion)


def test_mse_gradient_is_unbounded() -> None:
    """Why MSE is refused: its logit gradient grows without bound."""
    z = torch.full((1, 3), 1e6, requires_grad=True)
    (g,) = torch.autograd.grad(nn.MSELoss(reduction="sum")(z, torch.zeros(1, 3)), z)
    assert g.norm().item() > 1e6


def test_unknown_and_data_dependent_losses_are_refused() -> None:
    with pytest.raises(NonLipschitzLossError, match="lipschitz_constant"):
        loss_lipschitz(nn.L1Loss())
    with pytest.raises(NonLipschitzLossError, match="reduction='sum'"):
        loss_lipschitz(nn.CrossEntropyLoss(weight=torch.ones(3)))


def test_declared_constant_is_used() -> None:
    class Declared(nn.Module):
        lipschitz_constant = 0.75

    assert loss_lipschitz(Declared()) == 0.75


def test_cross_entropy_margin_shifts_the_other_logits_and_keeps_its_constant() -> None:
    """margin m: the loss at z is the plain loss at z + m (1 - e_y), so it still pushes a sample whose true logit
    leads by less than m, and its constant stays sqrt(2), nearly reached; a negative margin is refused."""
    z = torch.tensor([[0.5, 0.2, -0.1], [0.0, 3.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    shifted = z + 0.7 * (1 - nn.functional.one_hot(y, 3).to(z.dtype))
    plain, margin = LipschitzCrossEntropy(2.0, reduction="none"), LipschitzCrossEntropy(2.0, reduction="none",
                                                                                          margin=0.7)
    assert torch.allclose(margin(z, y), plain(shifted, y))
    assert (margin(z, y) > plain(z, y)).all()
    far = torch.tensor([[0.0, 40.0, 0.0]], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(LipschitzCrossEntropy(reduction="sum", margin=3.0)(far, torch.tensor([0])), far)
    assert g.norm().item() == pytest.approx(math.sqrt(2), rel=1e-9)
    assert loss_lipschitz(margin) == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="margin"):
        LipschitzCrossEntropy(margin=-0.1)
