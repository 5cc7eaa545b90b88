"""Speed of the accounting package: ε after T = 10⁵ steps, noise calibration, and the step budget.

Case: σ = 1.1, q = 256/60000, δ = 1e-5 (docs/design.md §4). The 10⁵-step history is built by 10⁵ single
``step()`` calls (merged into one entry). Library imports are warmed up first, so the times are
the accounting itself; each is reported as wall and CPU seconds of this process (compare CPU on a
shared machine). Writes ``benchmarks/out/accounting_speed.json`` and prints a table.

    python benchmarks/accounting_speed.py [--backends prv rdp pld] [--steps 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accounting  # noqa: E402
from accounting import PrivacyAccountant, calibrate_noise  # noqa: E402
from lipdp.cli.output import write_json  # noqa: E402

SIGMA, Q, DELTA = 1.1, 256 / 60000, 1e-5
CALIBRATION = {"target_epsilon": 3.0, "epochs": 15}  # 3516 steps
OUT = Path(__file__).resolve().parent / "out" / "accounting_speed.json"


def timed(call) -> tuple:
    """(value, {"wall": seconds, "cpu": seconds of this process}): CPU time is what to compare on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = call()
    return value, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def warm_up(backend: str) -> None:
    """Import the backend's libraries (Opacus imports torch) outside the timed region."""
    accountant = PrivacyAccountant(backend)
    accountant.step(SIGMA, Q, 10)
    accountant.epsilon(DELTA)


def measure(backend: str, steps: int) -> dict:
    accountant = PrivacyAccountant(backend)
    _, step_time = timed(lambda: [accountant.step(SIGMA, Q) for _ in range(steps)])
    assert len(accountant.history) == 1
    result, epsilon_time = timed(lambda: accountant.epsilon_result(DELTA))
    sigma, calibration_time = timed(lambda: calibrate_noise(delta=DELTA, sample_rate=Q, backend=backend,
                                                            **CALIBRATION))
    budget = PrivacyAccountant(backend)
    budget.step(SIGMA, Q, 1000)
    extra, max_steps_time = timed(lambda: budget.max_additional_steps(SIGMA, Q, CALIBRATION["target_epsilon"], DELTA))
    return {"step_calls": step_time, "epsilon": result.upper, "epsilon_method": result.method,
            "epsilon_note": result.note, "epsilon_time": epsilon_time,
            "calibrated_sigma": sigma, "calibrate_time": calibration_time,
            "max_additional_steps": extra, "max_additional_steps_time": max_steps_time}


def _times(t: dict) -> str:
    return f"{t['wall']:.2f} / {t['cpu']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=list(accounting.BACKENDS),
                        default=accounting.available_backends(), help="backends to time (default: all installed)")
    parser.add_argument("--steps", type=int, default=100_000, help="history length T (default: %(default)s)")
    args = parser.parse_args()

    results: dict = {
        "case": {"noise_multiplier": SIGMA, "sample_rate": Q, "delta": DELTA, "steps": args.steps,
                 "calibration": CALIBRATION},
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_1min_at_start": os.getloadavg()[0]},
        "backends": {},
    }
    for backend in args.backends:
        warm_up(backend)
        results["backends"][backend] = measure(backend, args.steps)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_json(OUT, results)
    print(f"σ={SIGMA}, q={Q:.6g}, δ={DELTA:g}; calibration: ε <= {CALIBRATION['target_epsilon']} in "
          f"{CALIBRATION['epochs']} epochs; step budget: ε <= {CALIBRATION['target_epsilon']} after 1000 steps")
    print("times in seconds, wall / CPU of this process")
    print(f"{'backend':8} {f'{args.steps} step()':>14}  {'ε(T)':>7}  {'ε time':>13}  {'σ calib':>7}  "
          f"{'calibrate':>13}  {'+steps':>6}  {'step budget':>13}")
    for backend, r in results["backends"].items():
        print(f"{backend:8} {_times(r['step_calls']):>14}  {r['epsilon']:>7.4f}  {_times(r['epsilon_time']):>13}  "
              f"{r['calibrated_sigma']:>7.4f}  {_times(r['calibrate_time']):>13}  {r['max_additional_steps']:>6d}  "
              f"{_times(r['max_additional_steps_time']):>13}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
