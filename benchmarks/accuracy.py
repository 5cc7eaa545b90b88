"""Test accuracy of lipdp and the Opacus DP-SGD baseline at several privacy budgets, on each data set.

    python -m benchmarks.accuracy                                   # Fashion-MNIST and digits, eps 1, 3, 8
    python -m benchmarks.accuracy --datasets digits --epsilons 3 --results /tmp/R.md

Every (data set, epsilon, row) is one run of a ``recipes.compare`` side in its own process, with each side's
settings for that data set (``DATASET_SETTINGS``: chosen on validation splits, never on the test split) and the
same delta and epochs on both sides; the end-to-end CNN row (``ROWS``) runs at its own preset's length. Fixed
front-end features are computed once and cached between runs (the comparison, not this table, times a clean setup). Writes the ``accuracy`` section of ``benchmarks/RESULTS.md``
and a JSON file of every run (``benchmarks/accuracy.json``, tracked: ``--append`` adds runs to it).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from benchmarks.harness import ChildFailed
from benchmarks.report import RESULTS, load_average, machine_paragraph, table, write_json, write_section
from lipdp.presets import train_preset
from recipes.compare import CompareSettings, run_isolated_side

logger = logging.getLogger(__name__)

SECTION = "accuracy"
#: The runs behind the table (small: one record per run), kept next to RESULTS.md.
RUNS = RESULTS.with_name("accuracy.json")
#: Per data set: the comparison's settings at every epsilon (Fashion-MNIST: ``CompareSettings``'s defaults;
#: digits: 1,437 training images, so smaller batches and more epochs).
DATASET_SETTINGS = {
    "fashion-mnist": CompareSettings(dataset="fashion-mnist"),
    "digits": CompareSettings(dataset="digits", epochs=30, lipdp_batch_size=256, opacus_batch_size=256,
                              opacus_learning_rate=2.0),
}


@dataclass(frozen=True)
class Row:
    """A row of the table: a ``recipes.compare`` side, its lipdp recipe, and whether it runs at the length of
    ``lipdp train``'s preset (then only where that preset is a convolutional network) instead of the data set's
    epochs."""

    side: str
    lipdp_recipe: str = "classify"
    preset_length: bool = False


#: ``lipdp-cnn`` is the end-to-end Lipschitz network, ``lipdp train``'s convolutional network on the pixels at its own
#: preset (the patch CNN on Fashion-MNIST; not on digits, where ``lipdp train`` uses an MLP).
ROWS = {"lipdp": Row("lipdp"), "lipdp-cnn": Row("lipdp", "cnn", preset_length=True), "opacus": Row("opacus")}


def row_settings(row: str, dataset: str) -> CompareSettings | None:
    """The comparison's settings of ``row`` on ``dataset`` (None: the row is not run on it)."""
    spec = ROWS[row]
    settings = replace(DATASET_SETTINGS[dataset], lipdp_recipe=spec.lipdp_recipe)
    if not spec.preset_length:
        return settings
    preset = train_preset(dataset)
    return replace(settings, epochs=preset["epochs"]) if preset["model"] in ("cnn", "patch") else None


def run_table(datasets: list[str], epsilons: list[float], delta: float, progress: bool,
              epochs: int | None = None, rows: Sequence[str] = tuple(ROWS)) -> list[dict]:
    """One record per (data set, epsilon, row) the row runs on: the side's result dict plus its settings."""
    records = []
    jobs = [(d, e, r) for d in datasets for e in epsilons for r in rows if row_settings(r, d) is not None]
    bar = tqdm(jobs, desc="runs")
    for dataset, epsilon, row in bar:
        bar.set_postfix(dataset=dataset, epsilon=epsilon, row=row)
        settings = replace(row_settings(row, dataset), epsilon=epsilon, delta=delta, progress=progress)
        settings = replace(settings, epochs=epochs or settings.epochs)
        result = run_isolated_side(ROWS[row].side, settings, fresh_cache=False)
        logger.info("%s eps=%g %s: %.2f%%", dataset, epsilon, row, 100 * result["test_accuracy"])
        records.append({"dataset": dataset, "epsilon_target": epsilon, "side": row, "settings": asdict(settings),
                        **result})
    return records


