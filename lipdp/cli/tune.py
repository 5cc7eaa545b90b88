"""``lipdp tune``: private hyper-parameter search whose reported ε covers the search (``lipdp.tuning``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lipdp.cli.output import write_json
from lipdp.cli.train import MODELS, NOISE_STRATEGIES, OPTIMIZERS

HELP = "tune hyper-parameters privately: a random number of trials, the best released, one epsilon for all"
DESCRIPTION = ("Private selection (Papernot & Steinke 2022): K ~ a truncated negative binomial or Poisson distribution, "
               "K private training runs with settings drawn from a search space centred on the data set's preset, "
               "each scored on a validation split of the training data; the best one is released. --epsilon is the "
               "total, search included. Lists of choices replace the default ones.")
COVERAGE = ("'epsilon' covers the released trial (model, settings, noisy validation score); the trial count and "
            "the other trials' scores in 'trial_log' are covered only by 'naive_epsilon'")


def _clip(text: str) -> float | None:
    """A loss-gradient clip choice: a number, or 'none' for no clipping."""
    return None if text.lower() == "none" else float(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``tune`` flags; the default search space is centred on ``lipdp.presets``."""
    parser.add_argument("--dataset", default="digits", help="data set name from lipdp.datasets")
    parser.add_argument("--data-root", default=None, help="folder holding the data files (else standard places)")
    parser.add_argument("--epsilon", type=float, default=3.0, help="target epsilon of the whole search")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (keep it below 1/N)")
    parser.add_argument("--mean-trials", type=float, default=4.0, help="expected number of trials E[K]")
    parser.add_argument("--distribution", choices=("negative_binomial", "poisson"), default="negative_binomial",
                        help="law of the number of trials K (Poisson may draw K = 0: nothing is released)")
    parser.add_argument("--shape", type=float, default=0.0, metavar="ETA",
                        help="truncated negative binomial shape eta > -1 (0: logarithmic, 1: geometric); smaller "
                             "costs less privacy at the same mean, with a heavier tail of K")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="part of the training split that scores the trials")
    parser.add_argument("--lr", type=float, nargs="+", default=None, help="learning-rate choices")
    parser.add_argument("--temperature", type=float, nargs="+", default=None, help="cross-entropy temperature choices")
    parser.add_argument("--loss-grad-clip", type=_clip, nargs="+", default=None, metavar="C",
                        help="logit-gradient clip choices ('none': no clip)")
    parser.add_argument("--epochs", type=int, nargs="+", default=None, help="epoch choices")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None, help="expected Poisson batch-size choices")
    parser.add_argument("--model", choices=MODELS, default=None, help="as lipdp train (default per data set)")
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="as lipdp train")
    parser.add_argument("--noise-strategy", choices=NOISE_STRATEGIES, default="global", help="as lipdp train")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="as lipdp train")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split, the trial count, the settings drawn and the trials' seeds")
    parser.add_argument("--json", type=Path, default=None, help="write the search's report here")
    parser.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the search, print one line per trial, the selection and the budget; write ``--json``."""
    from dataclasses import replace

    from accounting.tuning import trial_count
    from lipdp.datasets import load_dataset
    from lipdp.evaluation import accuracy
    from lipdp.models import orthogonal_network
    from lipdp.presets import choose_model, input_norm_bound
    from lipdp.training import TrainConfig
    from lipdp.tuning import SearchSpace, tune

    splits = load_dataset(args.dataset, root=args.data_root, seed=args.seed)
    kind, preset = choose_model(splits.name, splits.input_shape, args.model)
    widths = tuple(args.widths or preset["widths"])
    space = SearchSpace.around(preset)
    chosen = {"learning_rate": args.lr, "temperature": args.temperature, "loss_grad_clip": args.loss_grad_clip,
              "epochs": args.epochs, "batch_size": args.batch_size}
    space = replace(space, **{name: tuple(values) for name, values in chosen.items() if values is not None})
    count = trial_count(args.distribution, args.mean_trials, args.shape)

    base = TrainConfig(noise_strategy=args.noise_strategy, optimizer=args.optimizer,
                       input_norm_bound=input_norm_bound(preset))

    def build_model():
        return orthogonal_network(kind, splits.input_shape, splits.num_classes, widths,
                                  input_norm_bound=base.input_norm_bound)

    def report(trial, total: int) -> None:
        settings = ", ".join(f"{name}={value}" for name, value in trial.settings.items())
        print(f"trial {trial.index + 1}/{total}: {settings}: private validation accuracy "
              f"{trial.validation_accuracy:.4f} (sigma {trial.noise_multiplier:.3f}, {trial.steps} steps, "
              f"{trial.seconds:.1f} s)", flush=True)

    print(f"data: {splits.description}")
    print(f"model: orthogonal {kind.upper()} {widths}; search at total ({args.epsilon}, {args.delta})-DP, "
          f"{count.name} trial count with mean {count.mean:g}; {args.validation_fraction:g} of the training split "
          "scores the trials", flush=True)
    result = tune(build_model, splits.train, space, args.epsilon, args.delta, count, base=base,
                  validation_fraction=args.validation_fraction, seed=args.seed, progress=not args.no_progress,
                  on_trial=report)
    test_accuracy = None if result.model is None else accuracy(result.model, splits.test)
    if result.best is None:
        print("no trial ran (K = 0): nothing is released")
    else:
        print(f"selected trial {result.best.index + 1}: {result.best.settings}, private validation accuracy "
              f"{result.best.validation_accuracy:.4f}, test accuracy {test_accuracy:.4f} on {len(splits.test)} "
              "held-out samples")
    print(f"epsilon = {result.epsilon:.3f} at delta = {args.delta:g} for the search and its released model "
          f"({len(result.trials)} trials, {result.seconds:.0f} s); one trial alone (costliest schedule) "
          f"{result.trial_epsilon:.3f}; "
          f"naive composition of the {len(result.trials)} trials {result.naive_epsilon:.3f}")
    if args.json:
        record = {"dataset": splits.name, "model": {"kind": kind, "widths": widths}, **result.to_dict(),
                  "test_accuracy": test_accuracy, "coverage": COVERAGE}
        print(f"wrote {write_json(args.json, record)}")
    return 0
