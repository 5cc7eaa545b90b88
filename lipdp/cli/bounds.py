"""``lipdp bounds``: the certified per-parameter sensitivity table of ``lipdp train``'s model for a data set."""

from __future__ import annotations

import argparse

HELP = "print the per-parameter sensitivity table of lipdp train's model"
DESCRIPTION = "Certified per-sample gradient bounds of lipdp train's model (its preset's network) for a data set."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bounds`` flags."""
    parser.add_argument("--dataset", default="digits", help="data set whose shapes size the model")
    parser.add_argument("--data-root", default=None, help="folder holding the data files")
    parser.add_argument("--input-norm-bound", type=float, default=None,
                        help="bound X0 on each input's L2 norm (default: the data set's preset, else 1)")


def run(args: argparse.Namespace) -> int:
    """Print the model and its bound table (CE's Lipschitz constant sqrt(2))."""
    from lipdp.bounds import analyze
    from lipdp.datasets import load_dataset
    from lipdp.models import orthogonal_network
    from lipdp.presets import choose_model, input_norm_bound

    splits = load_dataset(args.dataset, root=args.data_root)
    kind, preset = choose_model(splits.name, splits.input_shape)
    bound = input_norm_bound(preset) if args.input_norm_bound is None else args.input_norm_bound
    model = orthogonal_network(kind, splits.input_shape, splits.num_classes, preset["widths"], input_norm_bound=bound)
    print(model)
    print(analyze(model, bound, 2**0.5, splits.input_shape).to_text())
    return 0
