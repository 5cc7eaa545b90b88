"""``lipdp bounds``: the certified per-parameter sensitivity table of the default model for a data set."""

from __future__ import annotations

import argparse

HELP = "print the per-parameter sensitivity table of the default model"
DESCRIPTION = "Certified per-sample gradient bounds of the default model for a data set."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bounds`` flags."""
    parser.add_argument("--dataset", default="digits", help="data set whose shapes size the model")
    parser.add_argument("--data-root", default=None, help="folder holding the data files")
    parser.add_argument("--input-norm-bound", type=float, default=1.0, help="bound X0 on each input's L2 norm")


def run(args: argparse.Namespace) -> int:
    """Print the model and its bound table (CE's Lipschitz constant sqrt(2))."""
    from lipdp.bounds import analyze
    from lipdp.datasets import load_dataset
    from lipdp.models import orthogonal_cnn, orthogonal_mlp

    splits = load_dataset(args.dataset, root=args.data_root)
    if len(splits.input_shape) == 3:
        model = orthogonal_cnn(splits.input_shape, splits.num_classes)
    else:
        model = orthogonal_mlp(splits.input_shape[0], splits.num_classes)
    print(model)
    print(analyze(model, args.input_norm_bound, 2**0.5, splits.input_shape).to_text())
    return 0
