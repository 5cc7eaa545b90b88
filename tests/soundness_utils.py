"""Shared machinery of the soundness suite: random Lipschitz architectures, ground-truth per-sample gradients
(torch.func: functional_call + vmap(grad)) and an adversarial search for the largest per-sample gradient norms.

Everything here tries to *break* lipdp's bounds: a test passes only if no input, output gradient or label the
search finds makes a real per-sample gradient exceed the bound lipdp claims for it.
"""

from __future__ import annotations

import copy
import functools
import math
import random
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear
from torch import nn
from torch.func import functional_call, grad, vmap

from lipdp.bounds import is_reparametrized
from lipdp.layers import ConvexResidual, GlobalL2Pool2d, GroupSort, InputNormClip, L2NormPool2d, SampleCentring

# Relative tolerance for float error only (ground truth is computed in float64 on the same weights).
REL_TOL = 1e-5

# Ratio observed / claimed per kind of bound, across the whole session (printed by conftest's summary hook).
TIGHTNESS: dict[str, list[float]] = defaultdict(list)


def single_thread_torch():
    """Generator for a module-scoped autouse fixture: these tensors are tiny, and intra-op threads only burn
    the CPU the suite shares with others; the previous setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def record_tightness(kind: str, observed: float, claimed: float) -> None:
    if claimed > 0 and math.isfinite(claimed):
        TIGHTNESS[kind].append(observed / claimed)


def tightness_table() -> str:
    if not TIGHTNESS:
        return ""
    lines = [f"{'bound kind':<34} {'cases':>6} {'max obs/claim':>14} {'median':>8} {'min':>8}"]
    for kind in sorted(TIGHTNESS):
        values = sorted(TIGHTNESS[kind])
        lines.append(
            f"{kind:<34} {len(values):>6d} {values[-1]:>14.4f} {values[len(values) // 2]:>8.4f} {values[0]:>8.4f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Materialised copy: plain float64 layers holding the materialised weights of reparametrised ones.
# ---------------------------------------------------------------------------------------------------------
def plain_twin(module: nn.Module) -> nn.Module:
    """A plain nn.Linear / nn.Conv2d with the same configuration and weight ``module.weight`` (materialised)."""
    weight = module.weight.detach().clone()
    if isinstance(module, nn.Linear):
        twin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    else:
        twin = nn.Conv2d(
            module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.bias is not None, module.padding_mode,
        )
    twin.weight = nn.Parameter(weight)
    if module.bias is not None:
        twin.bias = nn.Parameter(module.bias.detach().clone())
    return twin


def materialize(model: nn.Module) -> nn.Module:
    """Deep copy in float64 in which every reparametrised layer is a plain layer with its materialised weight,
    so that ``named_parameters()`` of the copy carries exactly the names of lipdp's report."""
    clone = copy.deepcopy(model)
    if is_reparametrized(clone):
        return plain_twin(clone).double()
    for name, module in list(clone.named_modules()):
        if name and is_reparametrized(module):
            parent_name, _, child = name.rpartition(".")
            parent = clone.get_submodule(parent_name) if parent_name else clone
            setattr(parent, child, plain_twin(module))
    return clone.double().eval()


def kind_of(model: nn.Module, key: str) -> str:
    """Kind of bound for the tightness table (``ortho`` = orthogonium layer)."""
    owner, _, attribute = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    family = "dense" if isinstance(module, nn.Linear) else "conv" if isinstance(module, nn.Conv2d) else "other"
    prefix = "ortho " if is_reparametrized(module) else ""
    suffix = ""
    if family == "dense" and attribute == "bias" and getattr(module, "_lipdp_test_nd", False):
        suffix = " (nD input)"
    return f"{prefix}{family} {attribute}{suffix}"


# ---------------------------------------------------------------------------------------------------------
# Random architectures.
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Architecture:
    model: nn.Module
    input_shape: tuple[int, ...]
    input_norm_bound: float  # X0 given to lipdp.analyze
    input_radius: float  # norm of the inputs fed to the model (> X0 only when an InputNormClip enforces X0)
    description: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Architecture(shape={self.input_shape}, X0={self.input_norm_bound}, r={self.input_radius}):\n{self.model}"


