"""What ``LipDPEngine.make_private`` checks before it attaches anything: the arguments, the Opacus-only arguments a
new user may bring along (refused with lipdp's equivalent), and a loss that a 1-Lipschitz model cannot fit.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from accounting.validation import check_delta, check_noise_multiplier, check_positive
from lipdp.losses import LipschitzCrossEntropy, loss_lipschitz
from lipdp.noise import NOISE_STRATEGIES

#: Opacus ``make_private`` arguments that have no meaning in lipdp -> what to do instead.
OPACUS_ONLY_ARGUMENTS = {
    "max_grad_norm": "lipdp's certified mechanism clips no per-sample gradient: the bounds are certified from "
                     "input_norm_bound and the model. To bound each sample's logit gradient, pass loss_grad_clip=C; "
                     "for DP-SGD's per-sample clipping on this model, pass mechanism='clipping' with max_grad_norm",
    "clipping": "lipdp clips no per-sample gradient; spread the noise with noise_strategy='global' | 'per_layer' | "
                "'min_energy' and clip logit gradients with loss_grad_clip=C",
    "poisson_sampling": "drop it: lipdp always samples Poisson batches (the returned data loader)",
    "grad_sample_mode": "drop it: lipdp computes no per-sample gradients (no hooks, functorch or ghost mode)",
    "batch_first": "drop it: lipdp needs no per-sample gradient layout",
    "noise_generator": "the engine owns its generators: LipDPEngine(seed=...) or LipDPEngine(secure_mode=True)",
    "normalize_clipping": "drop it: lipdp clips no per-sample gradient",
    "total_steps": "drop it: the accountant counts the steps as they are taken",
    "target_epsilon": "use make_private_with_epsilon(target_epsilon=..., target_delta=..., epochs=...)",
    "epochs": "use make_private_with_epsilon(target_epsilon=..., target_delta=..., epochs=...)",
    "accountant": "choose the accountant when creating the engine: LipDPEngine(accountant='prv' | 'rdp' | 'pld')",
}


def reject_unknown_arguments(arguments: dict, function: str) -> None:
    """``TypeError`` naming lipdp's equivalent for an Opacus-only argument, as Python's for any other."""
    for name in arguments:
        if name in OPACUS_ONLY_ARGUMENTS:
            raise TypeError(f"{function}() got the Opacus argument {name!r}, which lipdp does not take. "
                            f"Fix: {OPACUS_ONLY_ARGUMENTS[name]}.")
        raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")


def check_mechanism(mechanism: str, max_grad_norm: float | None, noise_strategy: str) -> float | None:
    """The clipping norm C of ``mechanism='clipping'`` (None for the certified ``'bounds'``), checked."""
    from lipdp.clipping import MECHANISMS

    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}. Fix: 'bounds' (certified, the "
                         "default) or 'clipping' (per-sample clipping, with max_grad_norm)")
    if mechanism == "bounds":
        if max_grad_norm is not None:
            raise TypeError("make_private() got the Opacus argument 'max_grad_norm' with the certified mechanism. "
                            f"Fix: {OPACUS_ONLY_ARGUMENTS['max_grad_norm']}.")
        return None
    if max_grad_norm is None:
        raise ValueError("mechanism='clipping' needs the norm C each record's gradient is clipped to. Fix: pass "
                         "max_grad_norm=C (lipdp train: --max-grad-norm C)")
    if noise_strategy != "global":
        raise ValueError(f"mechanism='clipping' clips each record's whole gradient to one norm, so its noise is "
                         f"global; got noise_strategy={noise_strategy!r}. Fix: drop noise_strategy")
    return check_positive(max_grad_norm, "max_grad_norm")


def check_private_arguments(*, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                            criterion: nn.Module, noise_multiplier: float, input_norm_bound: float,
                            loss_reduction: str, noise_strategy: str, loss_grad_clip: float | None,
                            max_epsilon: float | None, target_delta: float | None) -> dict:
    """Check ``make_private``'s arguments (types, ranges, agreements); returns the checked numbers and the loss's
    Lipschitz constant in the logits, min(L, clip) (the clip alone bounds a loss lipdp does not know)."""
    from lipdp.optimizer import DPOptimizer

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DPOptimizer):
        raise TypeError("optimizer must be an ordinary torch.optim.Optimizer over the model's parameters")
    if not isinstance(data_loader, DataLoader):
        raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
    if data_loader.batch_size is None:
        raise ValueError("data_loader needs a batch_size (the expected Poisson batch size)")
    checked = {"input_norm_bound": check_positive(input_norm_bound, "input_norm_bound"),
               "noise_multiplier": check_noise_multiplier(noise_multiplier)}
    if loss_grad_clip is not None:
        loss_grad_clip = check_positive(loss_grad_clip, "loss_grad_clip")
    if noise_strategy not in NOISE_STRATEGIES:
        raise ValueError(f"noise_strategy must be one of {NOISE_STRATEGIES}, got {noise_strategy!r}")
    if target_delta is not None:
        target_delta = check_delta(target_delta, "target_delta")
    if max_epsilon is not None:
        if target_delta is None:
            raise ValueError("max_epsilon needs a target_delta")
        max_epsilon = check_positive(max_epsilon, "max_epsilon")
    reduction = getattr(criterion, "reduction", loss_reduction)
    if reduction != loss_reduction:
        raise ValueError(f"criterion.reduction={reduction!r} but loss_reduction={loss_reduction!r}: they must agree "
                         "(the engine turns a mean over the batch into a sum before noising).")
    if loss_grad_clip is not None:
        try:
            lipschitz = min(loss_grad_clip, loss_lipschitz(criterion))
        except ValueError:
            lipschitz = float(loss_grad_clip)
    else:
        lipschitz = loss_lipschitz(criterion)
    return {**checked, "loss_grad_clip": loss_grad_clip, "target_delta": target_delta, "max_epsilon": max_epsilon,
            "loss_lipschitz": float(lipschitz)}


def best_cross_entropy(logit_radius: float, classes: int, temperature: float) -> float:
    """The lowest value CE(tau z, y) / tau can take when the logits lie in a ball of radius r = Lip(f) X0 (around a
    shared centre): the best logit vector is r (e_y - 1/K) / ||e_y - 1/K||, whose margin over every other class is
    m = r sqrt(K / (K - 1)), hence log(1 + (K - 1) exp(-tau m)) / tau."""
    margin = logit_radius * math.sqrt(classes / (classes - 1))
    return math.log1p((classes - 1) * math.exp(-temperature * margin)) / temperature


def lipschitz_stays_capped(model: nn.Module) -> bool:
    """True if training cannot raise the model's Lipschitz constant: no trainable free weight (a plain dense or conv
    layer, whose spectral norm grows with its weights); orthogonal (reparametrised) layers stay 1-Lipschitz."""
    from lipdp.bounds import is_reparametrized

    free = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return not any(isinstance(module, free) and not is_reparametrized(module)
                   and getattr(module, "weight", None) is not None and module.weight.requires_grad
                   for module in model.modules())


def warn_if_unfittable(criterion: nn.Module, model: nn.Module, lipschitz: float, input_norm_bound: float,
                       classes: int | None) -> None:
    """Warn when a cross-entropy cannot get far below chance (log K / tau) on a model whose certified Lipschitz
    constant ``lipschitz`` training cannot raise (``lipschitz_stays_capped``), with inputs of norm <=
    ``input_norm_bound``: even a perfect classifier's loss stays above half the chance level, so training barely
    moves (the usual fix: a temperature)."""
    if not lipschitz_stays_capped(model):
        return
    if isinstance(criterion, LipschitzCrossEntropy):
        temperature, name = criterion.temperature, "LipschitzCrossEntropy"
    elif isinstance(criterion, nn.CrossEntropyLoss):
        temperature, name = 1.0, "nn.CrossEntropyLoss"
    else:
        return
    if classes is None or classes < 2 or not math.isfinite(lipschitz):
        return
    radius = max(lipschitz, 1e-12) * input_norm_bound
    best, chance = best_cross_entropy(radius, classes, temperature), math.log(classes) / temperature
    if best > 0.5 * chance:
        suggested = math.ceil(4 / radius)
        warnings.warn(
            f"{name} at temperature {temperature:g} cannot be fitted by this model: with inputs of norm <= "
            f"{input_norm_bound:g} and a Lipschitz constant <= {lipschitz:.3g}, its logits move by at most "
            f"{radius:.3g}, so even a perfect classifier's loss stays at {best:.3f} or more (chance: {chance:.3f}) "
            f"and training barely moves. Fix: use lipdp.losses.LipschitzCrossEntropy(temperature={suggested}) "
            "(same privacy: its Lipschitz constant is sqrt(2) at any temperature)", UserWarning, stacklevel=3)
