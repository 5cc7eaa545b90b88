"""lipdp side by side with Opacus DP-SGD: the same data, the same (epsilon, delta), the same epochs.

    python -m recipes.compare                                   # Fashion-MNIST, eps=3, delta=1e-5
    python -m recipes.compare --dataset digits --epochs 5 --opacus-batch-size 128 --lipdp-batch-size 128

Each side runs in its own interpreter (``benchmarks.harness.run_child``), so that its peak memory (the child's peak RSS) is its own.
Both sides' noise is calibrated with lipdp's accountant (PRV by default) and both report the epsilon it gives for
the steps they took. The median step time is measured the same way on both sides by :class:`StepTimer`: from the
first forward call with gradients enabled to the end of the following optimizer step (data loading and evaluation
excluded; ``benchmarks.harness``). Outputs: a markdown table (printed and written), the JSON of both runs and a PNG plot.

The lipdp side is pluggable (``LIPDP_RECIPES``): ``classify`` runs ``recipes.classify.run`` (scattering front end
and Lipschitz head), ``cnn`` runs ``lipdp.training.train_private`` on the default orthogonal CNN. The Opacus side is
``recipes.opacus_baseline`` (Tramèr-Boneh's CNN with GroupNorm, ghost clipping by default).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from benchmarks.harness import ChildFailed, StepTimer, machine_description, peak_rss_bytes, run_child
from lipdp.cli.errors import ArgumentParser, run_main
from lipdp.cli.output import write_json

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ the two sides


@dataclass
class CompareSettings:
    """Everything both sides need; the lipdp and Opacus hyper-parameters default to each side's own tuning."""

    dataset: str = "fashion-mnist"
    epsilon: float = 3.0
    delta: float = 1e-5
    epochs: int = 40
    seed: int = 0
    lipdp_recipe: str = "classify"
    lipdp_batch_size: int | None = None
    lipdp_learning_rate: float | None = None
    opacus_mode: str = "ghost"
    opacus_batch_size: int = 2048
    opacus_learning_rate: float = 4.0
    opacus_max_grad_norm: float = 0.1
    progress: bool = True


def _summary(model: str, result, batch_size: int) -> dict:
    """A side's result from a ``TrainResult``/``OpacusResult``-like object (same field names)."""
    return {"model": model, "test_accuracy": result.test_accuracy, "epsilon": result.epsilon,
            "noise_multiplier": result.noise_multiplier, "steps": result.steps, "batch_size": batch_size,
            "train_seconds": result.seconds, "epoch_log": result.epoch_log}


def lipdp_classify(settings: CompareSettings) -> dict:
    """lipdp through ``recipes.classify.run`` (scattering front end, Lipschitz head; its own defaults)."""
    from recipes.classify import run

    result = run(settings.dataset, epsilon=settings.epsilon, delta=settings.delta, seed=settings.seed,
                 epochs=settings.epochs, batch_size=settings.lipdp_batch_size,
                 learning_rate=settings.lipdp_learning_rate, progress=settings.progress)
    statistics = [f"{what} (noise multiplier {result[key]:g})" for what, key in (
        ("centred on a private mean", "centring_noise"), ("whitened by private channel moments", "whitening_noise"))
        if result[key]]
    preprocessing = "".join(f", {part}" for part in statistics)
    return {"model": f"{result['front_end']} front end{preprocessing} + {result['head']} head (recipes.classify)",
            "test_accuracy": result["accuracy"], "epsilon": result["epsilon"],
            "noise_multiplier": result["noise_multiplier"], "steps": result["steps"],
            "batch_size": result["config"]["batch_size"], "train_seconds": result["train_seconds"],
            "epoch_log": result["epochs"]}


def lipdp_cnn(settings: CompareSettings) -> dict:
    """lipdp's default orthogonal CNN through ``lipdp.training.train_private`` (``lipdp train``'s settings)."""
    from lipdp.datasets import load_dataset
    from lipdp.models import orthogonal_cnn
    from lipdp.presets import train_preset
    from lipdp.training import TrainConfig, train_private

    splits = load_dataset(settings.dataset, seed=settings.seed)
    defaults = train_preset(splits.name, "cnn")  # where `lipdp train` uses an MLP: the generic CNN settings
    config = TrainConfig(
        epsilon=settings.epsilon, delta=settings.delta, epochs=settings.epochs, seed=settings.seed,
        batch_size=min(settings.lipdp_batch_size or defaults["batch_size"], len(splits.train)),
        learning_rate=settings.lipdp_learning_rate or defaults["learning_rate"], temperature=defaults["temperature"])
    model = orthogonal_cnn(splits.input_shape, splits.num_classes, widths=defaults["widths"])
    parameters = sum(p.numel() for p in model.parameters())
    result, _ = train_private(model, splits.train, splits.test, config, progress=settings.progress)
    return _summary(f"orthogonal CNN {defaults['widths']}, {parameters} parameters (lipdp.models)", result,
                    config.batch_size)


def opacus_side(settings: CompareSettings) -> dict:
    """Opacus DP-SGD on Tramèr-Boneh's CNN with GroupNorm (``recipes.opacus_baseline``)."""
    from lipdp.datasets import load_dataset
    from recipes.opacus_baseline import OpacusConfig, groupnorm_cnn, train_opacus

    splits = load_dataset(settings.dataset, seed=settings.seed)
    config = OpacusConfig(
        epsilon=settings.epsilon, delta=settings.delta, epochs=settings.epochs, seed=settings.seed,
        batch_size=min(settings.opacus_batch_size, len(splits.train)),
        learning_rate=settings.opacus_learning_rate, max_grad_norm=settings.opacus_max_grad_norm,
        grad_sample_mode=settings.opacus_mode)
    model = groupnorm_cnn(splits.input_shape, splits.num_classes)
    parameters = sum(p.numel() for p in model.parameters())
    result = train_opacus(model, splits.train, splits.test, config, progress=settings.progress)
    return _summary(f"Tramèr-Boneh CNN + GroupNorm, {parameters} parameters, Opacus {settings.opacus_mode}, "
                    f"C={config.max_grad_norm}", result, config.batch_size)


