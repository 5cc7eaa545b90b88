"""``lipdp audit``: an empirical lower bound on epsilon from one run with gradient canaries (``lipdp.audit``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lipdp.cli.output import write_json
from lipdp.cli.train import NOISE_STRATEGIES

HELP = "empirical lower bound on epsilon (one-run gradient-canary audit)"
DESCRIPTION = ("Audits the engine with gradient canaries (Steinke, Nasr & Jagielski 2023); exit status 1 if the lower "
               "bound exceeds the claimed epsilon.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``audit`` flags."""
    parser.add_argument("--canaries", type=int, default=1000, help="number of gradient canaries (half included)")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="expected Poisson batch size over the canaries (sample rate = batch / canaries)")
    parser.add_argument("--steps", type=int, default=50, help="noisy steps of the audited run")
    parser.add_argument("--noise-multiplier", type=float, default=1.5, help="sigma of the audited engine")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of the claim being audited")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound")
    parser.add_argument("--noise-strategy", choices=NOISE_STRATEGIES, default="global", help="engine noise strategy")
    parser.add_argument("--accountant", choices=("prv", "rdp", "pld"), default="prv", help="accountant of the claim")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine and of the canaries")
    parser.add_argument("--noise-scale", type=float, default=1.0,
                        help="multiply the engine's noise by this, breaking its privacy on purpose (0.1), to see the "
                             "audit detect it")
    parser.add_argument("--json", type=Path, default=None, help="write the audit result here")


def run(args: argparse.Namespace) -> int:
    """Print the audit; exit status 1 if it refutes the claimed epsilon."""
    from lipdp.audit import gradient_canary_audit

    result = gradient_canary_audit(
        canaries=args.canaries, batch_size=args.batch_size, steps=args.steps, noise_multiplier=args.noise_multiplier,
        delta=args.delta, confidence=args.confidence, noise_strategy=args.noise_strategy, accountant=args.accountant,
        seed=args.seed, noise_scale=args.noise_scale)
    print(result.to_text())
    if args.json:
        print(f"wrote {write_json(args.json, result.to_dict())}")
    return 1 if result.violation else 0
