"""Speed of the accounting package: ε after T = 10⁵ steps, noise calibration, and the step budget.

Case: σ = 1.1, q = 256/60000, δ = 1e-5 (docs/design.md §4). The 10⁵-step history is built by 10⁵ single
``step()`` calls (merged into one entry). Library imports are warmed up first, so the times are
the accounting itself; each is reported as wall and CPU seconds of this process (compare CPU on a
shared machine). Writes ``benchmarks/out/accounting_speed.json`` and prints a table.

Then the PRV grid's truncation bound (Remark 5.6) at the sample rates of lipdp's presets: prv-accountant's
``compute_safe_domain_size`` (150 RDP orders) against ``accounting.guess.safe_half_width`` (73), side by side,
median of ``--repeats`` calls each (curve cache cleared before each), with the ratio of the two bounds; and the
first ``calibrate_noise`` of each preset with the prv backend.

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
#: name -> (sample rate q, epochs, σ of the truncation-bound case): lipdp's presets at ε = 3 (σ as calibrated).
PRESETS = {
    "digits B = 512, 1 epoch": (512 / 1437, 1, 1.3488),
    "digits B = 256, 30 epochs": (256 / 1437, 30, 3.3974),
    "fashion-mnist B = 2048, 12 epochs": (2048 / 60000, 12, 1.1909),
    "fashion-mnist B = 4096, 20 epochs": (4096 / 60000, 20, 1.8499),
}
EPS_ERROR, DELTA_ERROR = 0.01, DELTA / 1000  # the PRV backend's defaults


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


def truncation_bounds(repeats: int) -> dict:
    """Per preset: both truncation bounds, their median wall times, and the first calibration's time."""
    import statistics
    import warnings

    from prv_accountant import PoissonSubsampledGaussianMechanism
    from prv_accountant.accountant import compute_safe_domain_size

    from accounting import guess
    from accounting.history import Composition, HistoryEntry

    rows = {}
    for name, (q, epochs, sigma) in PRESETS.items():
        steps = accounting.steps_for_epochs(epochs, q)
        composition = Composition.of([HistoryEntry(sigma, q, steps)])
        prvs = [PoissonSubsampledGaussianMechanism(q, sigma)]

        def library() -> float:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return compute_safe_domain_size(prvs, [steps], EPS_ERROR, DELTA_ERROR)

        def ours() -> float:
            guess._rdp.cache_clear()  # time the curves, not the cache
            return guess.safe_half_width(composition, EPS_ERROR, DELTA_ERROR)

        bounds, times = {}, {"library": [], "ours": []}
        for _ in range(repeats):
            for key, call in (("library", library), ("ours", ours)):
                bounds[key], t = timed(call)
                times[key].append(t["wall"])
        guess._rdp.cache_clear()
        sigma_calibrated, calibration = timed(lambda: calibrate_noise(3.0, DELTA, q, epochs=epochs))
        rows[name] = {"sample_rate": q, "steps": steps, "noise_multiplier": sigma, "library_bound": bounds["library"],
                      "bound": bounds["ours"], "library_seconds": statistics.median(times["library"]),
                      "seconds": statistics.median(times["ours"]), "calibrated_sigma": sigma_calibrated,
                      "calibrate_time": calibration}
    return rows


def _times(t: dict) -> str:
    return f"{t['wall']:.2f} / {t['cpu']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=list(accounting.BACKENDS),
                        default=accounting.available_backends(), help="backends to time (default: all installed)")
    parser.add_argument("--steps", type=int, default=100_000, help="history length T (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="calls per truncation bound (default: %(default)s)")
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

    results["truncation_bounds"] = truncation_bounds(args.repeats)

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
    print(f"\nPRV truncation bound L (Remark 5.6), median of {args.repeats}: prv-accountant's (150 orders) / "
          "accounting.guess's (73); first calibrate_noise(ε = 3) with prv")
    print(f"{'preset':34} {'L library':>9} {'L ours':>8} {'ratio':>6} {'s library':>9} {'s ours':>7}  {'σ':>7}  "
          f"{'calibrate':>13}")
    for name, r in results["truncation_bounds"].items():
        print(f"{name:34} {r['library_bound']:>9.3f} {r['bound']:>8.3f} {r['bound'] / r['library_bound']:>6.3f} "
              f"{r['library_seconds']:>9.3f} {r['seconds']:>7.3f}  {r['calibrated_sigma']:>7.4f}  "
              f"{_times(r['calibrate_time']):>13}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
