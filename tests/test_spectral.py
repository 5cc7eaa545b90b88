"""Certified operator norms vs the real operator (autograd through the module: padding, stride, groups,
dilation included), the patch counts behind the conv gradient bound, max pooling, and the Weyl drift cache."""

from __future__ import annotations

import math
import random

import pytest
import torch
from orthogonium.layers import AdaptiveOrthoConv2d, OrthoLinear
from torch import nn

import lipdp
from lipdp.bounds import CertifiedNormCache, ConvGeometry, conv2d_operator_norm, dense_operator_norm
from lipdp.bounds.spectral import WARM_MARGIN, conv2d_certified_norm, dense_certified_norm
from tests.soundness_utils import record_tightness, single_thread_torch

N_GEOMETRIES = 48

single_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)


def operator_matrix(module: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """The matrix of the linear map x -> module(x) (no bias) on one sample, in float64: the module applied to
    every basis vector (column j = module(e_j))."""
    numel = math.prod(input_shape)
    with torch.no_grad():
        columns = module(torch.eye(numel, dtype=torch.float64).view(numel, *input_shape))
    return columns.reshape(numel, -1).T


def power_iteration(module: nn.Module, input_shape: tuple[int, ...], iterations: int, seed: int) -> float:
    """Lower estimate of ||module|| by power iteration on A^T A, A applied by autograd (never above ||A||)."""
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(1, *input_shape, dtype=torch.float64, generator=generator)
    estimate = 0.0
    for _ in range(iterations):
        v = (v / v.norm()).requires_grad_(True)
        out = module(v)
        estimate = out.norm().item()
        (v,) = torch.autograd.grad(out, v, grad_outputs=out)
        v = v.detach()
    return estimate


def random_geometry(seed: int) -> tuple[nn.Conv2d, tuple[int, int, int]]:
    """A random legal plain convolution (random weights) and its input shape."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    while True:
        groups = rng.choice([1, 1, 2, 3])
        c_in = groups * rng.randint(1, 2)
        c_out = groups * rng.randint(1, 3)
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        stride = (rng.randint(1, 2), rng.randint(1, 2))
        dilation = (rng.choice([1, 1, 2]), rng.choice([1, 1, 2]))
        mode = rng.choice(["zeros", "circular"])
        hw = (rng.randint(3, 9), rng.randint(3, 9))
        if stride == (1, 1) and rng.random() < 0.3:
            padding = "same"
        else:
            padding = rng.choice([0, 1, 2, (kernel[0] // 2, kernel[1] // 2), (dilation[0] * (kernel[0] - 1), 0)])
        try:
            conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=False, padding_mode=mode)
            conv = conv.double()
            out = conv(torch.zeros(1, c_in, *hw, dtype=torch.float64))
        except (RuntimeError, ValueError):
            continue
        if out.numel() == 0:
            continue
        with torch.no_grad():
            conv.weight.normal_(0.0, rng.uniform(0.2, 2.0))
        return conv, (c_in, *hw)


def _full_circular(conv: nn.Conv2d, geometry: ConvGeometry) -> bool:
    """Circular padding, stride dividing the size and one output per stride cell: the bound must be exact."""
    out_hw = geometry.output_hw(tuple(conv.kernel_size))
    return conv.padding_mode == "circular" and all(
        n % s == 0 and o == n // s for n, s, o in zip(geometry.input_hw, geometry.stride, out_hw)
    )


@pytest.mark.parametrize("seed", range(N_GEOMETRIES))
def test_conv_norm_is_certified_on_the_real_operator(seed: int) -> None:
    conv, shape = random_geometry(seed)
    geometry = ConvGeometry.of(conv, shape[1:])
    certified = conv2d_operator_norm(conv.weight, geometry)
    exact = torch.linalg.matrix_norm(operator_matrix(conv, shape), ord=2).item()
    estimate = power_iteration(conv, shape, iterations=200, seed=seed)
    through_rule = lipdp.lipschitz_constant(nn.Sequential(conv), shape)
    context = f"{conv} on {shape}: certified {certified:.8g}, exact {exact:.8g}, power {estimate:.8g}"
    assert estimate <= exact * (1 + 1e-9), context
    assert exact <= certified, context
    assert through_rule == pytest.approx(certified, rel=1e-12), context
    record_tightness(f"conv Lip ({conv.padding_mode}), exact / certified", exact, certified)
    if _full_circular(conv, geometry):
        assert certified <= exact * (1 + 1e-5), f"circular bound not tight: {context}"
        assert estimate >= 0.95 * certified, f"power iteration far from the bound: {context}"


@pytest.mark.parametrize("seed", range(12))
def test_orthogonium_conv_norm(seed: int) -> None:
    """AOC layers (materialised kernel): certified >= real operator norm; ~1 with full circular padding."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    c_in, c_out = rng.choice([(2, 2), (2, 4), (4, 2), (3, 3)])
    kernel = rng.choice([2, 3])
    stride = rng.choice([1, 2]) if kernel >= 2 else 1
    mode = rng.choice(["zeros", "circular"])
    padding = "same" if stride == 1 else kernel // 2
    size = 2 * rng.randint(3, 4)
    try:
        layer = AdaptiveOrthoConv2d(c_in, c_out, kernel, stride=stride, padding=padding, padding_mode=mode, bias=False)
    except ValueError:
        pytest.skip("orthogonium refuses this configuration")
    weight = layer.weight.detach().double()
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False, padding_mode=mode).double()
    conv.weight = nn.Parameter(weight)
    shape = (c_in, size, size)
    exact = torch.linalg.matrix_norm(operator_matrix(conv, shape), ord=2).item()
    certified = lipdp.lipschitz_constant(nn.Sequential(layer), shape)
    assert exact <= certified
    record_tightness("ortho conv Lip, exact / certified", exact, certified)
    if _full_circular(conv, ConvGeometry.of(conv, (size, size))):
        assert certified == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("seed", range(N_GEOMETRIES))
