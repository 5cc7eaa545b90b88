"""lipdp side by side with Opacus DP-SGD: the same data, the same (epsilon, delta), the same epochs.

    python -m recipes.compare                                   # Fashion-MNIST, eps=3, delta=1e-5
    python -m recipes.compare --opacus-model cnn classify-linear    # two Opacus columns next to lipdp's
    python -m recipes.compare --dataset digits --epochs 5 --opacus-batch-size 128 --lipdp-batch-size 128

Each side runs in its own interpreter (``benchmarks.harness.run_child``), so that its peak memory (the child's peak
RSS) is its own. Every side's noise is calibrated with lipdp's accountant (PRV by default) and every side reports the
epsilon it gives for the mechanisms it ran. The median step time is measured the same way on every side by
:class:`StepTimer`: from the first forward call with gradients enabled to the end of the following optimizer step
(data loading and evaluation excluded; ``benchmarks.harness``). Outputs: a markdown table (printed and written), the
JSON of every run and a PNG plot. ``--validation`` reports every side on the held-out 10% of the training split
(for tuning) instead of the test split.

The lipdp side is pluggable (``LIPDP_RECIPES``): ``classify`` runs ``recipes.classify.run`` (scattering front end
and Lipschitz head), ``cnn`` runs ``lipdp.training.train_private`` on the default orthogonal CNN. So is the Opacus
side (``OPACUS_MODELS``, ``--opacus-model``, one column per model; ghost clipping by default): ``cnn`` is
``recipes.opacus_baseline``'s Tramèr-Boneh CNN with GroupNorm on the pixels; ``classify-linear`` trains the classify
recipe's linear head (InputNormClip, then one dense layer) with ``nn.CrossEntropyLoss`` on the recipe's inputs
(``recipes.classify.private_features``: the same fixed features, centred and whitened with the same private mean
and channel moments), the releases paid from the same (epsilon, delta): Opacus's noise is calibrated for what they
leave and its epsilon includes them. Each Opacus model has its own batch, learning rate and C (``OPACUS_MODELS``),
which the flags override for every Opacus column.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from benchmarks.harness import ChildFailed, StepTimer, machine_description, peak_rss_bytes, run_child
from lipdp.cli.errors import ArgumentParser, run_main
from lipdp.cli.output import write_json

if TYPE_CHECKING:  # torch is imported by the sides themselves, in their own process
    from torch import nn
    from torch.utils.data import TensorDataset

    from accounting import HistoryEntry
    from lipdp.datasets import DatasetSplits
    from recipes.opacus_baseline import OpacusConfig, OpacusResult

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- the sides


@dataclass
class CompareSettings:
    """Everything both sides need; the lipdp and Opacus hyper-parameters default to each side's own tuning (the
    Opacus ones, left None, are filled in from ``OPACUS_MODELS[opacus_model]``)."""

    dataset: str = "fashion-mnist"
    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 40
    seed: int = 0
    validation: bool = False  # evaluate on the validation split (for tuning), not the test split
    lipdp_recipe: str = "classify"
    lipdp_batch_size: int | None = None
    lipdp_learning_rate: float | None = None
    opacus_model: str = "cnn"
    opacus_mode: str = "ghost"
    opacus_batch_size: int | None = None
    opacus_learning_rate: float | None = None
    opacus_max_grad_norm: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.opacus_model not in OPACUS_MODELS:
            raise ValueError(f"unknown Opacus model {self.opacus_model!r} (fix: use one of {', '.join(OPACUS_MODELS)})")
        model = OPACUS_MODELS[self.opacus_model]
        for name, default in (("opacus_batch_size", model.batch_size), ("opacus_learning_rate", model.learning_rate),
                              ("opacus_max_grad_norm", model.max_grad_norm)):
            if getattr(self, name) is None:
                setattr(self, name, default)


def _summary(model: str, result, batch_size: int) -> dict:
    """A side's result from a ``TrainResult``/``OpacusResult``-like object (same field names)."""
    return {"model": model, "test_accuracy": result.test_accuracy, "epsilon": result.epsilon,
            "noise_multiplier": result.noise_multiplier, "steps": result.steps, "batch_size": batch_size,
            "train_seconds": result.seconds, "epoch_log": result.epoch_log}