def _key(record: dict) -> tuple:
    return record["dataset"], record["epsilon_target"], record["side"]


def markdown(records: list[dict], delta: float, load_at_start: list[float]) -> str:
    """The accuracy table (a row per data set and side, a column per epsilon) and how it was made."""
    epsilons = sorted({r["epsilon_target"] for r in records})
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for row in ROWS:
            mine = {r["epsilon_target"]: r for r in records if r["dataset"] == dataset and r["side"] == row}
            if not mine:
                continue
            model = next(iter(mine.values()))["model"]
            rows.append([dataset, row, model] + [
                f"{100 * mine[e]['test_accuracy']:.2f} (ε={mine[e]['epsilon']:.2f})" if e in mine else "—"
                for e in epsilons])
    header = ["data set", "library", "model"] + [f"ε = {e:g}" for e in epsilons]
    epochs = {r["dataset"]: r["settings"]["epochs"] for r in records if not ROWS[r["side"]].preset_length}
    settings = "; ".join(
        f"{name}: {epochs[name]} epochs, lipdp recipe `{s.lipdp_recipe}` (batch {s.lipdp_batch_size or 'its default'}), "
        f"Opacus {s.opacus_mode} (batch {s.opacus_batch_size}, lr {s.opacus_learning_rate:g}, "
        f"C = {s.opacus_max_grad_norm:g})"
        for name, s in DATASET_SETTINGS.items() if name in epochs)
    threads = {r["torch_threads"] for r in records}
    return "\n\n".join([
        f"## Test accuracy (%) at (ε, δ = {delta:g})-DP: lipdp vs Opacus DP-SGD",
        "Generated by `python -m benchmarks.accuracy`. Each cell: test accuracy of one run (seed 0), and the ε its "
        "accountant (PRV) reports for the steps taken. Settings, the same at every ε: "
        f"{settings}. lipdp's recipe defaults were chosen on Fashion-MNIST's validation split, Opacus's are "
        "Tramèr & Boneh's; the digits batch sizes and epochs were set once, not tuned. The `lipdp-cnn` row is "
        "the end-to-end Lipschitz network on the pixels, `lipdp train`'s network (the patch CNN on Fashion-MNIST) "
        "with its own preset "
        "(`lipdp.presets`, chosen on validation; its epochs and batch included).",
        table(header, rows),
        "A cell with — was not run (see the note of the run that produced this table).",
        machine_paragraph(threads, load_at_start),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Test accuracy of lipdp and Opacus DP-SGD at several epsilons (one process per run); writes "
                    "the 'accuracy' section of benchmarks/RESULTS.md and a JSON file.")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASET_SETTINGS),
                        default=["fashion-mnist", "digits"], help="data sets, each with its own settings")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="target epsilons")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta of every run")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: each data set's)")
    parser.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS),
                        help="rows to run: lipdp's classify recipe, lipdp's end-to-end CNN, Opacus")
    parser.add_argument("--append", action="store_true",
                        help="keep the runs already in --json (a new run replaces the one with the same data set, "
                             "epsilon and side) and rebuild the table from all of them")
    parser.add_argument("--rebuild", action="store_true", help="run nothing: rewrite the section from --json")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is rewritten")
    parser.add_argument("--json", type=Path, default=RUNS, help="every run's result (JSON; the default is tracked in "
                        "git, so that --append and --rebuild work from a fresh clone)")
    parser.add_argument("--no-progress", action="store_true", help="hide the runs' progress bars")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    load_at_start = load_average()
    if args.rebuild:
        args.append, args.datasets = True, []
    try:
        records = run_table(args.datasets, args.epsilons, args.delta, not args.no_progress, args.epochs, args.rows)
    except ChildFailed as error:
        print(f"accuracy: {error}", file=sys.stderr)
        return 1
    if args.append and args.json.exists():
        new = {_key(r) for r in records}
        records = [r for r in json.loads(args.json.read_text())["records"] if _key(r) not in new] + records
    body = markdown(records, args.delta, load_at_start)
    write_section(SECTION, body, args.results)
    write_json(args.json, {"delta": args.delta, "records": records})
    print(body)
    print(f"\nwrote {args.results} (section {SECTION}) and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
