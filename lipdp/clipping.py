"""Per-sample clipping on the same lipdp model: the DP-SGD baseline beside certified bounds (docs/design.md §3).

``make_private(..., mechanism="clipping", max_grad_norm=C)`` releases, per step,

    g = (sum_i clip_C(grad(x_i)) + N(0, sigma^2 C^2 I)) / B,   clip_C(v) = v min(1, C / ||v||)

(Abadi et al. 2016), with the same Poisson sampling, accountant, journal and refusals as the certified
mechanism: only the sensitivity differs (C, enforced per record, instead of the certified bound Delta). Every
record's gradient is the whole vector of its gradients of the *materialised* weights and the plain parameters,
clipped jointly, so the released sum has L2 sensitivity C; the noisy gradient of a materialised weight is then
carried back through the orthogonalisation exactly as the certified mechanism's is (``reparametrization.py``).

Per-record gradients come from one of two paths, chosen per pass (``PerSampleClipping``): the layer rows of
``lipdp.layer_gradients`` where every trainable tensor sits in a dense or one-group conv layer and that is the
cheaper path (the patch CNN and the MLPs: no replay), else a replay. For the replay each training forward's input x is kept, and when the backward
pass brings the output gradient rows g_i (already fixed by ``OutputGradientHook``: sum-reduced, logit-clipped,
divided by K views), grad(x_i) = J_theta f(x_i)^T g_i is computed by ``torch.func`` (vmap of grad of
<f_theta(x_i), g_i>) on a hook-free call of the same model with the same weights. With K views a record's rows
are summed before clipping (its gradient is the mean of its views'). A replayed record's norm is computed in float32
blocks summed in float64 and inflated by their rounding bound (``squared_norms``, ``SQUARED_NORM_ERROR``), so a
clipped record's norm is <= C whatever the summation order. Forwards of public data
(``lipdp.hooks.public_data``) are clipped row by row: sound, and they need no privacy.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.autograd import Variable
from torch.func import functional_call, grad, vmap

from lipdp.hooks import in_public_block
from lipdp.layer_gradients import clipped_sums, layer_rows, record_norm_bounds, supported
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

#: The layer path's factors C / bound are shrunk by this much more, so that rounding them to float32 (2^-24)
#: cannot lift a record above C.
LAYER_FACTOR_MARGIN = 2.0**-20


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """||v_r||^2 of each row r (leading dimension), in float64, computed as float32 norms of NORM_BLOCK-coordinate
    blocks summed in float64: within a relative SQUARED_NORM_ERROR of the exact value, and 20-40x faster than
    squaring a float64 copy of the rows (the per-row gradients of a 200k-weight dense layer)."""
    flat = rows.flatten(1)
    whole = flat.shape[1] // NORM_BLOCK * NORM_BLOCK
    blocks = torch.linalg.vector_norm(flat[:, :whole].reshape(flat.shape[0], -1, NORM_BLOCK), dim=-1)
    tail = torch.linalg.vector_norm(flat[:, whole:], dim=1)
    return blocks.double().pow(2).sum(1) + tail.double().pow(2)


def _layer_keys(model: nn.Module, materialized: MaterializedWeights, plain: dict[str, nn.Parameter]
                ) -> dict[nn.Module, tuple[str, str | None]] | None:
    """Each dense / conv layer -> the mechanism's keys of its weight and bias (None: no trainable bias), if those
    layers hold every trainable tensor; else None (the torch.func replay handles the model)."""
    materialized_keys = {module: key for key, module in materialized.modules.items()}
    layers, covered = {}, set()
    for path, module in model.named_modules():
        if not supported(module):
            continue
        prefix = f"{path}." if path else ""
        weight = materialized_keys.get(module) or (f"{prefix}weight" if f"{prefix}weight" in plain else None)
        bias = f"{prefix}bias" if f"{prefix}bias" in plain else None
        if weight is None:
            continue  # a frozen weight: its bias, if trainable, is left to the replay
        layers[module] = (weight, bias)
        covered.update(key for key in (weight, bias) if key is not None)
    return layers if covered == set(plain) | set(materialized.modules) else None


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


class _Pass:
    """One training forward's captures: each dense/conv layer's input and, once the backward reaches it, its output
    gradient (``lipdp.layer_gradients``)."""

    def __init__(self) -> None:
        self.layers: list[list] = []  # [module, input, output gradient or None, id of the output]


class PerSampleClipping:
    """Accumulates sum_i clip_C(grad(x_i)) over the step's backward passes, keyed like the mechanism's gradients
    (plain parameter names, and ``path.weight`` for materialised weights).

    Where every trainable tensor is the weight or bias of a dense or one-group convolution layer (the orthogonal
    networks) and forming the per-record gradients of layers reached by several rows costs no more multiply-adds
    than the one-row (dense) layers' forward (the patch CNN and MLPs; not the orthogonal 3x3 CNN), each record's
    gradient comes from the rows the training pass computed (``lipdp.layer_gradients``:
    no replay; on the patch CNN at B 2048 a clipping step went from 8x to 1.2-1.4x the certified one,
    benchmarks/RESULTS.md); otherwise, or for a pass
    where a layer ran twice, from the torch.func replay (``PerRowGradients``). Either way the clipped records are
    the exact gradients of the captured rows, within the stated float margins."""

    def __init__(self, model: nn.Module, materialized: MaterializedWeights, plain: dict[str, nn.Parameter],
                 max_grad_norm: float, views: int = 1) -> None:
        self.max_grad_norm = float(max_grad_norm)
        self.views = views
        self.row_gradients = PerRowGradients(model, materialized, plain)
        self.sums: dict[str, torch.Tensor] = {}
        self.layers = _layer_keys(model, materialized, plain)
        self._pass: _Pass | None = None
        self.handles = [model.register_forward_hook(self._capture)]
        if self.layers is not None:
            self.handles.append(model.register_forward_pre_hook(self._begin))
            self.handles += [module.register_forward_hook(self._capture_layer) for module in self.layers]

    def _begin(self, module: nn.Module, args: tuple) -> None:
        self._pass = _Pass() if torch.is_grad_enabled() else None

    def _capture_layer(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._pass is not None and isinstance(output, torch.Tensor) and output.requires_grad:
            entry = [module, args[0].detach(), None, id(output)]
            self._pass.layers.append(entry)
            output.register_hook(lambda grad_output: entry.__setitem__(2, grad_output.detach()))

    def _capture(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured, self._pass = self._pass, None
        if isinstance(output, torch.Tensor) and output.requires_grad:
            inputs, views = args[0].detach(), (1 if in_public_block() else self.views)
            weights = self.row_gradients.weights()

            # A layer whose output is the model's saw its gradient before the output fix (its hook came first).
            last = [entry for entry in (captured.layers if captured else []) if entry[3] == id(output)]

            def on_gradient(grad_output: torch.Tensor) -> None:
                for entry in last:
                    entry[2] = grad_output.detach()
                # The other layers' output gradients arrive later in this backward: clip once it has finished.
                Variable._execution_engine.queue_callback(
                    lambda: self._accumulate(weights, inputs, grad_output, views, captured))

            output.register_hook(on_gradient)

    def _accumulate(self, weights: dict[str, torch.Tensor], inputs: torch.Tensor, grad_outputs: torch.Tensor,
                    views: int, captured: _Pass | None) -> None:
        """Add sum over this pass's records of clip_C(sum of the record's view rows' gradients)."""
        rows = inputs.shape[0]
        if rows == 0:
            return
        layers, width = self._layer_rows(captured, rows)
        if layers:
            self._accumulate_layers(layers, views, width)
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
                self._add(name, torch.tensordot(factors.to(value.dtype), value, dims=1))

    def _layer_rows(self, captured: _Pass | None, rows: int) -> tuple[list | None, int]:
        """([(module, input, output gradient)] of every layer the backward reached in this pass, or None when the
        replay must do it: no captures, a layer run twice, rows that do not match, or forming per-record gradients
        would cost more than the replay (see the class docstring); and the numbers one record holds at its largest
        layer: its rows (A, G) and, where formed, its weight gradient)."""
        if captured is None or len({id(entry[0]) for entry in captured.layers}) != len(captured.layers):
            return None, 0
        layers = [tuple(entry[:3]) for entry in captured.layers if entry[2] is not None]
        formed = single = width = 0  # multiply-adds per record: forming W_r (several rows) / one-row layers' forward
        for module, inputs, grad in layers:
            pair = layer_rows(module, inputs[:1], grad[:1])
            if inputs.shape[0] != rows or pair is None:
                return None, 0
            a, g = pair
            width = max(width, self.views * (a[0].numel() + g[0].numel()) + a.shape[2] * g.shape[2])
            if a.shape[1] * self.views > 1:
                formed += a.shape[1] * self.views * a.shape[2] * g.shape[2]
            else:
                single += a.shape[2] * g.shape[2]
        # Forming W_r in float64 costs about a per-sample backward: where it dominates (convolution stacks such as
        # the orthogonal CNN, slower than the replay in a scratch timing) the replay is faster.
        return (layers if formed <= single else None), width

    def _accumulate_layers(self, layers: list, views: int, width: int) -> None:
        """The layer path (class docstring), in chunks of records of ``width`` numbers each: each chunk's norms over
        every layer, factors, then its clipped sums."""
        records, device = layers[0][1].shape[0] // views, layers[0][1].device
        chunk = max(1, CHUNK_ELEMENTS // max(1, width))
        for start in range(0, records, chunk):
            # View-major rows (lipdp.augment.make_views): record j's views are rows k * records + j.
            index = (torch.arange(start, min(start + chunk, records), device=device)[None, :]
                     + records * torch.arange(views, device=device)[:, None]).flatten()
            parts = [(module, *layer_rows(module, inputs[index], grad[index])) for module, inputs, grad in layers]
            squares = sum(record_norm_bounds(a, g, views, self.layers[module][1] is not None)
                          for module, a, g in parts)
            # LAYER_FACTOR_MARGIN: rounding the factors to float32 (2^-24) cannot lift a record above C.
            factors = (self.max_grad_norm / (squares.sqrt().clamp_min(1e-300) * (1.0 + LAYER_FACTOR_MARGIN))
                       ).clamp(max=1.0)
            for module, a, g in parts:
                weight_key, bias_key = self.layers[module]
                weight, bias = clipped_sums(module, a, g, factors, views)
                self._add(weight_key, weight)
                if bias_key is not None:
                    self._add(bias_key, bias)

    def _add(self, name: str, clipped: torch.Tensor) -> None:
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
