"""``lipdp train``: private training of an orthogonal network on an offline data set (``lipdp.training``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lipdp.cli.output import write_json
from lipdp.presets import TRAIN_PRESETS

HELP = "train an orthogonal network privately and report accuracy and (eps, delta)"
DESCRIPTION = "Train privately on an offline data set; prints test accuracy and the budget report."
OPTIMIZERS = ("adam", "sgd")  # lipdp.training.OPTIMIZERS, repeated here so that --help needs no torch
NOISE_STRATEGIES = ("global", "per_layer", "min_energy")  # lipdp.noise.NOISE_STRATEGIES, same reason
MECHANISMS = ("bounds", "clipping")  # lipdp.clipping.MECHANISMS, same reason
MODELS = ("cnn", "patch", "mlp")  # lipdp.models.NETWORK_KINDS, same reason


def _preset_default(name: str, fallback: str) -> str:
    """Where a preset sets ``name``, as the help says it: 'fashion-mnist: 1.0, else none'."""
    named = [f"{dataset}: {preset[name]}" for dataset, preset in TRAIN_PRESETS.items() if name in preset]
    return f"default: per data set ({', '.join(named)}, else {fallback})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` flags; per-data-set defaults come from ``lipdp.presets``."""
    parser.add_argument("--dataset", default="digits",
                        help="data set name from lipdp.datasets (digits, fashion-mnist, breast_cancer, adult, ...)")
    parser.add_argument("--data-root", default=None, help="folder holding the data files (else standard places)")
    parser.add_argument("--epsilon", type=float, default=3.0, help="target epsilon of the whole training run")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta (keep it below 1/N)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the data (default: per data set)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="expected Poisson batch size; large batches cost nothing extra in lipdp")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of the wrapped optimizer (cosine-annealed)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="cross-entropy temperature tau in CE(tau z)/tau (Lipschitz constant sqrt(2) for any tau)")
    parser.add_argument("--input-norm-bound", type=float, default=None, metavar="X0",
                        help="each input is projected onto the L2 ball of this radius by the model's first layer "
                             "(the gradient bounds scale with it); " + _preset_default("input_norm_bound", "1"))
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="orthogonal CNN (images), patch CNN (images; kernel = stride convolutions, no overlap "
                             "factor in the bounds) or orthogonal MLP on the flattened input; default: the data set's "
                             "(fashion-mnist: patch, digits: mlp, other images: cnn, tabular: mlp)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="channels of each orthogonal conv stage (cnn, patch) or hidden widths (mlp)")
    parser.add_argument("--noise-strategy", choices=NOISE_STRATEGIES, default="global",
                        help="how noise is spread over parameter groups (all are accounted as sigma)")
    parser.add_argument("--loss-grad-clip", type=float, default=None,
                        help="clip each sample's logit gradient to this norm (<= sqrt(2) lowers the noise; 0: no "
                             "clip); " + _preset_default("loss_grad_clip", "none"))
    parser.add_argument("--mechanism", choices=MECHANISMS, default="bounds",
                        help="bounds: noise from the certified per-sample bounds (no per-sample work); clipping: "
                             "DP-SGD's per-sample clipping on the same model, to compare (needs --max-grad-norm)")
    parser.add_argument("--max-grad-norm", type=float, default=None, metavar="C",
                        help="with --mechanism clipping: the norm each record's gradient is clipped to")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                        help="the optimizer the engine wraps: adam, or sgd with momentum 0.9")
    parser.add_argument("--accountant", choices=("prv", "rdp", "pld"), default="prv", help="privacy accountant")
    parser.add_argument("--views", type=int, default=1,
                        help="random views per record and step (augmentation multiplicity): no privacy cost")
    parser.add_argument("--shift", type=int, default=0, metavar="PIXELS",
                        help="views shifted by up to this many pixels, zero-filled (images)")
    parser.add_argument("--flip", action="store_true", help="views flipped left-right at random (images)")
    parser.add_argument("--physical-batch-size", type=int, default=None,
                        help="split each logical batch into micro-batches of this size (memory), one noise draw")
    parser.add_argument("--validation", type=float, default=None, metavar="FRACTION",
                        help="hold out this fraction of the training split and report accuracy on it instead of the "
                             "test split (for choosing settings without reading the test split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, model init, sampling and noise")
    parser.add_argument("--json", type=Path, default=None, help="write the results and budget report here")
    parser.add_argument("--plot", type=Path, default=None, help="write the budget plot (PNG) here")
    parser.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bars")


def run(args: argparse.Namespace) -> int:
    """Train with the data set's preset overridden by the flags; print the budget report and the accuracy."""

    import torch

    from lipdp import distributed
    from lipdp.datasets import load_dataset, train_validation_split
    from lipdp.models import orthogonal_network
    from lipdp.presets import choose_model, training_settings
    from lipdp.training import TrainConfig, train_private

    splits = load_dataset(args.dataset, root=args.data_root, seed=args.seed)
    train_set, held_out, held_out_name = splits.train, splits.test, "test"
    if args.validation is not None:
        train_set, held_out = train_validation_split(splits.train, args.validation, seed=args.seed)
        held_out_name = "validation"
    kind, preset = choose_model(splits.name, splits.input_shape, args.model)
    widths = tuple(args.widths or preset["widths"])
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
             "temperature": args.temperature, "input_norm_bound": args.input_norm_bound}
    settings = {**training_settings(preset), **{name: value for name, value in given.items() if value is not None}}
    if args.loss_grad_clip is not None:
        settings["loss_grad_clip"] = args.loss_grad_clip or None  # 0: no clip
    settings["batch_size"] = min(settings["batch_size"], len(train_set))
    config = TrainConfig(
        epsilon=args.epsilon, delta=args.delta, **settings, noise_strategy=args.noise_strategy,
        accountant=args.accountant, seed=args.seed,
        max_physical_batch_size=args.physical_batch_size, optimizer=args.optimizer, views=args.views,
        max_shift=args.shift, flip=args.flip, mechanism=args.mechanism, max_grad_norm=args.max_grad_norm,
    )
    torch.manual_seed(args.seed)  # the model's initial weights: --seed fixes them too
    model = orthogonal_network(kind, splits.input_shape, splits.num_classes, widths,
                               input_norm_bound=config.input_norm_bound)
    if not distributed.init_from_env() or distributed.is_main_process():  # under torchrun, rank 0 reports
        print(f"data: {splits.description}")
        parameters = sum(p.numel() for p in model.parameters())
        print(f"model: orthogonal {kind.upper()} {widths} with {parameters} parameters; "
              f"target ({config.epsilon}, {config.delta})-DP, {config.epochs} epochs, expected batch {config.batch_size}")
    result, engine = train_private(model, train_set, held_out, config, progress=not args.no_progress)
    if not distributed.is_main_process():
        return 0
    report = engine.report(delta=config.delta, target_epsilon=config.epsilon)
    print(report.to_text())
    print(f"\n{held_out_name} accuracy {result.test_accuracy:.4f} on {len(held_out)} held-out samples at "
          f"(epsilon = {result.epsilon:.3f}, delta = {config.delta:g}); noise multiplier {result.noise_multiplier:.4f}, "
          f"{result.steps} steps, {result.seconds:.1f} s of training")
    if args.json:
        record = {"dataset": splits.name, "evaluated_on": held_out_name, "model": {"kind": kind, "widths": widths},
                  "config": vars(config),
                  **result.to_dict(), "budget": report.to_dict()}
        print(f"wrote {write_json(args.json, record)}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    return 0
