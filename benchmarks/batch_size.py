"""Step time and peak memory against batch size: plain PyTorch, lipdp and Opacus, one process per configuration.

    python -m benchmarks.batch_size                       # 64 ... 8192, 4 GB limit; rewrites RESULTS.md's section
    python -m benchmarks.batch_size --batch-sizes 64 128 --steps 2 --warmup 1 --results /tmp/R.md   # a quick try

Batch sizes are measured in increasing order, all methods at one batch size before the next (so slow drifts of
the machine's load hit every method alike). A method that does not fit in ``--memory-limit-gb`` at some batch
size (an allocation failed, or its peak RSS exceeded the limit) is not tried at larger ones: the largest batch
that fits is the last one before. What each method runs: ``benchmarks.measure``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from benchmarks.measure import METHODS, Configuration, Measurement, gigabytes, run_isolated
from benchmarks.report import (
    OUT_DIR, RESULTS, load_average, machine_paragraph, mebibytes, milliseconds, ratio, table, write_json,
    write_section,
)

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("plain-orthogonal", "lipdp", "plain-cnn", "opacus-ghost", "opacus-hooks")
DEFAULT_BATCH_SIZES = tuple(2**k for k in range(6, 14))  # 64 ... 8192
SECTION = "batch_size"


def run_grid(methods: list[str], batch_sizes: list[int], steps: int, warmup: int, threads: int | None,
             memory_limit: int, timeout: float) -> list[Measurement]:
    """Measure every (batch size, method) in order, dropping a method once it does not fit."""
    active = list(methods)
    measurements = []
    bar = tqdm(total=len(methods) * len(batch_sizes), desc="configurations")
    for batch_size in sorted(batch_sizes):
        for method in list(active):
            bar.set_postfix(method=method, batch=batch_size)
            config = Configuration(method, batch_size, steps=steps, warmup=warmup, threads=threads)
            measurement = run_isolated(config, memory_limit, timeout)
            measurements.append(measurement)
            logger.info("%s batch %d: %s, median %s ms, peak %s MiB", method, batch_size, measurement.status,
                        milliseconds(measurement.median_step_seconds), mebibytes(measurement.peak_rss_bytes))
            if not measurement.fits(memory_limit):
                active.remove(method)
            bar.update()
    bar.close()
    return measurements


def _cell(measurement: Measurement | None, memory_limit: int, show: Callable[[Measurement], str]) -> str:
    """``show(measurement)``, or why there is no number ("—" when not tried)."""
    if measurement is None:
        return "—"
    if measurement.status != "ok":
        return measurement.status
    text = show(measurement)
    return text if measurement.fits(memory_limit) else f"{text} (over limit)"


def markdown(measurements: list[Measurement], methods: list[str], memory_limit: int, steps: int, warmup: int,
             load_at_start: list[float]) -> str:
    """The section of RESULTS.md: time, memory, ratio and largest-batch tables, with the machine."""
    grid = {(m.configuration.batch_size, m.configuration.method): m for m in measurements}
    sizes = sorted({m.configuration.batch_size for m in measurements})

    def median(batch: int, method: str) -> float | None:
        found = grid.get((batch, method))
        return found.median_step_seconds if found and found.fits(memory_limit) else None

    def peak(batch: int, method: str) -> int | None:
        found = grid.get((batch, method))
        return found.peak_rss_bytes if found and found.fits(memory_limit) else None

    def show_time(m: Measurement) -> str:
        return milliseconds(m.median_step_seconds)

    def show_memory(m: Measurement) -> str:
        return f"{mebibytes(m.peak_rss_bytes)} (+{mebibytes(m.peak_rss_bytes - m.setup_rss_bytes)})"

    times = [[str(b)] + [_cell(grid.get((b, m)), memory_limit, show_time) for m in methods] for b in sizes]
    memory = [[str(b)] + [_cell(grid.get((b, m)), memory_limit, show_memory) for m in methods] for b in sizes]
    opacus = [m for m in methods if m.startswith("opacus-")]
    ratio_header, ratio_rows = ["batch"], [[str(b)] for b in sizes]
    if {"lipdp", "plain-orthogonal"} <= set(methods):
        ratio_header += ["lipdp / plain time", "lipdp / plain memory"]
        for row, b in zip(ratio_rows, sizes):
            row += [ratio(median(b, "lipdp"), median(b, "plain-orthogonal")),
                    ratio(peak(b, "lipdp"), peak(b, "plain-orthogonal"))]
    if "plain-cnn" in methods:
        ratio_header += [f"{m} / plain-cnn memory" for m in opacus]
        for row, b in zip(ratio_rows, sizes):
            row += [ratio(peak(b, m), peak(b, "plain-cnn")) for m in opacus]
    if "lipdp" in methods and opacus:
        ratio_header.append("lipdp / fastest Opacus time")
        for row, b in zip(ratio_rows, sizes):
            fastest = min((median(b, m) for m in opacus if median(b, m) is not None), default=None)
            row.append(ratio(median(b, "lipdp"), fastest))
    largest = []
    for method in methods:
        fitting = [b for b in sizes if median(b, method) is not None]
        if not fitting:
            largest.append([method, METHODS[method], "none"])
        else:  # fitting at the largest size tried says only "at least"
            largest.append([method, METHODS[method], ("≥ " if fitting[-1] == sizes[-1] else "") + str(fitting[-1])])
    threads = {m.threads for m in measurements if m.threads is not None}
    limit_gb = memory_limit / 1e9
    parts = [
        "## Step time and peak memory against batch size",
        "",
        f"Generated by `python -m benchmarks.batch_size`. Synthetic 1x28x28 inputs, 10 classes; each cell is one "
        f"configuration in its own process: median of {steps} full steps (zero_grad, forward, loss, backward, "
        f"optimizer step) after {warmup} warm-up steps. Memory limit {limit_gb:g} GB. Models: the orthogonal CNN "
        "(lipdp.models.orthogonal_cnn, widths 16/32/64) for plain-orthogonal and lipdp; Tramèr-Boneh's CNN with "
        "GroupNorm (recipes.opacus_baseline.groupnorm_cnn) for plain-cnn and Opacus.",
        "",
        machine_paragraph(threads, load_at_start),
        "",
        "### Median step time (ms)",
        "",
        table(["batch"] + methods, times),
        "",
        "### Peak RSS (MiB; in brackets, above the RSS once set up)",
        "",
        table(["batch"] + methods, memory),
        "",
        "### Ratios",
        "",
        table(ratio_header, ratio_rows),
        "",
        f"### Largest batch that fits in {limit_gb:g} GB (of those tried)",
        "",
        table(["method", "what", "largest batch"], largest),
    ]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.batch_size",
        description="Median step time and peak RSS against batch size for plain training, lipdp and Opacus, each "
                    "configuration in its own process; writes a section of benchmarks/RESULTS.md and a JSON file.")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS),
                        help="methods to measure (see benchmarks.measure)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                        help="batch sizes, measured in increasing order")
    parser.add_argument("--memory-limit-gb", type=float, default=4.0,
                        help="a configuration whose memory would exceed this many GB does not fit (and the method "
                             "is not tried at larger batches)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (the median is kept)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in every configuration (default: torch's default)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds after which a configuration is stopped and reported as 'timeout'")
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is rewritten")
    parser.add_argument("--json", type=Path, default=OUT_DIR / f"{SECTION}.json",
                        help="where the raw measurements go (JSON)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each measurement")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    memory_limit = gigabytes(args.memory_limit_gb)
    load_at_start = load_average()
    measurements = run_grid(args.methods, args.batch_sizes, args.steps, args.warmup, args.threads, memory_limit,
                            args.timeout)
    body = markdown(measurements, args.methods, memory_limit, args.steps, args.warmup, load_at_start)
    print(body)
    write_section(SECTION, body, args.results)
    write_json(args.json, {"memory_limit_bytes": memory_limit, "measurements": [m.to_dict() for m in measurements]})
    print(f"\nwrote {args.results} (section {SECTION}) and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
