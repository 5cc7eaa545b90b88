"""``lipdp`` command line: private training, budget calculations, bound tables and the demo.

    lipdp train --dataset digits --epsilon 3 --epochs 20
    lipdp budget --noise-multiplier 1.1 --sample-rate 0.0042667 --steps 3516 --delta 1e-5
    lipdp bounds --dataset fashion-mnist
    lipdp demo
    lipdp audit --canaries 1000 --steps 50
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from accounting.cli import add_budget_arguments, run_budget
from lipdp.training import OPTIMIZERS

DEMO_SETTINGS = {
    # Settings chosen on a validation split of the training data (never on the test split). On digits (1,437
    # training images) the orthogonal CNN stays near chance at epsilon = 3 (15% on a 20% validation split), an
    # orthogonal MLP on the pixels reaches 71%: digits trains the MLP.
    "fashion-mnist": dict(model="cnn", epochs=6, batch_size=2048, learning_rate=1e-2, widths=(16, 32, 64),
                          temperature=8.0),
    "digits": dict(model="mlp", epochs=30, batch_size=256, learning_rate=5e-2, widths=(64,), temperature=8.0),
    # Any other data set: the CNN for images, the MLP otherwise.
    "default": dict(model=None, epochs=30, batch_size=256, learning_rate=2e-2, widths=(32, 64), temperature=8.0),
}


def settings_for(dataset: str) -> dict:
    """``lipdp train``'s defaults for a data set (``DEMO_SETTINGS``)."""
    return DEMO_SETTINGS.get(dataset, DEMO_SETTINGS["default"])


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--model", choices=("cnn", "mlp"), default=None,
                        help="orthogonal CNN (images only) or orthogonal MLP on the flattened input; default: the "
                             "data set's (digits: mlp, other images: cnn, tabular: mlp)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="channels of each orthogonal conv stage (cnn) or hidden widths (mlp)")
    parser.add_argument("--noise-strategy", choices=("global", "per_layer", "min_energy"), default="global",
                        help="how noise is spread over parameter groups (all are accounted as sigma)")
    parser.add_argument("--loss-grad-clip", type=float, default=None,
                        help="clip each sample's logit gradient to this norm (<= sqrt(2) lowers the noise)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                        help="the optimizer the engine wraps: adam, or sgd with momentum 0.9")
    parser.add_argument("--accountant", choices=("prv", "rdp", "pld"), default="prv", help="privacy accountant")
    parser.add_argument("--physical-batch-size", type=int, default=None,
                        help="split each logical batch into micro-batches of this size (memory), one noise draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, model init, sampling and noise")
    parser.add_argument("--json", type=Path, default=None, help="write the results and budget report here")
    parser.add_argument("--plot", type=Path, default=None, help="write the budget plot (PNG) here")
    parser.add_argument("--no-progress", action="store_true", help="hide the per-epoch progress bars")


def run_train(args: argparse.Namespace) -> int:
    from lipdp import distributed
    from lipdp.datasets import load_dataset
    from lipdp.models import orthogonal_cnn, orthogonal_mlp
    from lipdp.training import TrainConfig, train_private

    splits = load_dataset(args.dataset, root=args.data_root, seed=args.seed)
    defaults = settings_for(splits.name)
    image = len(splits.input_shape) == 3
    kind = args.model or defaults["model"] or ("cnn" if image else "mlp")
    if kind == "cnn" and not image:
        raise SystemExit(f"lipdp train: error: --model cnn needs image data; {splits.name} has samples of shape "
                         f"{tuple(splits.input_shape)}. Use --model mlp.")
    widths = tuple(args.widths or (defaults["widths"] if defaults["model"] in (None, kind)
                                   else DEMO_SETTINGS["default"]["widths"]))
    config = TrainConfig(
        epsilon=args.epsilon, delta=args.delta, epochs=args.epochs or defaults["epochs"],
        batch_size=min(args.batch_size or defaults["batch_size"], len(splits.train)),
        learning_rate=args.lr or defaults["learning_rate"], temperature=args.temperature or defaults["temperature"],
        noise_strategy=args.noise_strategy, loss_grad_clip=args.loss_grad_clip, accountant=args.accountant,
        seed=args.seed, max_physical_batch_size=args.physical_batch_size, optimizer=args.optimizer,
    )
    if kind == "cnn":
        model = orthogonal_cnn(splits.input_shape, splits.num_classes, widths=widths)
    else:
        features = math.prod(splits.input_shape)
        model = orthogonal_mlp(features, splits.num_classes, hidden=widths)
    if not distributed.init_from_env() or distributed.is_main_process():  # under torchrun, rank 0 reports
        print(f"data: {splits.description}")
        parameters = sum(p.numel() for p in model.parameters())
        print(f"model: orthogonal {kind.upper()} {widths} with {parameters} parameters; "
              f"target ({config.epsilon}, {config.delta})-DP, {config.epochs} epochs, expected batch {config.batch_size}")
    result, engine = train_private(model, splits.train, splits.test, config, progress=not args.no_progress)
    if not distributed.is_main_process():
        return 0
    report = engine.report(delta=config.delta, target_epsilon=config.epsilon)
    print(report.to_text())
    print(f"\ntest accuracy {result.test_accuracy:.4f} on {len(splits.test)} held-out samples at "
          f"(epsilon = {result.epsilon:.3f}, delta = {config.delta:g}); noise multiplier {result.noise_multiplier:.4f}, "
          f"{result.steps} steps, {result.seconds:.1f} s of training")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"dataset": splits.name, "model": {"kind": kind, "widths": widths},
                                         "config": vars(config), **result.to_dict(),
                                         "budget": report.to_dict()}, indent=2, default=str))
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {report.plot(args.plot)}")
    return 0