def _releases(centring_noise: float | None, whitening_noise: float | None) -> str:
    """The classify recipe's private statistics, as the model column names them."""
    statistics = [f"{what} (noise multiplier {noise:g})" for what, noise in (
        ("centred on a private mean", centring_noise), ("whitened by private channel moments", whitening_noise))
        if noise]
    return "".join(f", {part}" for part in statistics)


def _splits(settings: CompareSettings) -> tuple[DatasetSplits, TensorDataset, TensorDataset]:
    """(the data set, its training images, the evaluation images): with ``validation``, the held-out 10% of the
    training split that ``recipes.classify --validation`` holds out (same fraction, same seed), else the test split."""
    from lipdp.datasets import load_dataset, train_validation_split

    splits = load_dataset(settings.dataset, seed=settings.seed)
    if settings.validation:
        return (splits, *train_validation_split(splits.train, 0.1, seed=settings.seed))
    return splits, splits.train, splits.test


def lipdp_classify(settings: CompareSettings) -> dict:
    """lipdp through ``recipes.classify.run`` (scattering front end, Lipschitz head; its own defaults)."""
    from recipes.classify import run

    result = run(settings.dataset, epsilon=settings.epsilon, delta=settings.delta, seed=settings.seed,
                 epochs=settings.epochs, batch_size=settings.lipdp_batch_size, validation=settings.validation,
                 learning_rate=settings.lipdp_learning_rate, progress=settings.progress)
    preprocessing = _releases(result["centring_noise"], result["whitening_noise"])
    return {"model": f"{result['front_end']} front end{preprocessing} + {result['head']} head (recipes.classify)",
            "test_accuracy": result["accuracy"], "epsilon": result["epsilon"],
            "noise_multiplier": result["noise_multiplier"], "steps": result["steps"],
            "batch_size": result["config"]["batch_size"], "train_seconds": result["train_seconds"],
            "epoch_log": result["epochs"]}


def lipdp_cnn(settings: CompareSettings) -> dict:
    """lipdp's end-to-end image network through ``lipdp.training.train_private``: ``lipdp train``'s network and
    settings where they are convolutional (the patch CNN on Fashion-MNIST), else the CNN's
    (``lipdp.presets.image_network_preset``; digits trains an MLP)."""
    import torch

    from lipdp.models import orthogonal_network
    from lipdp.presets import image_network_preset, training_settings
    from lipdp.training import TrainConfig, train_private

    splits, train, evaluation = _splits(settings)
    defaults = image_network_preset(splits.name)
    config = TrainConfig(**{
        **training_settings(defaults), "epsilon": settings.epsilon, "delta": settings.delta,
        "epochs": settings.epochs, "seed": settings.seed,
        "batch_size": min(settings.lipdp_batch_size or defaults["batch_size"], len(train)),
        "learning_rate": settings.lipdp_learning_rate or defaults["learning_rate"]})
    torch.manual_seed(settings.seed)  # the model's initial weights
    model = orthogonal_network(defaults["model"], splits.input_shape, splits.num_classes, defaults["widths"],
                               input_norm_bound=config.input_norm_bound)
    parameters = sum(p.numel() for p in model.parameters())
    result, _ = train_private(model, train, evaluation, config, progress=settings.progress)
    name = {"cnn": "orthogonal CNN", "patch": "orthogonal patch CNN"}[defaults["model"]]
    return _summary(f"{name} {tuple(defaults['widths'])}, {parameters} parameters (lipdp.models)", result,
                    config.batch_size)


