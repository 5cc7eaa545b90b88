"""The per-step Gaussian mechanism on the summed batch gradient (docs/design.md §1, §3).

release(): g_d = (sum_i grad_d(x_i) + N(0, s_d^2 I)) / B for every parameter group d, with Delta_d from the
bound analysis of the current (public) weights, s_d from the noise strategy, B the *expected* batch size. With
``clipping`` (``lipdp.clipping``, the DP-SGD baseline on the same model) the sums are of per-record gradients clipped
jointly to C instead, and every s_d = sigma C.
Nothing is modified before every check has passed (finite gradients, privacy budget), so a refused step
releases nothing. One accountant step per release, with sigma_eff computed from the actual stds.
Multi-process: ``reduce_gradients`` sums each gradient over the ranks first (``distributed.py``). With a
``journal``, the step is recorded on disk before any noise is drawn (write-ahead, ``journal.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from lipdp.bounds import BoundPlan, BoundReport, CertifiedNormCache
from lipdp.clipping import PerSampleClipping
from lipdp.journal import StepJournal
from lipdp.noise import GaussianNoise, effective_noise_multiplier, noise_stds
from lipdp.reparametrization import MaterializedWeights


class PrivacyBudgetExceeded(RuntimeError):
    """Raised by the step that would spend more than ``max_epsilon``; that step releases nothing."""


@dataclass
class MechanismConfig:
    """Everything the mechanism needs besides the model. ``bound_refresh_every`` / ``bound_refresh_tolerance``:
    the certified operator norms are recomputed exactly every that many steps, or sooner when their Weyl drift
    term exceeds that fraction of the exact norm (``CertifiedNormCache``); in between the bound is
    exact(W0) + c ||W - W0||_F, never below the exact one."""

    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    input_norm_bound: float
    loss_lipschitz: float
    input_shape: tuple[int, ...]
    noise_strategy: str = "global"
    max_epsilon: float | None = None
    target_delta: float | None = None
    bound_refresh_every: int = 20
    bound_refresh_tolerance: float = 0.01  # 1%: looser bounds would cost noise (and accuracy) at every step


class GradientMechanism:
    """Noises the model's summed gradients in place and records the step with the accountant.

    The bound analysis is a ``BoundPlan`` built here (at ``make_private``): rules, shapes and keys resolved once;
    each step measures the weight-dependent numbers (certified norms with Weyl drift between exact refreshes
    every ``MechanismConfig.bound_refresh_every`` steps, bias norms) and the gradients' finiteness in one batched
    device computation and one host transfer, then draws the noise per (dtype, device) group in one call.
    """

    def __init__(self, model: nn.Module, config: MechanismConfig, accountant, generator: torch.Generator,
                 shapes: dict, materialized: MaterializedWeights,
                 reduce_gradients: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] | None = None,
                 clipping: PerSampleClipping | None = None) -> None:
        self.model = model
        self.clipping = clipping
        self.config = config
        self.accountant = accountant
        self.noise = GaussianNoise(generator)
        self.materialized = materialized
        self.reduce_gradients = reduce_gradients
        self.journal: StepJournal | None = None
        self.norm_cache = CertifiedNormCache(refresh_tolerance=config.bound_refresh_tolerance,
                                             refresh_every=config.bound_refresh_every)
        self.plan = BoundPlan(model, config.input_norm_bound, config.loss_lipschitz, config.input_shape,
                              self.norm_cache, shapes, self._weights())
        self.last_sensitivities: dict[str, float] = {}
        self.last_stds: dict[str, float] = {}
        self._allowed_steps: dict[tuple[float, float], int] = {}

    def _weights(self) -> dict[nn.Module, torch.Tensor]:
        return {module: self.materialized.leaf(module) for module in self.materialized.modules.values()}

    def analysis(self) -> BoundReport:
        """The bound analysis (``BoundReport``) of the current weights."""
        return self.plan.report(self._weights())

    def _check_budget(self) -> None:
        config = self.config
        if config.max_epsilon is None:
            return
        key = (config.noise_multiplier, config.sample_rate)
        if key not in self._allowed_steps:
            self._allowed_steps[key] = self.accountant.total_steps + self.accountant.max_additional_steps(
                config.noise_multiplier, config.sample_rate, config.max_epsilon, config.target_delta)
        if self.accountant.total_steps + 1 > self._allowed_steps[key]:
            spent = self.accountant.epsilon(config.target_delta)
            raise PrivacyBudgetExceeded(
                f"this step would spend more than max_epsilon={config.max_epsilon} at delta={config.target_delta} "
                f"(spent so far: {spent:.4g} after {self.accountant.total_steps} steps). Training stops here; "
                "nothing from this step was released."
            )

    @staticmethod
    def _check_representable(values: dict[str, float], grads: dict[str, torch.Tensor]) -> None:
        """Refuse sensitivities or noise stds that are not finite, or too large for the gradient's dtype (the
        noisy gradient would overflow to inf: a step that releases nothing usable, never a silent one)."""
        for name, value in values.items():
            limit = torch.finfo(grads[name].dtype).max / 1e6
            if not (math.isfinite(value) and 0 <= value < limit):
                raise FloatingPointError(
                    f"{name}: sensitivity/noise std {value:.4g} is not a usable {grads[name].dtype} number: nothing "
                    "was released. Fix: check noise_multiplier, input_norm_bound and the weights for absurd values."
                )

    @staticmethod
    def _check_finite(grads: dict[str, torch.Tensor], norms: list[float]) -> None:
        """Refuse NaN/inf gradients. ``norms`` (one per gradient, float64 accumulation, fetched with the bounds)
        are finite unless an entry is NaN/inf or (float64 gradients only) the squares overflow; only then is that
        gradient checked entry by entry."""
        for (name, grad), norm in zip(grads.items(), norms):
            if not math.isfinite(norm) and not bool(torch.isfinite(grad).all()):
                raise FloatingPointError(
                    f"the gradient of {name} contains NaN/inf: nothing was released. Check the loss and inputs "
                    "(an empty batch with a 'mean' loss is handled; a NaN loss is not)."
                )

    def _certified_noise(self, report: BoundReport, grads: dict[str, torch.Tensor]
                         ) -> tuple[dict[str, float], dict[str, float]]:
        """The certified sensitivities and the noise strategy's stds, checked to reach sigma_eff = sigma."""
        config = self.config
        sensitivities = report.sensitivities
        self._check_representable(sensitivities, grads)
        try:
            stds = noise_stds(sensitivities, report.sizes, config.noise_multiplier, config.noise_strategy)
            sigma_eff = effective_noise_multiplier(sensitivities, stds)
        except OverflowError as error:
            raise FloatingPointError(
                f"noise_multiplier={config.noise_multiplier} and sensitivities {sensitivities} overflow the noise "
                "computation: nothing was released. Fix: use magnitudes of noise_multiplier and input_norm_bound "
                "that a float can hold."
            ) from error
        if not math.isclose(sigma_eff, config.noise_multiplier, rel_tol=1e-9) and sigma_eff != math.inf:
            raise AssertionError(f"noise strategy gave sigma_eff={sigma_eff}, expected {config.noise_multiplier}")
        return sensitivities, stds

    def zero_grad(self) -> None:
        """A new step: clear the materialised weights' gradients (and the clipped sums)."""
        self.materialized.zero_grad()
        if self.clipping is not None:
            self.clipping.reset()

    def release(self) -> None:
        """One private step: g_d = (sum_i grad_d(x_i) + N(0, s_d^2 I)) / B for every group d, after every check
        (drawn as sum / B + N(0, (s_d / B)^2 I), the same distribution).

        Order (a refused step releases nothing): gradients gathered (and summed over ranks); finiteness and the
        bounds measured in one host transfer; sensitivities and stds checked representable; sigma_eff checked;
        the budget checked; the journal written; only then noise drawn and the gradients replaced.
        """
        config = self.config
        weights = self._weights()
        with torch.no_grad():
            leaf_grads = self.materialized.gradients()
        plain = self.plan.plain_parameters()
        grads: dict[str, torch.Tensor] = {}
        for name, parameter in plain.items():
            grads[name] = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
        for key, module in self.materialized.modules.items():
            grad = leaf_grads[key]
            grads[key] = grad if grad is not None else torch.zeros_like(weights[module])
        if self.clipping is not None:  # the released sums are the clipped per-record ones
            grads = self.clipping.gradients(like=grads)
        if self.reduce_gradients is not None:
            grads = dict(zip(grads, self.reduce_gradients(list(grads.values()))))
        with torch.no_grad():
            report, norms = self.plan.evaluate(weights, norms_of=list(grads.values()))
        self._check_finite(grads, norms)
        if self.clipping is not None:
            sensitivities, stds = self.clipping.noise(grads, config.noise_multiplier)
        else:
            sensitivities, stds = self._certified_noise(report, grads)
        self._check_representable(stds, grads)
        self._check_budget()
        if self.journal is not None:
            self.journal.append(self.accountant.total_steps + 1, config.noise_multiplier, config.sample_rate)
        with torch.no_grad():  # (g + N(0, s^2)) / B drawn as g / B + N(0, (s / B)^2): one scaling per group
            batch = float(config.expected_batch_size)
            draws = self.noise.sample(grads, {name: std / batch for name, std in stds.items()})
            noisy = [draws[name] for name in grads]
            torch._foreach_add_(noisy, list(grads.values()), alpha=1.0 / batch)
            noisy = dict(zip(grads, noisy))
            for name, parameter in plain.items():
                parameter.grad = noisy[name]
        self.materialized.backpropagate({key: noisy[key] for key in self.materialized.modules})
        self.accountant.step(noise_multiplier=config.noise_multiplier, sample_rate=config.sample_rate)
        self.norm_cache.advance()
        if self.clipping is not None:
            self.clipping.reset()
        self.last_sensitivities = sensitivities
        self.last_stds = stds