def run_bounds(args: argparse.Namespace) -> int:
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


def run_demo(args: argparse.Namespace) -> int:
    """The main job in under 5 minutes: Fashion-MNIST (digits if absent) at (3, 1e-5)-DP with the classify recipe's
    fast variant (pixels centred on their private mean -> InputNormClip -> Lipschitz linear head, min-energy noise;
    the mean's release is part of the budget). The most accurate variant,
    a scattering front end, is ``python -m recipes.classify`` (its features take minutes to compute once)."""
    from lipdp.datasets import DatasetNotFoundError, load_dataset
    from recipes.classify import markdown_table, run

    try:
        load_dataset("fashion-mnist")
        dataset = "fashion-mnist"
    except DatasetNotFoundError as missing:
        print(f"Fashion-MNIST not found ({missing}); the demo uses scikit-learn's digits instead.")
        dataset = "digits"
    epochs = 10 if dataset == "fashion-mnist" else 30
    batch_size = 4096 if dataset == "fashion-mnist" else 512
    print(f"lipdp demo: private training on {dataset} at (epsilon=3, delta=1e-5), linear Lipschitz head on pixels "
          f"centred on their private mean, {epochs} epochs, expected batch {batch_size}")
    result = run(dataset, epsilon=3.0, delta=1e-5, front_end="pixels", head="linear", epochs=epochs,
                 batch_size=batch_size, progress=not args.no_progress)
    print(result["description"])
    print(markdown_table([result]))
    print(f"\ntest accuracy {result['accuracy']:.4f} at (epsilon = {result['epsilon']:.3f}, delta = 1e-5), "
          f"noise multiplier {result['noise_multiplier']:.3f}, {result['steps']} steps, "
          f"{result['train_seconds']:.0f} s of training. Certified accuracy: correct with a certified L2 radius.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lipdp", description="Differentially private training of Lipschitz networks, without "
        "per-sample gradient clipping: noise calibrated to certified per-sample gradient bounds.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train an orthogonal network privately and report accuracy and (eps, delta)",
                           description="Train privately on an offline data set; prints test accuracy and the budget report.")
    _add_train_arguments(train)
    train.set_defaults(func=run_train)
    budget = sub.add_parser("budget", help="epsilon for a noise multiplier, or the noise for a target epsilon",
                            description="Privacy budget calculator over the PRV, RDP and PLD accountants.")
    add_budget_arguments(budget)
    budget.set_defaults(func=run_budget)
    bounds = sub.add_parser("bounds", help="print the per-parameter sensitivity table of the default model",
                            description="Certified per-sample gradient bounds of the default model for a data set.")
    bounds.add_argument("--dataset", default="digits", help="data set whose shapes size the model")
    bounds.add_argument("--data-root", default=None, help="folder holding the data files")
    bounds.add_argument("--input-norm-bound", type=float, default=1.0, help="bound X0 on each input's L2 norm")
    bounds.set_defaults(func=run_bounds)
    demo = sub.add_parser("demo", help="the main job: private training on Fashion-MNIST (or digits) at eps=3",
                          description="Private training at (3, 1e-5)-DP on Fashion-MNIST if installed, else digits; "
                                      "prints test accuracy, certified accuracy and the privacy spent.")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=run_demo)
    from recipes.compare import add_compare_arguments, run_compare

    compare = sub.add_parser("compare", help="lipdp vs Opacus DP-SGD at the same (eps, delta) and epochs",
                             description="Each side in its own process: accuracy, step time, peak memory, wall time "
                                         "and epsilon spent (recipes.compare).")
    add_compare_arguments(compare)
    compare.set_defaults(func=run_compare)
    from lipdp.audit import add_audit_arguments, run_audit

    audit = sub.add_parser("audit", help="empirical lower bound on epsilon (one-run gradient-canary audit)",
                           description="Audits the engine with gradient canaries (Steinke, Nasr & Jagielski 2023); "
                                       "exit status 1 if the lower bound exceeds the claimed epsilon.")
    add_audit_arguments(audit)
    audit.set_defaults(func=run_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"lipdp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
