"""The GPU check of issue 17, one command on a CUDA machine (designed for < 12 minutes on one H200):

    python -m benchmarks.gpu                 # pytest -m gpu, then the sweep; writes RESULTS.md's "gpu" section

1. ``pytest -m gpu`` (``tests/test_gpu.py``: a CUDA model trains under the engine, noise on CUDA, bounds = CPU's).
2. Plain vs lipdp on lipdp's orthogonal CNN, plain vs Opacus ghost clipping on Tramèr & Boneh's CNN (GroupNorm),
   at batch 256, 512, ..., 65536 on 1x28x28 inputs (``benchmarks.measure.build_step``, device cuda): median step
   time (CUDA-synchronised) and peak GPU memory (``torch.cuda.max_memory_allocated``) per configuration; a method
   stops at its first out-of-memory batch, and the largest batch that fits is reported. Configurations left when
   ``--time-budget`` runs out are marked "not run".
Without CUDA it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.measure import Configuration, build_step
from benchmarks.report import OUT_DIR, RESULTS, table, write_json, write_section

SECTION = "gpu"
METHODS = ("plain-orthogonal", "lipdp", "plain-cnn", "opacus-ghost")
DEFAULT_BATCHES = tuple(256 * 2**k for k in range(9))  # 256 ... 65536


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration")
    parser.add_argument("--time-budget", type=float, default=600, help="seconds for the sweep (then 'not run')")
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu first")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--json", type=Path, default=OUT_DIR / f"{SECTION}.json")
    return parser


def measure_gpu(method: str, batch: int, steps: int, warmup: int) -> dict:
    """One configuration on the GPU: status "ok" / "oom", median step seconds and peak allocated bytes."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step = build_step(Configuration(method, batch, device="cuda"))
        seconds = []
        for _ in range(warmup + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        return {"method": method, "batch_size": batch, "status": "oom", "seconds": None, "peak_bytes": None}
    finally:
        step = None
    return {"method": method, "batch_size": batch, "status": "ok", "seconds": statistics.median(seconds[warmup:]),
            "peak_bytes": torch.cuda.max_memory_allocated()}


def sweep(methods: list[str], batches: list[int], steps: int, warmup: int, budget: float) -> list[dict]:
    """Every (method, batch) in increasing batch order; a method stops at its first OOM."""
    deadline, rows, stopped = time.monotonic() + budget, [], set()
    for batch in batches:
        for method in methods:
            if method in stopped or time.monotonic() > deadline:
                rows.append({"method": method, "batch_size": batch, "status": "not run" if method not in stopped
                             else "oom (smaller batch)", "seconds": None, "peak_bytes": None})
                continue
            row = measure_gpu(method, batch, steps, warmup)
            print(f"{method} batch {batch}: {row['status']} {row['seconds']} s {row['peak_bytes']} B", flush=True)
            if row["status"] == "oom":
                stopped.add(method)
            rows.append(row)
    return rows


def markdown(rows: list[dict], device: str, tests: str, methods: list[str], batches: list[int]) -> str:
    """The "gpu" section: step time and peak memory per (batch, method), the largest batch that fits."""
    cell = {(r["method"], r["batch_size"]): r for r in rows}

    def show(row: dict | None, key: str) -> str:
        if row is None or row["status"] != "ok":
            return "—" if row is None else row["status"]
        return f"{1000 * row['seconds']:.1f}" if key == "seconds" else f"{row['peak_bytes'] / 2**20:.0f}"

    time_rows = [[str(b)] + [show(cell.get((m, b)), "seconds") for m in methods] for b in batches]
    memory_rows = [[str(b)] + [show(cell.get((m, b)), "peak") for m in methods] for b in batches]
    largest = []
    for m in methods:
        fits = [b for b in batches if cell.get((m, b), {}).get("status") == "ok"]
        largest.append([m, str(max(fits)) if fits else "none"])
    return "\n".join([
        f"## GPU: step time and peak memory ({device})",
        "",
        "Generated by `python -m benchmarks.gpu`. Synthetic 1x28x28 inputs, 10 classes; plain-orthogonal / lipdp: "
        "lipdp's orthogonal CNN with Adam; plain-cnn / opacus-ghost: Tramèr & Boneh's CNN with GroupNorm, SGD. "
        "Median of the timed steps (CUDA-synchronised); peak memory = torch.cuda.max_memory_allocated.",
        "",
        f"`pytest -m gpu`: {tests}",
        "",
        "### Median step time (ms)",
        "",
        table(["batch", *methods], time_rows),
        "",
        "### Peak GPU memory (MiB)",
        "",
        table(["batch", *methods], memory_rows),
        "",
        "### Largest batch that fits",
        "",
        table(["method", "largest batch"], largest),
    ])


def main(argv: list[str] | None = None) -> int:
    """Run the GPU tests and the sweep, write the section; exit 2 (one line) without CUDA."""
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device available (torch.cuda.is_available() is False); nothing was run")
        return 2
    device = torch.cuda.get_device_name()
    tests = "skipped (--skip-tests)"
    if not args.skip_tests:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"],
                              capture_output=True, text=True)
        tests = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        print(done.stdout[-3000:], flush=True)
    rows = sweep(args.methods, args.batch_sizes, args.steps, args.warmup, args.time_budget)
    body = markdown(rows, device, tests, args.methods, args.batch_sizes)
    print(body)
    write_section(SECTION, body, args.results)
    write_json(args.json, {"device": device, "tests": tests, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
