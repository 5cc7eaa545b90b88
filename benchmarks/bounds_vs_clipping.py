"""Certified bounds against per-sample clipping on the SAME orthogonal networks, budgets, data and epochs.

    python -m benchmarks.bounds_vs_clipping                         # both networks, eps 1, 3, 8; rewrites RESULTS.md
    python -m benchmarks.bounds_vs_clipping --networks digits-mlp --epsilons 3 --results /tmp/R.md

Each network is ``lipdp train``'s preset for its data set (``lipdp.presets``: the Fashion-MNIST orthogonal CNN, the
digits orthogonal MLP), trained by ``lipdp.training.train_private`` with ``mechanism="bounds"`` (noise from the
certified per-sample bounds) and with ``mechanism="clipping"`` (DP-SGD: each record's gradient clipped to C, noise
sigma C; ``lipdp.clipping``), with the same sampling, accountant, optimizer, schedule, seed, epochs and
logit-gradient clip. The clipping norm C is chosen per network at epsilon = 3 on a validation split cut from the
training data (``CLIP_GRID``); the test split is then read once per (network, epsilon, mechanism). Every run is its own process: the median step time
(``StepTimer``) and the peak resident memory are its own. Finished runs are kept in ``benchmarks/out/`` and reused
by a rerun with the same arguments, preset and network (the file name carries a hash of both: ``kept_run_key``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.harness import ChildFailed, StepTimer, machine_description, peak_rss_bytes, run_child
from benchmarks.report import OUT_DIR, RESULTS, load_average, machine_paragraph, mebibytes, milliseconds, table, \
    write_json, write_section

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # annotations only: torch and lipdp are imported where a network is built
    from torch import nn

    from lipdp.datasets import DatasetSplits

SECTION = "bounds_vs_clipping"
NETWORKS = {"fashion-mnist-cnn": "fashion-mnist", "digits-mlp": "digits"}
CLIP_GRID = (0.25, 1.0, 2.0, 4.0, 8.0)
RUNS_DIR = OUT_DIR / SECTION
VALIDATION_FRACTION = 0.2


def build_network(network: str, seed: int) -> tuple[DatasetSplits, str, dict, nn.Module]:
    """The data splits, model kind, preset and freshly initialised model of ``network`` (``lipdp train``'s)."""
    import torch

    from lipdp.datasets import load_dataset
    from lipdp.models import orthogonal_network
    from lipdp.presets import choose_model, input_norm_bound

    splits = load_dataset(NETWORKS[network], seed=seed)
    kind, preset = choose_model(splits.name, splits.input_shape)
    torch.manual_seed(seed)
    model = orthogonal_network(kind, splits.input_shape, splits.num_classes, preset["widths"],
                               input_norm_bound=input_norm_bound(preset))
    return splits, kind, preset, model


@functools.lru_cache(maxsize=None)
def kept_run_key(network: str) -> str:
    """8 hex digits of the preset and of the network's architecture (its repr): a kept run is reused only while
    both are unchanged."""
    _, _, preset, model = build_network(network, 0)
    return hashlib.sha256((json.dumps(preset, sort_keys=True) + repr(model)).encode()).hexdigest()[:8]


def train_one(network: str, epsilon: float, mechanism: str, max_grad_norm: float | None, validation: bool,
              seed: int) -> dict:
    """One private run in this process: held-out accuracy, (epsilon, delta), median step time, peak memory."""
    from lipdp.datasets import train_validation_split
    from lipdp.presets import training_settings
    from lipdp.training import TrainConfig, train_private

    splits, kind, preset, model = build_network(network, seed)
    train, held_out = splits.train, splits.test
    if validation:
        train, held_out = train_validation_split(splits.train, VALIDATION_FRACTION, seed=seed)
    settings = training_settings(preset)
    settings["batch_size"] = min(settings["batch_size"], len(train))
    config = TrainConfig(**settings, epsilon=epsilon, seed=seed, mechanism=mechanism, max_grad_norm=max_grad_norm)
    with StepTimer() as timer:
        result, _ = train_private(model, train, held_out, config, progress=False)
    return {"network": network, "kind": kind, "widths": list(preset["widths"]), "epsilon": epsilon,
            "loss_grad_clip": config.loss_grad_clip,
            "mechanism": mechanism, "max_grad_norm": max_grad_norm, "evaluated_on": "validation" if validation else "test",
            "accuracy": result.test_accuracy, "epsilon_spent": result.epsilon, "noise_multiplier": result.noise_multiplier,
            "epochs": config.epochs, "batch_size": config.batch_size, "steps": result.steps,
            "step_seconds": timer.median(), "train_seconds": result.seconds, "peak_rss_bytes": peak_rss_bytes(),
            "load_average": [round(value, 2) for value in os.getloadavg()]}


def run_isolated(network: str, epsilon: float, mechanism: str, max_grad_norm: float | None, validation: bool,
                 seed: int, kept_only: bool = False) -> dict | None:
    """``train_one`` in a fresh interpreter (its own peak memory). Each finished run is kept in ``RUNS_DIR`` and
    reused by a later invocation with the same arguments (a Fashion-MNIST clipping run takes minutes)."""
    split = "validation" if validation else "test"
    name = f"{network}-eps{epsilon:g}-{mechanism}-C{max_grad_norm}-{split}-seed{seed}-{kept_run_key(network)}"
    kept = RUNS_DIR / f"{name}.json"
    if kept.exists():
        return json.loads(kept.read_text())
    if kept_only:
        return None
    argv = ["--child", network, str(epsilon), mechanism, str(max_grad_norm), str(int(validation)), str(seed)]
    outcome = run_child("benchmarks.bounds_vs_clipping", argv, capture_stderr=True)
    if outcome.result is None:
        raise ChildFailed(f"{network} eps={epsilon} {mechanism}: exit {outcome.returncode}\n{outcome.stderr_tail}")
    write_json(kept, outcome.result)
    return outcome.result


def choose_clip(network: str, seed: int, grid: tuple[float, ...], kept_only: bool = False
                ) -> tuple[float, list[dict]]:
    """The C of ``grid`` with the best validation accuracy at epsilon = 3 (and every validation run)."""
    runs = [run for clip in grid if (run := run_isolated(network, 3.0, "clipping", clip, True, seed, kept_only))]
    for run in runs:
        logger.info("%s validation C=%g: %.4f", network, run["max_grad_norm"], run["accuracy"])
    return max(runs, key=lambda run: run["accuracy"])["max_grad_norm"], runs


def _load(run: dict) -> str:
    """The 1-minute load average when the run ended ('—' for runs kept from before it was recorded)."""
    return f"{run['load_average'][0]:.1f}" if run.get("load_average") else "—"


def render(runs: list[dict], validation: list[dict], threads: set[int], load: list[float]) -> str:
    """The RESULTS.md section: one row per (network, epsilon), bounds beside clipping."""
    rows = []
    by_key = {(r["network"], r["epsilon"], r["mechanism"]): r for r in runs}
    for network, epsilon in sorted({(r["network"], r["epsilon"]) for r in runs}):
        bounds, clipping = by_key.get((network, epsilon, "bounds")), by_key.get((network, epsilon, "clipping"))
        if bounds is None or clipping is None:
            continue
        model = f"{bounds['kind']} {'/'.join(map(str, bounds['widths']))}"
        rows.append([network, model, f"{bounds['epochs']} x {bounds['batch_size']}", f"{epsilon:g}",
                     f"{100 * bounds['accuracy']:.2f}",
                     f"{100 * clipping['accuracy']:.2f} (C={clipping['max_grad_norm']:g})",
                     milliseconds(bounds["step_seconds"]), milliseconds(clipping["step_seconds"]),
                     f"{clipping['step_seconds'] / bounds['step_seconds']:.2f}",
                     mebibytes(bounds["peak_rss_bytes"]), mebibytes(clipping["peak_rss_bytes"]),
                     " / ".join(_load(run) for run in (bounds, clipping))])
    chosen = ", ".join(f"{r['network']} C={r['max_grad_norm']:g}: {100 * r['accuracy']:.2f}%" for r in validation)
    return "\n".join([
        "Certified bounds (`mechanism=\"bounds\"`) against DP-SGD's per-sample clipping (`mechanism=\"clipping\"`) on "
        "the same orthogonal network, data, budget (delta = 1e-5), sampling, accountant, optimizer, schedule, seed and "
        "epochs (`lipdp train`'s presets). Test accuracy, one seed; median step time (ms) and peak resident memory (MiB) "
        "of each run in its own process; runs are kept and reused by reruns, so each row's times are of its own moment: "
        "the last column gives the load when each side ended (above 2, other jobs shared the cores). C chosen at "
        f"epsilon = 3 on a {VALIDATION_FRACTION:g} validation split of the training data among the values tried (validation accuracy: {chosen}); the test split read once per row and side. "
        "Regenerate: `python -m benchmarks.bounds_vs_clipping`.",
        "",
        table(["network", "model (widths)", "epochs x batch", "epsilon", "bounds acc. %", "clipping acc. %", "bounds step", "clipping step",
               "clipping/bounds time", "bounds peak RSS", "clipping peak RSS", "1-min load at the end"], rows),
        "",
        machine_paragraph(threads, load),
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (or, with ``--child``, one run) and rewrite the RESULTS.md section."""
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["--child"]:
        network, epsilon, mechanism, clip, validation, seed, flag, path = arguments[1:]
        result = train_one(network, float(epsilon), mechanism, None if clip == "None" else float(clip),
                           bool(int(validation)), int(seed))
        Path(path).write_text(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bounds_vs_clipping", description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--clip-grid", type=float, nargs="+", default=list(CLIP_GRID),
                        help="clipping norms C tried on the validation split at epsilon = 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kept-only", action="store_true",
                        help="start no run: the table from the runs kept by earlier invocations (missing rows left out)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is rewritten")
    args = parser.parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load = load_average()
    import torch

    runs, validation = [], []
    for network in args.networks:
        clip, tried = choose_clip(network, args.seed, tuple(args.clip_grid), args.kept_only)
        validation += tried
        for epsilon in args.epsilons:
            for mechanism, norm in (("bounds", None), ("clipping", clip)):
                run = run_isolated(network, epsilon, mechanism, norm, False, args.seed, args.kept_only)
                if run is None:
                    continue
                logger.info("%s eps=%g %s: %.4f, step %.1f ms", network, epsilon, mechanism, run["accuracy"],
                            1e3 * run["step_seconds"])
                runs.append(run)
    body = render(runs, validation, {torch.get_num_threads()}, load)
    write_json(OUT_DIR / f"{SECTION}.json", {"machine": machine_description(), "runs": runs, "validation": validation})
    print(f"wrote {write_section(SECTION, body, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