def test_patch_count_matches_brute_force(seed: int) -> None:
    """patch_count = max over input pixels of #(tap, output) pairs reading it = max of A^T 1 for the
    all-ones single-channel kernel (wrap-around of circular padding included)."""
    conv, shape = random_geometry(seed)
    ones = nn.Conv2d(1, 1, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1, False,
                     conv.padding_mode).double()
    with torch.no_grad():
        ones.weight.fill_(1.0)
    matrix = operator_matrix(ones, (1, *shape[1:]))
    counts = matrix.sum(dim=0)  # A^T 1
    geometry = ConvGeometry.of(ones, shape[1:])
    assert geometry.patch_count(tuple(conv.kernel_size)) == round(counts.max().item())


@pytest.mark.parametrize("seed", range(30))
def test_maxpool_lipschitz_is_exact(seed: int) -> None:
    """Max pooling: a spike at pixel p moves every window containing p, so Lip = sqrt(max windows per pixel)
    exactly. Covers padding, dilation and ceil_mode (whose extra windows past the input count too)."""
    rng = random.Random(seed)
    while True:
        kernel = (rng.randint(1, 4), rng.randint(1, 4))
        stride = (rng.randint(1, 3), rng.randint(1, 3))
        padding = (rng.randint(0, kernel[0] // 2), rng.randint(0, kernel[1] // 2))
        dilation = (rng.choice([1, 2]), rng.choice([1, 2]))
        pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=rng.random() < 0.5)
        shape = (rng.randint(1, 2), rng.randint(3, 9), rng.randint(3, 9))
        try:
            out = pool(torch.zeros(1, *shape))
        except RuntimeError:
            continue
        if out.numel() and torch.isfinite(out).all():
            break
    observed = 0.0
    for index in range(math.prod(shape)):
        spike = torch.zeros(math.prod(shape), dtype=torch.float64)
        spike[index] = 1.0
        observed = max(observed, pool(spike.view(1, *shape)).norm().item())
    claimed = lipdp.lipschitz_constant(nn.Sequential(pool), shape)
    assert observed <= claimed * (1 + 1e-12), f"{pool} on {shape}: observed {observed} > claimed {claimed}"
    assert claimed == pytest.approx(observed, rel=1e-12), f"{pool} on {shape}: not exact"


@pytest.mark.parametrize("seed", range(10))
def test_dense_norm_certified(seed: int) -> None:
    torch.manual_seed(seed)
    weight = torch.randn(random.Random(seed).randint(1, 9), random.Random(seed + 1).randint(1, 9))
    assert dense_operator_norm(weight) >= torch.linalg.svdvals(weight.double()).max().item()


@pytest.mark.parametrize("shape, dtype, rank", [
    ((3136, 256), torch.float32, None), ((10, 4000), torch.float32, None), ((300, 300), torch.float64, None),
    ((64, 128), torch.float16, None), ((200, 50), torch.float32, 1), ((50, 200), torch.float32, 3),
    ((7, 7), torch.float32, 0),
])
def test_dense_norm_by_the_gram_eigensolver_is_certified_and_tight(shape, dtype, rank) -> None:
    """The Gram-matrix eigenvalue route never falls below an SVD's largest singular value (tall, wide, square,
    half and double precision, rank-deficient, zero) and stays within its float slack of it."""
    generator = torch.Generator().manual_seed(sum(shape))
    if rank is None:
        weight = torch.randn(*shape, generator=generator)
    else:  # a product of thin factors: exactly rank-deficient
        weight = torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, shape[1], generator=generator)
    weight = weight.to(dtype)
    exact = torch.linalg.svdvals(weight.double()).max().item() if rank != 0 else 0.0
    claimed = dense_operator_norm(weight)
    assert claimed >= exact
    assert claimed <= exact * (1 + 2e-6) + 1e-300