def _out_shape(layers: list[nn.Module], input_shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(nn.Sequential(*layers).eval()(torch.zeros(1, *input_shape)).shape[1:])


def _randomise_plain(module: nn.Module, rng: random.Random) -> None:
    """Random, deliberately non-orthogonal weights (and biases) at a random scale."""
    with torch.no_grad():
        weight = module.weight
        fan_in = weight[0].numel()
        weight.normal_(0.0, rng.uniform(0.3, 2.0) / math.sqrt(fan_in))
        if module.bias is not None:  # small enough that ReLUs are not all dead on the input sphere
            module.bias.normal_(0.0, rng.uniform(0.01, 0.3))


def _random_conv(rng: random.Random, shape: tuple[int, int, int], out_channels: int | None = None,
                 keep_shape: bool = False) -> nn.Module | None:
    """A random legal 2-D convolution on inputs of ``shape`` (None if no try was legal)."""
    c, h, w = shape
    for _ in range(30):
        out = out_channels or rng.randint(1, 4)
        k = rng.randint(1, 5)
        stride = 1 if keep_shape else rng.choice([1, 1, 2])
        dilation = rng.choice([1, 1, 1, 2])
        mode = rng.choice(["zeros", "circular"])
        if keep_shape:
            padding = "same"
        elif stride == 1:
            padding = rng.choice([0, 1, "same", k // 2])
        else:
            padding = rng.choice([0, 1, k // 2])
        common = [g for g in range(1, min(c, out) + 1) if c % g == 0 and out % g == 0]
        groups = rng.choice(common)
        bias = rng.random() < 0.5
        ortho = rng.random() < 0.45
        try:
            if ortho:
                conv = AdaptiveOrthoConv2d(c, out, k, stride=stride, padding=padding, dilation=dilation,
                                           groups=groups, bias=bias, padding_mode=mode)
                if bias:
                    with torch.no_grad():
                        conv.bias.normal_(0.0, rng.uniform(0.01, 0.3))
            else:
                kernel = (k, rng.randint(1, 5)) if rng.random() < 0.25 else k
                strides = (stride, rng.choice([1, 2])) if (rng.random() < 0.2 and padding != "same") else stride
                conv = nn.Conv2d(c, out, kernel, strides, padding, dilation, groups, bias, mode)
                _randomise_plain(conv, rng)
            new_shape = _out_shape([conv], shape)
        except (ValueError, RuntimeError):
            continue
        if min(new_shape[1:]) < 1 or (keep_shape and new_shape != shape):
            continue
        return conv
    return None


def _random_activation(rng: random.Random, channels: int) -> nn.Module:
    choices = ["relu", "relu", "tanh", "abs", "leaky", "identity"]
    if channels % 2 == 0:
        choices += ["maxmin", "maxmin", "groupsort"]
    if channels % 3 == 0:
        choices += ["groupsort3"]
    pick = rng.choice(choices)
    from orthogonium.layers import Abs

    return {
        "relu": lambda: nn.ReLU(),
        "tanh": lambda: nn.Tanh(),
        "abs": lambda: Abs(),
        "leaky": lambda: nn.LeakyReLU(rng.choice([0.01, 0.3, 1.5])),  # slope 1.5: Lip 1.5
        "identity": lambda: nn.Identity(),
        "maxmin": lambda: MaxMin(),
        "groupsort": lambda: GroupSort(2),
        "groupsort3": lambda: GroupSort(3),
    }[pick]()


def _random_pool(rng: random.Random, shape: tuple[int, int, int]) -> nn.Module | None:
    c, h, w = shape
    pick = rng.choice(["none", "l2", "max", "max"])
    if pick == "l2" and min(h, w) >= 2:
        return L2NormPool2d(rng.choice([2, 2, 3]) if min(h, w) >= 3 else 2)
    if pick == "max" and min(h, w) >= 2:
        for _ in range(10):
            k = rng.randint(2, 3)
            stride = rng.randint(1, k)
            padding = rng.randint(0, k // 2)
            dilation = rng.choice([1, 1, 2])
            pool = nn.MaxPool2d(k, stride, padding, dilation, ceil_mode=rng.random() < 0.4)
            try:
                out = _out_shape([pool], shape)
            except RuntimeError:
                continue
            if min(out[1:]) >= 1:
                return pool
    return None


@functools.lru_cache(maxsize=128)
def random_architecture(seed: int) -> Architecture:
    """A random Lipschitz network: depth 1-4 conv stages (or dense layers), every supported layer type.

    Cached (tests only read the model: gradients are taken on materialised copies)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    description: list[str] = []
    image = rng.random() < 0.75
    input_shape: tuple[int, ...]
    if image:
        input_shape = (rng.randint(1, 3), rng.randint(5, 10), rng.randint(5, 10))
    else:
        input_shape = (rng.randint(3, 12),)
    clip = None
    scale = False
    if rng.random() < 0.6:
        clip = rng.choice([0.5, 1.0, 2.0])
        scale = rng.random() < 0.15  # every sample rescaled onto the sphere of radius `clip`
        layers.append(InputNormClip(clip, mode="scale" if scale else "clip"))
    shape = input_shape
    if image:
        for _ in range(rng.randint(1, 4)):
            stage: list[nn.Module] = []
            stage_input = shape
            residual = rng.random() < 0.25
            if residual:
                conv = _random_conv(rng, shape, out_channels=shape[0], keep_shape=True)
                if conv is not None:
                    inner = [conv, _random_activation(rng, shape[0])]
                    block = nn.Sequential(*inner) if rng.random() < 0.7 else conv
                    stage.append(ConvexResidual(block, alpha=rng.choice([0.0, 0.3, 0.5, 1.0, rng.random()])))
            if not stage:
                conv = _random_conv(rng, shape)
                if conv is None:
                    continue
                stage.append(conv)
                shape = _out_shape([conv], shape)
                stage.append(_random_activation(rng, shape[0]))
            pool = _random_pool(rng, shape)
            if pool is not None:
                stage.append(pool)
            shape = _out_shape(stage, stage_input)
            if rng.random() < 0.3:
                layers.append(nn.Sequential(*stage))  # nested container
            else:
                layers.extend(stage)
        if rng.random() < 0.2:
            # nn.Linear on the last axis of an image tensor (torch applies it at every (c, h) position)
            lin = nn.Linear(shape[-1], rng.randint(1, 4), bias=True)
            _randomise_plain(lin, rng)
            lin._lipdp_test_nd = True
            layers.append(lin)
            shape = _out_shape([lin], shape)
        if rng.random() < 0.5:
            layers.append(GlobalL2Pool2d())
        else:
            layers.append(nn.Flatten())
        shape = _out_shape(layers, input_shape)
    else:
        layers.insert(0, nn.Flatten())
    width = shape[0]
    hidden = rng.randint(0, 2) if image else rng.randint(0, 3)
    for index in range(hidden + 1):
        last = index == hidden
        out = rng.randint(2, 5) if last else rng.choice([2, 4, 6, 8])
        bias = rng.random() < 0.6
        if rng.random() < 0.5:
            lin = OrthoLinear(width, out, bias=bias)
            if bias:
                with torch.no_grad():
                    lin.bias.normal_(0.0, rng.uniform(0.01, 0.3))
        else:
            lin = nn.Linear(width, out, bias=bias)
            _randomise_plain(lin, rng)
        block = [lin]
        if not last:
            block.append(_random_activation(rng, out))
        if rng.random() < 0.25:
            layers.append(nn.Sequential(*block))
        else:
            layers.extend(block)
        width = out
    centring = random.Random(f"centring-{seed}")  # its own stream: the other layers stay those of earlier runs
    if centring.random() < 0.3:  # per-sample centring anywhere: before the clip (centring raw images) or after
        layers.insert(centring.randint(0, len(layers)), SampleCentring())
    model = nn.Sequential(*layers)
    if scale:
        x0 = rng.choice([0.1, 1.0, 10.0])  # irrelevant: the scaling layer outputs norm `clip` for any input
        radius = rng.choice([0.1, 1.0, 5.0])
    elif clip is not None:
        x0 = rng.choice([clip, clip / 2])
        radius = x0 if x0 < clip else rng.choice([clip, 3 * clip])
    else:
        x0 = rng.choice([0.5, 1.0, 3.0])
        radius = x0
    return Architecture(model, input_shape, x0, radius, description)


# ---------------------------------------------------------------------------------------------------------
# Ground truth and adversarial search.
# ---------------------------------------------------------------------------------------------------------
def _normalise(t: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    flat = t.flatten(1)
    return (flat * (radius / flat.norm(dim=1, keepdim=True).clamp_min(1e-30))).view_as(t)


@dataclass
class Observation:
    """Largest values seen: squared per-sample gradient norm of each parameter, output norm, input gradient."""

    param_sq: dict[str, float]
    output_norm: float
    input_grad: float


class GroundTruth:
    """Per-sample gradients of a materialised float64 model for a linear loss u.z or a real criterion."""

    def __init__(self, model64: nn.Module, criterion: nn.Module | None = None) -> None:
        self.model = model64
        self.params = {name: p.detach() for name, p in model64.named_parameters()}
        self.names = list(self.params)
        self.criterion = criterion

    def _terms(self, x: torch.Tensor, u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample [||dL/dθ_1||², ..., ||dL/dθ_P||², ||f(x)||², ||dL/dx||²]."""

        def loss(params, x):
            z = functional_call(self.model, params, (x[None],))
            if self.criterion is None:
                value = (z[0] * u).sum()
            else:
                value = self.criterion(z, target[None])
            return value, z[0]

        (g_params, g_x), z = grad(loss, argnums=(0, 1), has_aux=True)(self.params, x)
        values = [g_params[name].pow(2).sum() for name in self.names]
        values += [z.pow(2).sum(), g_x.pow(2).sum()]
        return torch.stack(values)

    def terms(self, x: torch.Tensor, u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return vmap(self._terms)(x, u, target)


def adversarial_search(
    truth: GroundTruth,
    input_shape: tuple[int, ...],
    radius: float,
    loss_lipschitz: float,
    claims: torch.Tensor,
    num_outputs: int,
    generator: torch.Generator,
    restarts: int = 3,
    steps: int = 40,
    random_samples: int = 64,
) -> torch.Tensor:
    """Max over the search of every term of ``GroundTruth.terms`` (the values, not squared norms).

    (a) ``random_samples`` inputs uniformly on the sphere of ``radius``; (b) projected normalised gradient
    ascent, ``restarts`` starts per term, on the input (sphere of ``radius``) and, for the linear loss, on u
    (sphere of ``loss_lipschitz``), each start maximising its term divided by its claim. Labels (real
    criterion) are random for (a) and cycle over the classes across the starts of (b), fixed along a path.
    """
    n_terms = claims.numel()
    dtype = torch.float64
    best = torch.zeros(n_terms, dtype=dtype)

    def draw(n):
        x = _normalise(torch.randn(n, *input_shape, generator=generator, dtype=dtype), radius)
        u = _normalise(torch.randn(n, num_outputs, generator=generator, dtype=dtype), loss_lipschitz)
        t = torch.randint(0, num_outputs, (n,), generator=generator)
        return x, u, t

    x, u, t = draw(random_samples)
    with torch.no_grad():
        best = torch.maximum(best, truth.terms(x, u, t).amax(dim=0).clamp_min(0).sqrt())

    # One start per (term, restart); start r of each term begins from a different random point.
    count = n_terms * restarts
    x, u, _ = draw(count)
    t = torch.arange(count) % num_outputs  # labels cycle over the starts of each term (worst label search)
    which = torch.arange(n_terms).repeat_interleave(restarts)
    scale = claims.clamp_min(1e-12)[which] ** 2
    for step in range(steps):
        lr = 0.5 * (0.03 / 0.5) ** (step / max(1, steps - 1))  # geometric decay of the step length
        x = x.detach().requires_grad_(True)
        u = u.detach().requires_grad_(truth.criterion is None)
        values = truth.terms(x, u, t)
        with torch.no_grad():
            best = torch.maximum(best, values.detach().amax(dim=0).clamp_min(0).sqrt())
        objective = (values[torch.arange(count), which] / scale).sum()
        inputs = [x, u] if truth.criterion is None else [x]
        grads = torch.autograd.grad(objective, inputs, allow_unused=True)
        with torch.no_grad():
            gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
            x = _normalise(x + lr * _normalise(gx + 1e-30, radius), radius)
            if truth.criterion is None:
                gu = grads[1] if grads[1] is not None else torch.zeros_like(u)
                u = _normalise(u + lr * _normalise(gu + 1e-30, loss_lipschitz), loss_lipschitz)
    x, u = x.detach(), u.detach()
    with torch.no_grad():
        best = torch.maximum(best, truth.terms(x, u, t).amax(dim=0).clamp_min(0).sqrt())
    return best
