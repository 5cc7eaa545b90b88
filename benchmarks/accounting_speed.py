"""Speed of the accounting package: ε after T = 10⁵ steps, noise calibration, and the step budget.

Case: σ = 1.1, q = 256/60000, δ = 1e-5 (DESIGN.md §4). The 10⁵-step history is built by 10⁵ single
``step()`` calls (merged into one entry). Library imports are warmed up first, so the times are
the accounting itself. Writes ``benchmarks/out/accounting_speed.json`` and prints a table.

    python benchmarks/accounting_speed.py [--backends prv rdp pld] [--steps 100000]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accounting  # noqa: E402
from accounting import PrivacyAccountant, calibrate_noise  # noqa: E402

SIGMA, Q, DELTA = 1.1, 256 / 60000, 1e-5
CALIBRATION = {"target_epsilon": 3.0, "epochs": 15}  # 3516 steps
OUT = Path(__file__).resolve().parent / "out" / "accounting_speed.json"


def timed(call):
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


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
    return {"step_calls_seconds": step_time, "epsilon": result.upper, "epsilon_method": result.method,
            "epsilon_note": result.note, "epsilon_seconds": epsilon_time,
            "calibrated_sigma": sigma, "calibrate_seconds": calibration_time,
            "max_additional_steps": extra, "max_additional_steps_seconds": max_steps_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=list(accounting.BACKENDS),
                        default=accounting.available_backends(), help="backends to time (default: all installed)")
    parser.add_argument("--steps", type=int, default=100_000, help="history length T (default: %(default)s)")
    args = parser.parse_args()

    results: dict = {"case": {"noise_multiplier": SIGMA, "sample_rate": Q, "delta": DELTA, "steps": args.steps,
                              "calibration": CALIBRATION},
                     "machine": {"python": platform.python_version(), "processor": platform.processor(),
                                 "platform": platform.platform()},
                     "backends": {}}
    for backend in args.backends:
        warm_up(backend)
        results["backends"][backend] = measure(backend, args.steps)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"σ={SIGMA}, q={Q:.6g}, δ={DELTA:g}; calibration: ε <= {CALIBRATION['target_epsilon']} in "
          f"{CALIBRATION['epochs']} epochs; step budget: ε <= {CALIBRATION['target_epsilon']} after 1000 steps")
    print(f"{'backend':8} {args.steps:>7} step() s  {'ε(T)':>8}  {'ε time s':>9}  {'σ calib':>8}  "
          f"{'calib s':>8}  {'+steps':>7}  {'budget s':>8}")
    for backend, r in results["backends"].items():
        print(f"{backend:8} {r['step_calls_seconds']:>16.3f}  {r['epsilon']:>8.4f}  {r['epsilon_seconds']:>9.2f}  "
              f"{r['calibrated_sigma']:>8.4f}  {r['calibrate_seconds']:>8.2f}  {r['max_additional_steps']:>7d}  "
              f"{r['max_additional_steps_seconds']:>8.2f}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