def _drift_case(case: int) -> tuple[str, nn.Module, tuple[int, ...]]:
    torch.manual_seed(case)
    return [
        lambda: ("plain conv", nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="zeros"), (3, 6, 6)),
        lambda: ("circular grouped conv", nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", groups=2),
                 (2, 6, 6)),
        lambda: ("orthogonium conv",
                 AdaptiveOrthoConv2d(2, 4, 3, padding="same", padding_mode="circular", bias=False), (2, 6, 6)),
        lambda: ("plain dense", nn.Linear(5, 4), (5,)),
        lambda: ("orthogonium dense", OrthoLinear(5, 4), (5,)),
    ][case]()


@pytest.mark.parametrize("case", range(5))
def test_weyl_drift_cache_stays_certified(case: int) -> None:
    """CertifiedNormCache between refreshes: bound = exact(W0) + c ||W - W0||_F must stay >= the real
    operator norm and >= a fresh exact computation as an optimiser moves the weights."""
    name, layer, shape = _drift_case(case)
    model = nn.Sequential(layer)
    cache = CertifiedNormCache(refresh_tolerance=1e9)  # never refresh: always the drift path
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    generator = torch.Generator().manual_seed(case)
    first = lipdp.analyze(model, 1.0, 1.0, shape, norm_cache=cache).lipschitz
    assert cache.exact_computations == 1
    previous_weight = layer.weight.detach().clone()
    for step in range(6):
        optimizer.zero_grad()
        x = torch.randn(8, *shape, generator=generator)
        (model(x) * torch.randn(model(x).shape, generator=generator)).sum().backward()
        optimizer.step()
        weight = layer.weight.detach()
        assert not torch.equal(weight, previous_weight), "the optimiser must move the weight"
        previous_weight = weight.clone()
        cached = lipdp.analyze(model, 1.0, 1.0, shape, norm_cache=cache).lipschitz
        assert cache.exact_computations == 1, "the drift path must be taken"
        if isinstance(layer, nn.Conv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, False, layer.padding_mode).double()
            plain.weight = nn.Parameter(weight.double())
            fresh = conv2d_operator_norm(weight, ConvGeometry.of(layer, shape[1:]))
            real = torch.linalg.matrix_norm(operator_matrix(plain, shape), ord=2).item()
        else:
            fresh = dense_operator_norm(weight)
            real = torch.linalg.svdvals(weight.double()).max().item()
        assert cached >= fresh * (1 - 1e-9), f"{name} step {step}: cached {cached} < fresh {fresh}"
        assert cached >= real, f"{name} step {step}: cached {cached} < real {real}"
        record_tightness("Weyl-drift Lip, real / cached", real, cached)
    assert first > 0


def test_cache_refreshes_after_a_large_move() -> None:
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer)
    cache = CertifiedNormCache(refresh_tolerance=0.01)
    lipdp.analyze(model, 1.0, 1.0, (4,), norm_cache=cache)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    value = lipdp.analyze(model, 1.0, 1.0, (4,), norm_cache=cache).lipschitz
    assert cache.exact_computations == 2
    exact = dense_operator_norm(layer.weight)  # the refresh may be the warm certificate: within its margin
    assert exact <= value <= exact * math.sqrt(1 + WARM_MARGIN) * (1 + 1e-12)


