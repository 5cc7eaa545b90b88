"""Per-sample clipping on the same lipdp model: the DP-SGD baseline beside certified bounds (docs/design.md §3).

``make_private(..., mechanism="clipping", max_grad_norm=C)`` releases, per step,

    g = (sum_i clip_C(grad(x_i)) + N(0, sigma^2 C^2 I)) / B,   clip_C(v) = v min(1, C / ||v||)

(Abadi et al. 2016), with the same Poisson sampling, accountant, journal and refusals as the certified
mechanism: only the sensitivity differs (C, enforced per record, instead of the certified bound Delta). Every
record's gradient is the whole vector of its gradients of the *materialised* weights and the plain parameters,
clipped jointly, so the released sum has L2 sensitivity C; the noisy gradient of a materialised weight is then
carried back through the orthogonalisation exactly as the certified mechanism's is (``reparametrization.py``).

Per-sample gradients without per-layer code: each training forward's input x is kept, and when the backward
pass brings the output gradient rows g_i (already fixed by ``OutputGradientHook``: sum-reduced, logit-clipped,
divided by K views), grad(x_i) = J_theta f(x_i)^T g_i is computed by ``torch.func`` (vmap of grad of
<f_theta(x_i), g_i>) on a hook-free call of the same model with the same weights. With K views a record's rows
are summed before clipping (its gradient is the mean of its views'). A record's norm is computed in float32 blocks
summed in float64 and inflated by their rounding bound (``squared_norms``, ``SQUARED_NORM_ERROR``), so a clipped
record's norm is <= C whatever the summation order. Forwards of public data
(``lipdp.hooks.public_data``) are clipped row by row: sound, and they need no privacy.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lipdp.hooks import in_public_block
from lipdp.reparametrization import MaterializedWeights

MECHANISMS = ("bounds", "clipping")

#: Per-row gradients computed at once are capped at this many numbers (rows x parameters): memory, not results.
CHUNK_ELEMENTS = 2**25

#: Squared norms are summed in float32 over blocks of this many coordinates, then in float64 over blocks.
NORM_BLOCK = 64

#: Upper bound on the relative error of ``squared_norms``: each block's float32 sum of squares is within
#: gamma_(b+2) = (b+2)u / (1-(b+2)u) of its value in any summation order (Higham 2002, Thm 4.1; u = 2^-24, b the
#: block), ~3.9e-6 for b = 64; the float64 sum over blocks adds < 1e-12. 2^-17 ~ 7.6e-6 covers both.
SQUARED_NORM_ERROR = 2.0**-17


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """||v_r||^2 of each row r (leading dimension), in float64, computed as float32 norms of NORM_BLOCK-coordinate
    blocks summed in float64: within a relative SQUARED_NORM_ERROR of the exact value, and 20-40x faster than
    squaring a float64 copy of the rows (the per-row gradients of a 200k-weight dense layer)."""
    flat = rows.flatten(1)
    whole = flat.shape[1] // NORM_BLOCK * NORM_BLOCK
    blocks = torch.linalg.vector_norm(flat[:, :whole].reshape(flat.shape[0], -1, NORM_BLOCK), dim=-1)
    tail = torch.linalg.vector_norm(flat[:, whole:], dim=1)
    return blocks.double().pow(2).sum(1) + tail.double().pow(2)


class _HookFree(nn.Module):
    """Calls the model's ``forward`` directly: its top-level hooks (input guard, output fix, this clipper) stay
    out of the per-sample replay; every inner layer runs as in training."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's forward, without its hooks."""
        return self.model.forward(x)