def _train_opacus(settings: CompareSettings, model: nn.Module, train: TensorDataset, evaluation: TensorDataset,
                  spent: Sequence[HistoryEntry] = ()) -> tuple[OpacusResult, OpacusConfig]:
    """``recipes.opacus_baseline.train_opacus`` with the settings' Opacus hyper-parameters: (result, config)."""
    from recipes.opacus_baseline import OpacusConfig, train_opacus

    config = OpacusConfig(
        epsilon=settings.epsilon, delta=settings.delta, epochs=settings.epochs, seed=settings.seed,
        batch_size=min(settings.opacus_batch_size, len(train)), learning_rate=settings.opacus_learning_rate,
        max_grad_norm=settings.opacus_max_grad_norm, grad_sample_mode=settings.opacus_mode)
    return train_opacus(model, train, evaluation, config, progress=settings.progress, spent=spent), config


def opacus_cnn(settings: CompareSettings) -> dict:
    """Opacus DP-SGD on Tramèr-Boneh's CNN with GroupNorm, on the pixels (``recipes.opacus_baseline``)."""
    from recipes.opacus_baseline import groupnorm_cnn

    splits, train, evaluation = _splits(settings)
    model = groupnorm_cnn(splits.input_shape, splits.num_classes)
    parameters = sum(p.numel() for p in model.parameters())
    result, config = _train_opacus(settings, model, train, evaluation)
    return _summary(f"Tramèr-Boneh CNN + GroupNorm, {parameters} parameters, Opacus {settings.opacus_mode}, "
                    f"C={config.max_grad_norm}", result, config.batch_size)


def opacus_classify_linear(settings: CompareSettings) -> dict:
    """Opacus DP-SGD on the classify recipe's inputs and head: the same fixed features, the same private mean and
    channel moments (``recipes.classify.private_features``, paid from the same (epsilon, delta): the Opacus noise is
    calibrated for what they leave) and the same linear head, trained with ``nn.CrossEntropyLoss``."""
    from recipes.classify import DEFAULT_FRONT_END, DEFAULTS, build_model, private_features

    features = private_features(settings.dataset, validation=settings.validation, seed=settings.seed)
    model = build_model("linear", features.input_shape, features.num_classes)
    linear = model[-1]
    result, config = _train_opacus(settings, model, features.train, features.evaluation,
                                   spent=features.engine.accountant.history)
    releases = _releases(DEFAULTS["centring_noise"], DEFAULTS["whitening_noise"] if features.blocks else None)
    return _summary(f"{DEFAULT_FRONT_END} front end{releases} + linear head (InputNormClip(1), Linear "
                    f"{linear.in_features}→{linear.out_features}; recipes.classify), cross-entropy, Opacus "
                    f"{settings.opacus_mode}, C={config.max_grad_norm}", result, config.batch_size)


@dataclass(frozen=True)
class OpacusModel:
    """An Opacus side: the function that runs it, and its hyper-parameters where the settings leave them None."""

    run: Callable[[CompareSettings], dict]
    batch_size: int
    learning_rate: float
    max_grad_norm: float


LIPDP_RECIPES: dict[str, Callable[[CompareSettings], dict]] = {"classify": lipdp_classify, "cnn": lipdp_cnn}
OPACUS_MODELS: dict[str, OpacusModel] = {
    # Tramèr & Boneh's Fashion-MNIST settings for their CNN.
    "cnn": OpacusModel(opacus_cnn, batch_size=2048, learning_rate=4.0, max_grad_norm=0.1),
    # Chosen on the validation split (10% of Fashion-MNIST's training split held out, `--validation`), never on the
    # test split, at (3, 1e-5) and 40 epochs, seed 0: lr 4 / 16 / 64 / 128 at C = 0.1 and B = 4096, lr 4 / 16 at
    # C = 1, B = 2048 / 8192 at lr 64; the numbers are in the README ("Results and how the settings were chosen").
    "classify-linear": OpacusModel(opacus_classify_linear, batch_size=4096, learning_rate=64.0, max_grad_norm=0.1),
}
SIDES = ("lipdp", "opacus")


