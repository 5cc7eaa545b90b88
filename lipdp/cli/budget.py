"""``lipdp budget``: ε of a training configuration, or the σ it needs (torch-free: only ``accounting`` is imported).

Prints ε for every requested backend side by side (``--noise-multiplier``), or the calibrated noise
multiplier per backend (``--target-epsilon``); ``--json`` prints one JSON object instead. Bad input
prints one ``lipdp budget: error:`` line to stderr and exits with status 2 (``lipdp.cli.errors``).
"""

from __future__ import annotations

import argparse
import json

from accounting.accountant import PrivacyAccountant
from accounting.backends import BACKENDS, available_backends
from accounting.backends.pld import INSTALL_HINT
from accounting.calibration import SIGMA_RANGE, SIGMA_RTOL, calibrate_noise, steps_for_epochs
from accounting.validation import check_delta, check_noise_multiplier, check_positive, check_sample_rate, check_steps

HELP = "epsilon for a noise multiplier, or the noise for a target epsilon"
FORMATTER = argparse.RawDescriptionHelpFormatter
DESCRIPTION = """\
Privacy budget of DP training with Poisson sampling at rate q and Gaussian noise multiplier σ
(T steps). Give σ to get ε, or a target ε to get the smallest σ that meets it."""

EPILOG = """\
examples:
  %(prog)s --noise-multiplier 1.1 --batch-size 256 --dataset-size 60000 --epochs 15 --delta 1e-5
  %(prog)s --target-epsilon 3 --sample-rate 0.004 --steps 5000 --backend prv --json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``budget`` options to ``parser``."""
    what = parser.add_argument_group("what to compute (one of)").add_mutually_exclusive_group(required=True)
    what.add_argument("--noise-multiplier", type=float, metavar="SIGMA",
                      help="noise std divided by the sensitivity (σ > 0): print the ε it spends")
    what.add_argument("--target-epsilon", type=float, metavar="EPS",
                      help=f"privacy budget ε > 0: print the smallest σ (in [{SIGMA_RANGE[0]:g}, {SIGMA_RANGE[1]:g}], "
                           f"to a relative {SIGMA_RTOL:g}) whose ε does not exceed it")
    rate = parser.add_argument_group("sampling rate (--sample-rate, or --batch-size with --dataset-size)")
    rate_choice = rate.add_mutually_exclusive_group(required=True)
    rate_choice.add_argument("--sample-rate", type=float, metavar="Q",
                             help="Poisson sampling probability of each record per step, in (0, 1]")
    rate_choice.add_argument("--batch-size", type=int, metavar="B",
                             help="expected batch size; q = B / N (needs --dataset-size)")
    rate.add_argument("--dataset-size", type=int, metavar="N", help="number of records N (with --batch-size)")
    length = parser.add_argument_group("training length (one of)").add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, metavar="T", help="number of noisy steps T >= 1")
    length.add_argument("--epochs", type=float, metavar="E",
                        help="number of epochs E > 0; T = ceil(E / q) (an epoch is 1/q steps in expectation)")
    parser.add_argument("--delta", type=float, default=1e-5, metavar="DELTA",
                        help="δ of (ε, δ)-DP, in (0, 1); keep it below 1/N (default: %(default)g)")
    parser.add_argument("--backend", choices=[*BACKENDS, "all"], default="all",
                        help="accountant: prv (prv-accountant, Opacus's PRV as fallback), rdp (Opacus RDP), "
                             "pld (dp_accounting, optional extra) or all of them side by side (default: %(default)s; "
                             "'all' skips pld if dp_accounting is not installed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _sample_rate(args: argparse.Namespace) -> float:
    if args.sample_rate is not None:
        if args.dataset_size is not None:
            raise ValueError("--dataset-size goes with --batch-size, not with --sample-rate")
        return check_sample_rate(args.sample_rate, "--sample-rate")
    if args.dataset_size is None:
        raise ValueError("--batch-size needs --dataset-size (the number of records N)")
    batch_size = check_steps(args.batch_size, "--batch-size", minimum=1)
    dataset_size = check_steps(args.dataset_size, "--dataset-size", minimum=1)
    if batch_size > dataset_size:
        raise ValueError(f"--batch-size must be <= --dataset-size ({dataset_size}), got {batch_size}")
    return batch_size / dataset_size


def _backends(choice: str) -> tuple[list[str], dict[str, str]]:
    """Backends to run, and the skipped ones with the reason."""
    if choice != "all":
        return [choice], {}
    names = available_backends()
    return names, {name: f"not installed: {INSTALL_HINT}" for name in BACKENDS if name not in names}


def _compute(args: argparse.Namespace) -> dict:
    sample_rate = _sample_rate(args)
    steps = (check_steps(args.steps, "--steps", minimum=1) if args.steps is not None
             else steps_for_epochs(args.epochs, sample_rate))
    delta = check_delta(args.delta, "--delta")
    names, skipped = _backends(args.backend)
    out: dict = {"sample_rate": sample_rate, "steps": steps, "delta": delta}
    if args.epochs is not None:
        out["epochs"] = args.epochs
    if args.dataset_size is not None and delta >= 1 / args.dataset_size:
        out["warning"] = f"delta={delta:g} is not below 1/N = {1 / args.dataset_size:g}: a weak guarantee"
    if args.target_epsilon is not None:
        target = check_positive(args.target_epsilon, "--target-epsilon")
        out.update(target_epsilon=target, sigma_relative_tolerance=SIGMA_RTOL, noise_multiplier={})
    else:
        out["noise_multiplier"] = check_noise_multiplier(args.noise_multiplier, "--noise-multiplier")
    out.update(epsilon={}, details={})
    for name in names:
        sigma = (calibrate_noise(args.target_epsilon, delta, sample_rate, steps=steps, backend=name)
                 if args.target_epsilon is not None else args.noise_multiplier)
        accountant = PrivacyAccountant(name)
        accountant.step(sigma, sample_rate, steps)
        result = accountant.epsilon_result(delta)
        if args.target_epsilon is not None:
            out["noise_multiplier"][name] = sigma
        out["epsilon"][name] = result.upper
        out["details"][name] = result.to_dict()
    if skipped:
        out["skipped"] = skipped
    return out


def _table(out: dict) -> str:
    calibrating = "target_epsilon" in out
    head = (f"Poisson-subsampled Gaussian: q = {out['sample_rate']:.6g}, T = {out['steps']} steps"
            + (f" ({out['epochs']:g} epochs)" if "epochs" in out else "") + f", δ = {out['delta']:g}")
    if calibrating:
        head += (f"\nsmallest σ with ε <= {out['target_epsilon']:g} "
                 f"(σ to a relative {out['sigma_relative_tolerance']:g})")
    else:
        head += f", σ = {out['noise_multiplier']:g}"
    columns = ["backend"] + (["sigma"] if calibrating else []) + ["epsilon", "estimate", "lower", "method"]
    rows = []
    for name, details in out["details"].items():
        lower = "-" if details["lower"] is None else f"{details['lower']:.4f}"
        row = [name] + ([f"{out['noise_multiplier'][name]:.4f}"] if calibrating else [])
        rows.append(row + [f"{details['upper']:.4f}", f"{details['estimate']:.4f}", lower, details["method"]])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = [head, "", "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines += [f"note ({name}): {d['note']}" for name, d in out["details"].items() if d["note"]]
    lines += [f"skipped {name}: {why}" for name, why in out.get("skipped", {}).items()]
    if "warning" in out:
        lines.append(f"warning: {out['warning']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``lipdp budget``: print the result for parsed ``args``; a bad value raises (one error line, exit 2)."""
    out = _compute(args)
    print(json.dumps(out, indent=2) if args.json else _table(out))
    return 0