LIPDP_RECIPES: dict[str, Callable[[CompareSettings], dict]] = {"classify": lipdp_classify, "cnn": lipdp_cnn}
SIDES = ("lipdp", "opacus")


def run_side(side: str, settings: CompareSettings) -> dict:
    """Run one side in this process; adds its median step time, steps timed, peak RSS and threads."""
    import torch

    function = LIPDP_RECIPES[settings.lipdp_recipe] if side == "lipdp" else opacus_side
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


# ---------------------------------------------------------------------------------------------------- report


def _row(label: str, values: list[str]) -> str:
    return f"| {label} | " + " | ".join(values) + " |"


def markdown_report(settings: CompareSettings, results: dict[str, dict], machine: dict) -> str:
    """The comparison as a markdown table, with the settings and the machine it ran on."""
    sides = [results[s] for s in SIDES]

    def each(formatter: Callable[[dict], str]) -> list[str]:
        return [formatter(r) for r in sides]

    lines = [
        f"# lipdp vs Opacus DP-SGD: {settings.dataset}, (epsilon = {settings.epsilon:g}, delta = {settings.delta:g}),"
        f" {settings.epochs} epochs",
        "",
        _row("", ["lipdp", f"Opacus ({settings.opacus_mode})"]),
        _row("---", ["---"] * len(sides)),
        _row("model", each(lambda r: r["model"])),
        _row("test accuracy", each(lambda r: f"{100 * r['test_accuracy']:.2f}%")),
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
        f"{machine['torch']} with {sides[0]['torch_threads']} threads on both sides, opacus {machine['opacus']}; "
        f"load average at the start {machine['load_average']}.",
        "Step time: first forward (gradients on) to the end of the optimizer step, median over all steps; "
        "each side in its own process (peak RSS is that process's). Training time: the training loop with its "
        "per-epoch evaluation. Process wall time adds interpreter start-up, data loading, noise calibration and "
        "any fixed front end's features (computed afresh, with an empty cache).",
    ]
    return "\n".join(lines) + "\n"


def plot(settings: CompareSettings, results: dict[str, dict], path: Path) -> Path:
    """Accuracy per epoch and bars of accuracy, step time, peak memory and training time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = ["lipdp", f"Opacus ({settings.opacus_mode})"]
    sides = [results[s] for s in SIDES]
    figure, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for name, result in zip(names, sides):
        log = result["epoch_log"]
        axes[0].plot([e["epoch"] for e in log], [100 * e["test_accuracy"] for e in log], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy per epoch")
    axes[0].legend()
    bars = [("test accuracy (%)", lambda r: 100 * r["test_accuracy"]),
            ("median step time (ms)", lambda r: 1000 * (r["median_step_seconds"] or 0)),
            ("peak RSS (MiB)", lambda r: r["peak_rss_bytes"] / 2**20),
            ("training time (s)", lambda r: r["train_seconds"])]
    for axis, (title, value) in zip(axes[1:], bars):
        heights = [value(r) for r in sides]
        axis.bar(names, heights, color=["tab:blue", "tab:orange"])
        axis.bar_label(axis.containers[0], fmt="%.1f")
        axis.set_title(title)
    figure.suptitle(f"{settings.dataset}, (ε = {settings.epsilon:g}, δ = {settings.delta:g}), "
                    f"{settings.epochs} epochs")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def compare(settings: CompareSettings, out_dir: Path) -> dict:
    """Run both sides, one process each, one after the other; write compare.{md,json,png} to ``out_dir``."""
    machine = machine_description()
    results = {}
    for side in SIDES:
        logger.info("running the %s side", side)
        results[side] = run_isolated_side(side, settings)
    report = markdown_report(settings, results, machine)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(report)
    write_json(out_dir / "compare.json", {"settings": asdict(settings), "machine": machine, "results": results})
    plot(settings, results, out_dir / "compare.png")
    return {"report": report, "results": results}


# ---------------------------------------------------------------------------------------------- command line


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
    parser.add_argument("--opacus-mode", choices=("ghost", "hooks", "functorch"), default=defaults.opacus_mode,
                        help="Opacus per-sample gradient mode (ghost clipping is its fastest here)")
    parser.add_argument("--opacus-batch-size", type=int, default=defaults.opacus_batch_size, metavar="B",
                        help="Opacus's expected batch size (Tramèr-Boneh: 2048)")
    parser.add_argument("--opacus-lr", dest="opacus_learning_rate", type=float, metavar="LR",
                        default=defaults.opacus_learning_rate, help="Opacus's SGD learning rate (momentum 0.9)")
    parser.add_argument("--max-grad-norm", dest="opacus_max_grad_norm", type=float, metavar="C",
                        default=defaults.opacus_max_grad_norm, help="Opacus's per-sample clipping norm C")
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
    fields = CompareSettings.__dataclass_fields__
    settings = CompareSettings(**{k: v for k, v in vars(args).items() if k in fields},
                               progress=not args.no_progress)
    try:
        outcome = compare(settings, args.out_dir)
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
                    "process: test accuracy, median step time, peak memory, wall time and epsilon spent.")
    add_compare_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m recipes.compare``: returns the exit status (2 with one line for a user error)."""
    return run_main(PROG, build_parser, run_compare, argv)


if __name__ == "__main__":
    sys.exit(main())