def run_side(side: str, settings: CompareSettings) -> dict:
    """Run one side in this process; adds its median step time, steps timed, peak RSS and threads."""
    import torch

    function = LIPDP_RECIPES[settings.lipdp_recipe] if side == "lipdp" else OPACUS_MODELS[settings.opacus_model].run
    with StepTimer() as timer:
        result = function(settings)
    return {**result, "median_step_seconds": timer.median(), "timed_steps": len(timer.seconds),
            "peak_rss_bytes": peak_rss_bytes(), "torch_threads": torch.get_num_threads()}


def run_isolated_side(side: str, settings: CompareSettings, fresh_cache: bool = True) -> dict:
    """Run one side in a fresh interpreter; adds its process wall time (start-up, data, calibration included).

    With ``fresh_cache`` the child gets an empty feature cache (``LIPDP_CACHE``), so that a fixed front end's
    features (scattering) are computed within its wall time, as on a clean setup.
    """
    with tempfile.TemporaryDirectory(prefix="lipdp-cache-") as cache:
        outcome = run_child("recipes.compare", ["--side", side, "--settings", json.dumps(asdict(settings))],
                            environment={"LIPDP_CACHE": cache} if fresh_cache else None)
    if outcome.result is None:
        raise ChildFailed(f"the {side} side failed (exit code {outcome.returncode}); see its messages above")
    return {**outcome.result, "process_seconds": outcome.seconds}


def column(side: str, settings: CompareSettings) -> str:
    """The key of a side's results in a comparison: ``lipdp``, or ``opacus-MODEL``."""
    return side if side == "lipdp" else f"opacus-{settings.opacus_model}"


# ---------------------------------------------------------------------------------------------------- report


def _row(label: str, values: list[str]) -> str:
    return f"| {label} | " + " | ".join(values) + " |"


def _label(key: str, settings: CompareSettings) -> str:
    """A column's heading: ``lipdp`` or ``Opacus MODEL (MODE)``."""
    return key if key == "lipdp" else f"Opacus {key.removeprefix('opacus-')} ({settings.opacus_mode})"


def markdown_report(settings: CompareSettings, results: dict[str, dict], machine: dict) -> str:
    """The comparison as a markdown table (a column per entry of ``results``, keyed as :func:`column` keys them),
    with the settings and the machine it ran on."""
    sides = list(results.values())
    split = "validation" if settings.validation else "test"

    def each(formatter: Callable[[dict], str]) -> list[str]:
        return [formatter(r) for r in sides]

    lines = [
        f"# lipdp vs Opacus DP-SGD: {settings.dataset}, (epsilon = {settings.epsilon:g}, delta = {settings.delta:g}),"
        f" {settings.epochs} epochs" + (" (validation split)" if settings.validation else ""),
        "",
        _row("", [_label(key, settings) for key in results]),
        _row("---", ["---"] * len(sides)),
        _row("model", each(lambda r: r["model"])),
        _row(f"{split} accuracy", each(lambda r: f"{100 * r['test_accuracy']:.2f}%")),
        _row("median step time", each(lambda r: "n/a" if r["median_step_seconds"] is None
                                      else f"{1000 * r['median_step_seconds']:.1f} ms")),
        _row("expected batch size", each(lambda r: str(r["batch_size"]))),
        _row("steps", each(lambda r: str(r["steps"]))),
        _row("peak memory (RSS)", each(lambda r: f"{r['peak_rss_bytes'] / 2**20:.0f} MiB")),
        _row("epochs", [str(settings.epochs)] * len(sides)),
        _row("training time", each(lambda r: f"{r['train_seconds']:.1f} s")),
        _row("process wall time", each(lambda r: f"{r['process_seconds']:.1f} s")),
        _row("noise multiplier", each(lambda r: f"{r['noise_multiplier']:.4f}")),
        _row(f"epsilon spent (lipdp's PRV accountant, delta = {settings.delta:g})",
             each(lambda r: f"{r['epsilon']:.3f}")),
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; torch "
        f"{machine['torch']} with {sides[0]['torch_threads']} threads on every side, opacus {machine['opacus']}; "
        f"load average at the start {machine['load_average']}.",
        "Step time: first forward (gradients on) to the end of the optimizer step, median over all steps; "
        "each side in its own process (peak RSS is that process's). Training time: the training loop with its "
        "per-epoch evaluation. Process wall time adds interpreter start-up, data loading, noise calibration and "
        "any fixed front end's features (computed afresh, with an empty cache). Steps and epsilon count every "
        "mechanism in the accountant: a side's private statistics released before training are included.",
    ]
    return "\n".join(lines) + "\n"