def _matrix_with_spectrum(rows: int, singular: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 (rows, n) matrix with the given singular values, and its right singular vectors (columns)."""
    generator = torch.Generator().manual_seed(seed)
    n = singular.numel()
    left = torch.linalg.qr(torch.randn(rows, n, generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
    return left @ torch.diag(singular) @ right.T, right


@pytest.mark.parametrize("relative_gap, certified", [(1e-8, False), (-1e-6, True)])
def test_the_warm_certificate_refuses_a_claim_below_the_largest_eigenvalue(relative_gap, certified) -> None:
    """Started on the SECOND singular vector, the power step finds theta = s_2^2 and claims s_2^2 (1 + margin).
    With s_1^2 just above that claim (1e-8 relative) the Cholesky certificate must fail (the eigensolver answers);
    just below it (1e-6) it must succeed. Both answers are >= the real s_1."""
    n = 64  # large enough for the certificate (WARM_MIN_WORK)
    singular = torch.linspace(1.0, 0.2, n, dtype=torch.float64)
    singular[0] = singular[1] * math.sqrt((1 + WARM_MARGIN) * (1 + relative_gap))
    weight, right = _matrix_with_spectrum(128, singular, seed=n)
    result = dense_certified_norm(weight, right[:, 1].unsqueeze(0))
    real = torch.linalg.svdvals(weight).max().item()
    assert result.warm is certified
    assert result.value >= real
    assert result.value <= real * math.sqrt(1 + WARM_MARGIN) * (1 + 2e-6)


@pytest.mark.parametrize("seed", range(12))
def test_warm_started_dense_norms_are_certified_and_tight(seed: int) -> None:
    """Random shapes (tall, wide), float32 and float64, starts near the top vector, random, orthogonal to it, zero,
    NaN or of the wrong size (a tampered checkpoint): never below the SVD's sigma_max, at most the margin above it."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    shape = (rng.randint(1, 160), rng.randint(40, 160))  # both sides of WARM_MIN_WORK
    dtype = (torch.float32, torch.float64)[seed % 2]
    weight = torch.randn(*shape, generator=generator).to(dtype)
    real = torch.linalg.svdvals(weight.double()).max().item()
    n = min(shape)
    top = torch.linalg.svd(weight.double()).Vh[0] if shape[0] >= shape[1] else torch.linalg.svd(weight.double()).U[:, 0]
    orthogonal = torch.randn(n, generator=generator, dtype=torch.float64)
    orthogonal -= (orthogonal @ top) * top
    starts = [top, top + 0.1 * torch.randn(n, generator=generator, dtype=torch.float64), orthogonal,
              torch.randn(n, generator=generator, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
              torch.full((n,), float("nan"), dtype=torch.float64), torch.ones(n + 1, dtype=torch.float64)]
    for start in starts:
        value = dense_certified_norm(weight, start.unsqueeze(0)).value
        assert real <= value <= real * math.sqrt(1 + WARM_MARGIN) * (1 + 2e-6), (shape, dtype, start[:3])


def test_refreshing_every_step_uses_the_warm_certificate_and_stays_certified() -> None:
    """Refresh at every step (tolerance 0) while Adam moves a dense layer: each refresh starts from the previous
    vector, the certificate answers almost every time, and every bound is >= the real norm."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 128)
    model = nn.Sequential(layer)
    cache = CertifiedNormCache(refresh_tolerance=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model(torch.randn(16, 64)).square().sum().backward()
        optimizer.step()
        claimed = lipdp.analyze(model, 1.0, 1.0, (64,), norm_cache=cache).lipschitz
        assert claimed >= torch.linalg.svdvals(layer.weight.detach().double()).max().item()
    assert cache.exact_computations == 60 and cache.warm_computations >= 48


@pytest.mark.parametrize("seed", range(12))
def test_warm_started_conv_norms_are_certified_on_the_real_operator(seed: int) -> None:
    """Random geometries: warm-started from the vectors of a nearby kernel (one step earlier), or from garbage
    (random, zero, NaN, wrong size: a tampered checkpoint), the certified norm is never below the real operator's
    and at most the warm margin above the eigensolver's."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    channels, hw = rng.choice([(16, 8), (12, 10), (24, 6)])  # transfer batches big enough for the certificate
    conv = nn.Conv2d(channels, rng.choice([channels, 2 * channels]), rng.choice([2, 3]), stride=rng.choice([1, 2]),
                     padding=1, bias=False, padding_mode=rng.choice(["zeros", "circular"])).double()
    shape = (channels, hw, hw)
    geometry = ConvGeometry.of(conv, shape[1:])
    exact = torch.linalg.matrix_norm(operator_matrix(conv, shape), ord=2).item()
    cold = conv2d_certified_norm(conv.weight, geometry)
    generator = torch.Generator().manual_seed(seed)
    step = 1e-3 * conv.weight.detach().std() * torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64)
    nearby = conv2d_certified_norm(conv.weight + step, geometry).vectors  # one small optimiser step earlier
    vectors = cold.vectors
    starts = [nearby, torch.randn(vectors.shape, generator=generator, dtype=torch.float64), torch.zeros_like(vectors),
              torch.full_like(vectors, float("nan")), torch.ones(vectors.shape[0] + 1, vectors.shape[1])]
    certified = [conv2d_certified_norm(conv.weight, geometry, start) for start in starts]
    for result in certified:
        assert exact <= result.value <= cold.value * math.sqrt(1 + WARM_MARGIN) * (1 + 1e-9), (conv, shape)
    assert certified[0].warm, "a start from nearby weights must let the certificate answer"
