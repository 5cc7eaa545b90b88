"""The scattering transform's certified Lipschitz constant (lipdp.scattering.scattering_lipschitz) against pairs
that try to break it: random pairs at several scales and pairs optimised by gradient ascent on the ratio
||S(x) - S(y)|| / ||x - y|| through kymatio's differentiable transform (float64)."""

from __future__ import annotations

import pytest
import torch

from lipdp.scattering import scattering_lipschitz, scattering_transform

@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny FFTs: one thread (on shared cores, two threads each oversubscribe and run ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [((8, 8), 1), ((8, 8), 2), pytest.param((28, 28), 1, marks=pytest.mark.slow),
         pytest.param((28, 28), 2, marks=pytest.mark.slow)]


def _weighted(shape: tuple[int, int], J: int, weights: torch.Tensor | None):
    transform = scattering_transform(shape, J).double()
    return lambda x: transform(x) * (1 if weights is None else weights[:, None, None])


def _ratio(scatter, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """||S(x + step) - S(x)|| / ||step|| per pair (both ends in one batch: one transform call, not two)."""
    moved, start = scatter(torch.cat([x + step, x])).chunk(2)
    return (moved - start).flatten(1).norm(dim=1) / step.flatten(1).norm(dim=1)


def _ascent(scatter, shape: tuple[int, int], steps: int, seed: int = 0) -> float:
    """The largest ratio found by Adam on log-ratio over (x, x - y), 8 pairs at once."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(8, 1, *shape, generator=generator, dtype=torch.float64).requires_grad_(True)
    step = (1e-2 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    optimizer = torch.optim.Adam([x, step], lr=0.01)
    best = 0.0
    for _ in range(steps):
        ratio = _ratio(scatter, x, step)
        best = max(best, ratio.max().item())
        optimizer.zero_grad()
        (-ratio.log().sum()).backward()
        optimizer.step()
    return best


def _paths(J: int, L: int = 8) -> int:
    return 1 + J * L + L**2 * J * (J - 1) // 2


@pytest.mark.parametrize("shape, J", CASES)
def test_random_and_optimised_pairs_never_exceed_the_certified_constant(shape, J):
    bound = scattering_lipschitz(shape, J)
    scatter = _weighted(shape, J, None)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(64, 1, *shape, generator=generator, dtype=torch.float64)
    for scale in (1e-4, 1e-1, 1.0, 10.0):  # small steps probe the Jacobian, large ones the modulus' kinks
        step = scale * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        assert _ratio(scatter, x, step).max().item() <= bound
    found = _ascent(scatter, shape, steps=40 if shape == (8, 8) else 80)
    assert found <= bound
    assert found >= 0.4 * bound  # the bound is not vacuous (ascent reaches 0.68-0.82 of it at 300 steps)


@pytest.mark.parametrize("weights", ["random", pytest.param("second order only", marks=pytest.mark.slow)])
def test_path_weights_are_matched_to_kymatio_s_channel_order(weights):
    # Weights that differ per path: a bound computed with the paths in the wrong order would be broken here.
    shape, J = (8, 8), 2
    if weights == "random":
        path_weights = torch.rand(_paths(J), generator=torch.Generator().manual_seed(2), dtype=torch.float64) ** 4 * 10
    else:
        path_weights = torch.cat([torch.zeros(1 + 8 * J), torch.ones(64)]).double()
    bound = scattering_lipschitz(shape, J, path_weights=path_weights)
    assert _ascent(_weighted(shape, J, path_weights), shape, steps=30) <= bound


def test_the_zeroth_order_bound_is_the_exact_operator_norm_of_the_low_pass():
    """With only S0 = crop(D_{2^J}(P x * phi)) kept, the map is linear and the bound must equal its operator norm
    (power iteration through autograd): padding, subsampling and crop are counted exactly, not just bounded."""
    shape, J = (8, 8), 2
    weights = torch.zeros(_paths(J), dtype=torch.float64)
    weights[0] = 1.0
    scatter = _weighted(shape, J, weights)
    vector = torch.randn(1, 1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for _ in range(50):
        vector = vector.requires_grad_(True)
        (gradient,) = torch.autograd.grad(scatter(vector).square().sum() / 2, vector)  # S0^T S0 v
        vector = (gradient / gradient.norm()).detach()
    norm = scatter(vector).norm().item()
    assert scattering_lipschitz(shape, J, path_weights=weights) == pytest.approx(norm, rel=1e-6)


def test_path_weights_scale_the_bound_and_are_checked():
    shape, J = (8, 8), 1
    assert scattering_lipschitz(shape, J, path_weights=torch.full((_paths(J),), 3.0)) == pytest.approx(
        3 * scattering_lipschitz(shape, J), rel=1e-9)
    with pytest.raises(ValueError, match="9 scattering paths"):
        scattering_lipschitz(shape, J, path_weights=torch.ones(10))