def plot(settings: CompareSettings, results: dict[str, dict], path: Path) -> Path:
    """Accuracy per epoch and bars of accuracy, step time, peak memory and training time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [_label(key, settings) for key in results]
    sides = list(results.values())
    split = "validation" if settings.validation else "test"
    figure, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for name, result in zip(names, sides):
        log = result["epoch_log"]
        axes[0].plot([e["epoch"] for e in log], [100 * e["test_accuracy"] for e in log], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel=f"{split} accuracy (%)", title="accuracy per epoch")
    axes[0].legend()
    bars = [(f"{split} accuracy (%)", lambda r: 100 * r["test_accuracy"]),
            ("median step time (ms)", lambda r: 1000 * (r["median_step_seconds"] or 0)),
            ("peak RSS (MiB)", lambda r: r["peak_rss_bytes"] / 2**20),
            ("training time (s)", lambda r: r["train_seconds"])]
    for axis, (title, value) in zip(axes[1:], bars):
        heights = [value(r) for r in sides]
        axis.bar(names, heights, color=[f"C{i}" for i in range(len(sides))])
        axis.bar_label(axis.containers[0], fmt="%.1f")
        axis.set_title(title)
        axis.tick_params(axis="x", labelsize=8)
    figure.suptitle(f"{settings.dataset}, (ε = {settings.epsilon:g}, δ = {settings.delta:g}), "
                    f"{settings.epochs} epochs")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def compare(opacus_sides: Sequence[CompareSettings], out_dir: Path) -> dict:
    """Run the lipdp side, then one Opacus side per entry of ``opacus_sides`` (settings that differ only in their
    Opacus model and its hyper-parameters; the lipdp side runs with the first), one process each, one after the
    other; write compare.{md,json,png} to ``out_dir``."""
    machine = machine_description()
    runs = [("lipdp", opacus_sides[0])] + [("opacus", settings) for settings in opacus_sides]
    results, used = {}, {}
    for side, settings in runs:
        key = column(side, settings)
        logger.info("running the %s side", key)
        results[key], used[key] = run_isolated_side(side, settings), asdict(settings)
    report = markdown_report(opacus_sides[0], results, machine)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(report)
    write_json(out_dir / "compare.json", {"settings": used, "machine": machine, "results": results})
    plot(opacus_sides[0], results, out_dir / "compare.png")
    return {"report": report, "results": results}


# ---------------------------------------------------------------------------------------------- command line


def _model_defaults(name: str) -> str:
    return "default: each model's own, " + ", ".join(f"{model} {getattr(side, name):g}"
                                                     for model, side in OPACUS_MODELS.items())


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``compare`` flags of ``python -m recipes.compare``."""
    defaults = CompareSettings()
    parser.add_argument("--dataset", default=defaults.dataset, help="data set (lipdp.datasets name) for both sides")
    parser.add_argument("--epsilon", type=float, default=defaults.epsilon, help="target epsilon of both runs")
    parser.add_argument("--delta", type=float, default=defaults.delta, help="target delta of both runs")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the data, both sides")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of both runs")
    parser.add_argument("--lipdp-recipe", choices=sorted(LIPDP_RECIPES), default=defaults.lipdp_recipe,
                        help="lipdp side: 'classify' = recipes.classify.run (scattering + Lipschitz head), "
                             "'cnn' = the orthogonal CNN of `lipdp train`")
    parser.add_argument("--lipdp-batch-size", type=int, default=None, metavar="B",
                        help="lipdp's expected batch size (default: the recipe's own)")
    parser.add_argument("--lipdp-lr", dest="lipdp_learning_rate", type=float, default=None, metavar="LR",
                        help="lipdp's learning rate (default: the recipe's own)")
    parser.add_argument("--validation", action="store_true",
                        help="train on 90%% of the training split and report the held-out 10%% (for tuning, as "
                             "recipes.classify --validation) instead of the test split")
    parser.add_argument("--opacus-model", nargs="+", choices=list(OPACUS_MODELS), default=[defaults.opacus_model],
                        metavar="MODEL",
                        help="Opacus side(s), one column each: 'cnn' = Tramèr-Boneh's CNN on the pixels, "
                             "'classify-linear' = recipes.classify's features, private releases and linear head "
                             f"(default: {defaults.opacus_model})")
    parser.add_argument("--opacus-mode", choices=("ghost", "hooks", "functorch"), default=defaults.opacus_mode,
                        help="Opacus per-sample gradient mode (ghost clipping is its fastest here)")
    parser.add_argument("--opacus-batch-size", type=int, default=None, metavar="B",
                        help=f"Opacus's expected batch size ({_model_defaults('batch_size')})")
    parser.add_argument("--opacus-lr", dest="opacus_learning_rate", type=float, default=None, metavar="LR",
                        help=f"Opacus's SGD learning rate, momentum 0.9 ({_model_defaults('learning_rate')})")
    parser.add_argument("--max-grad-norm", dest="opacus_max_grad_norm", type=float, default=None, metavar="C",
                        help=f"Opacus's per-sample clipping norm C ({_model_defaults('max_grad_norm')})")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/out/compare"),
                        help="folder for compare.md, compare.json and compare.png")
    parser.add_argument("--results", type=Path, default=None, metavar="MD",
                        help="also write the report as the 'compare' section of this markdown file "
                             "(e.g. benchmarks/RESULTS.md)")
    parser.add_argument("--no-progress", action="store_true", help="hide the children's progress bars")
    # Internal: the parent runs each side as `python -m recipes.compare --side NAME --settings JSON --result FILE`.
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def run_compare(args: argparse.Namespace) -> int:
    """Entry point of both command lines: the comparison (or, with the internal ``--side``, one side of it)."""
    if args.side:
        result = run_side(args.side, CompareSettings(**json.loads(args.settings)))
        args.result.write_text(json.dumps(result))
        return 0
    fields = set(CompareSettings.__dataclass_fields__) - {"opacus_model"}
    common = {k: v for k, v in vars(args).items() if k in fields}
    opacus_sides = [CompareSettings(**common, opacus_model=model, progress=not args.no_progress)
                    for model in dict.fromkeys(args.opacus_model)]
    try:
        outcome = compare(opacus_sides, args.out_dir)
    except ChildFailed as failure:  # not the user's mistake: the side's own traceback is above
        print(f"{PROG}: {failure}", file=sys.stderr)
        return 1
    print(outcome["report"])
    print(f"wrote {args.out_dir / 'compare.md'}, compare.json and compare.png")
    if args.results:
        from benchmarks.report import write_section

        report = outcome["report"].replace("# lipdp vs", "## lipdp vs", 1)
        write_section("compare", f"Generated by `python -m recipes.compare`.\n\n{report}", args.results)
        print(f"wrote {args.results} (section compare)")
    return 0


PROG = "python -m recipes.compare"


def build_parser() -> ArgumentParser:
    """The comparison's flags (one-line errors, exit status 2: ``lipdp.cli.errors``)."""
    parser = ArgumentParser(
        prog=PROG,
        description="lipdp vs Opacus DP-SGD on the same data, (epsilon, delta) and epochs, each side in its own "
                    "process: test accuracy, median step time, peak memory, wall time and epsilon spent; one Opacus "
                    "column per --opacus-model.")
    add_compare_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m recipes.compare``: returns the exit status (2 with one line for a user error)."""
    return run_main(PROG, build_parser, run_compare, argv)


if __name__ == "__main__":
    sys.exit(main())