class PerRowGradients:
    """grad_theta <f_theta(x_r), g_r> for every row r of a batch: each row's gradient of the model's plain parameters
    and materialised weights given the output gradient g_r, by ``torch.func`` (vmap of grad) on a hook-free call of
    the same model (materialised weights substituted: ``MaterializedWeights.substituted``). Keys: plain parameter
    names, ``path.weight`` for materialised weights (the mechanism's keys)."""

    def __init__(self, model: nn.Module, materialized: MaterializedWeights, plain: dict[str, nn.Parameter]) -> None:
        self.materialized = materialized
        self.plain = plain
        self.replay = _HookFree(model)

    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors a forward uses now: plain parameters and materialised weights, detached."""
        weights = {name: parameter.detach() for name, parameter in self.plain.items()}
        with torch.no_grad():
            weights.update((key, self.materialized.leaf(module).detach())
                           for key, module in self.materialized.modules.items())
        return weights

    def __call__(self, weights: dict[str, torch.Tensor], inputs: torch.Tensor,
                 grad_outputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row gradients (leading dimension: the rows of ``inputs``), keyed like ``weights``."""
        model_prefix = {name: f"model.{name}" for name in self.plain}
        modules = self.materialized.modules

        def inner_product(weights: dict[str, torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            plain = {model_prefix[name]: weights[name] for name in self.plain}
            with self.materialized.substituted({modules[key]: weights[key] for key in modules}):
                output = functional_call(self.replay, plain, (x.unsqueeze(0),))
            return (output * g.unsqueeze(0)).sum()

        return vmap(grad(inner_product), in_dims=(None, 0, 0))(weights, inputs, grad_outputs)


class PerSampleClipping:
    """Accumulates sum_i clip_C(grad(x_i)) over the step's backward passes, keyed like the mechanism's gradients
    (plain parameter names, and ``path.weight`` for materialised weights)."""

    def __init__(self, model: nn.Module, materialized: MaterializedWeights, plain: dict[str, nn.Parameter],
                 max_grad_norm: float, views: int = 1) -> None:
        self.max_grad_norm = float(max_grad_norm)
        self.views = views
        self.row_gradients = PerRowGradients(model, materialized, plain)
        self.sums: dict[str, torch.Tensor] = {}
        self.handle = model.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            inputs, views = args[0].detach(), (1 if in_public_block() else self.views)
            weights = self.row_gradients.weights()
            output.register_hook(lambda grad_output: self._accumulate(weights, inputs, grad_output, views))

    def _accumulate(self, weights: dict[str, torch.Tensor], inputs: torch.Tensor, grad_outputs: torch.Tensor,
                    views: int) -> None:
        """Add sum over this pass's records of clip_C(sum of the record's view rows' gradients)."""
        rows = inputs.shape[0]
        if rows == 0:
            return
        records = rows // views
        size = sum(weight.numel() for weight in weights.values())
        chunk = max(1, CHUNK_ELEMENTS // max(1, size * views))
        # View-major rows (lipdp.augment.make_views): record j's views are rows k * records + j.
        inputs = inputs.reshape(views, records, *inputs.shape[1:])
        grad_outputs = grad_outputs.detach().reshape(views, records, *grad_outputs.shape[1:])
        for start in range(0, records, chunk):
            x = inputs[:, start:start + chunk].flatten(0, 1)
            g = grad_outputs[:, start:start + chunk].flatten(0, 1)
            per_row = self.row_gradients(weights, x, g)
            per_record = per_row if views == 1 else \
                {name: rows_.reshape(views, -1, *rows_.shape[1:]).sum(0) for name, rows_ in per_row.items()}
            squares = sum(squared_norms(value) for value in per_record.values()) * (1.0 + SQUARED_NORM_ERROR)
            factors = (self.max_grad_norm / squares.sqrt().clamp_min(1e-300)).clamp(max=1.0)
            for name, value in per_record.items():
                clipped = torch.tensordot(factors.to(value.dtype), value, dims=1)
                self.sums[name] = self.sums[name] + clipped if name in self.sums else clipped

    def gradients(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The clipped sums, keyed and shaped as ``like`` (zeros where no record reached a tensor)."""
        return {name: self.sums.get(name, torch.zeros_like(tensor)).to(tensor.dtype) for name, tensor in like.items()}

    def noise(self, names: Iterable[str], noise_multiplier: float) -> tuple[dict[str, float], dict[str, float]]:
        """Sensitivities and noise stds: every record's whole gradient has norm <= C, so one Gaussian mechanism of
        std sigma C on every coordinate (each group's own sensitivity is C too, reported as such)."""
        std = noise_multiplier * self.max_grad_norm
        return {name: self.max_grad_norm for name in names}, {name: std for name in names}

    def reset(self) -> None:
        """A new step starts: forget the clipped sums."""
        self.sums = {}
