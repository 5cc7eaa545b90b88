"""Tests of the torch-free ``accounting`` package against the real libraries (no mocks).

Reference case (docs/design.md §4): q = 256/60000, σ = 1.1, T = 3516, δ = 1e-5 → PRV/PLD ε ≈ 1.134
(PRV upper ≈ 1.144), RDP ε ≈ 1.281.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import accounting
from accounting import (
    AccountingError,
    BudgetReport,
    HistoryEntry,
    PrivacyAccountant,
    calibrate_noise,
    max_epochs,
    max_steps,
    steps_for_epochs,
)
from lipdp.cli import main as lipdp_main

REPO = Path(__file__).resolve().parents[1]
Q, SIGMA, T, DELTA = 256 / 60000, 1.1, 3516, 1e-5
HAS_PLD = accounting.backends.pld_available()


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "lipdp.cli", "budget", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference() -> dict[str, PrivacyAccountant]:
    accountants = {}
    for backend in accounting.available_backends():
        accountants[backend] = PrivacyAccountant(backend)
        accountants[backend].step(SIGMA, Q, T)
    return accountants


# -- import ------------------------------------------------------------------------------------------


def test_import_accounting_and_the_cli_does_not_import_torch():
    code = ("import sys, accounting, accounting.report, accounting.calibration, lipdp.cli, lipdp.cli.budget\n"
            "print(sorted(m for m in ('torch', 'opacus', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- reference values ------------------------------------------------------------------------------


def test_prv_reference(reference):
    result = reference["prv"].epsilon_result(DELTA)
    assert result.method.startswith("prv-accountant") and result.note == ""
    assert result.lower < result.estimate < result.upper
    assert result.estimate == pytest.approx(1.134, abs=2e-3)
    assert result.upper == pytest.approx(1.144, abs=2e-3)
    assert reference["prv"].epsilon(DELTA) == result.upper
    assert reference["prv"].epsilon_bounds(DELTA) == (result.lower, result.estimate, result.upper)


def test_rdp_reference(reference):
    assert reference["rdp"].epsilon(DELTA) == pytest.approx(1.281, abs=1e-3)
    assert reference["rdp"].epsilon_bounds(DELTA)[0] == 0.0  # RDP has no lower bound: the trivial one


def test_prv_within_one_percent_of_pld(reference):
    pytest.importorskip("dp_accounting")
    pld = reference["pld"].epsilon(DELTA)
    assert pld == pytest.approx(1.134, abs=2e-3)
    lower, _, upper = reference["prv"].epsilon_bounds(DELTA)
    assert abs(upper / pld - 1) < 0.01  # the conservative PRV value
    assert lower <= pld <= upper


def test_delta_inverts_epsilon(reference):
    # PRV: δ estimate at the ε estimate is δ; the bounds are taken at ε ± eps_error
    prv = reference["prv"].delta_result(reference["prv"].epsilon_result(DELTA).estimate)
    assert prv.estimate == pytest.approx(DELTA, rel=0.01)
    assert prv.lower < prv.estimate < prv.upper
    for backend in set(reference) - {"prv"}:  # upper-bound-only backends: δ(ε(δ)) = δ
        accountant = reference[backend]
        assert accountant.delta(accountant.epsilon(DELTA)) == pytest.approx(DELTA, rel=0.01), backend
    assert reference["rdp"].delta(reference["rdp"].epsilon(DELTA)) <= DELTA * (1 + 1e-6)


def test_large_epsilon_falls_back_to_opacus():
    # prv-accountant 0.2.0 raises here ("Discrete mean differs ..."); Opacus's PRV gives ε ≈ 506.
    # eps_error=0.1 keeps the grid small enough for a unit test; the default takes the same path.
    accountant = PrivacyAccountant("prv", eps_error=0.1)
    accountant.step(0.3, 0.1, 1000)
    result = accountant.epsilon_result(DELTA)
    assert result.method.startswith("opacus") and "fallback" in result.note
    assert result.lower <= 506.19 <= result.upper
    assert accountant.epsilon(DELTA) == pytest.approx(506.3, abs=0.2)


# -- history and composition -----------------------------------------------------------------------


def test_empty_history_spends_nothing():
    for backend in accounting.available_backends():
        accountant = PrivacyAccountant(backend)
        assert accountant.epsilon(DELTA) == 0.0
        assert accountant.epsilon_bounds(DELTA) == (0.0, 0.0, 0.0)
        assert accountant.delta(1.0) == 0.0
        assert accountant.total_steps == 0 and accountant.history == []


def test_single_steps_merge_into_one_entry():
    accountant = PrivacyAccountant()
    for _ in range(100_000):
        accountant.step(noise_multiplier=SIGMA, sample_rate=Q, steps=1)
    assert accountant.history == [HistoryEntry(SIGMA, Q, 100_000)]
    assert accountant.total_steps == 100_000
    one_entry = PrivacyAccountant()
    one_entry.step(SIGMA, Q, steps=100_000)
    assert accountant.state_dict() == one_entry.state_dict()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.8, 1.1]), st.sampled_from([0.01, 0.02]), st.integers(0, 5)),
                max_size=30))
def test_history_merges_consecutive_entries_only(steps):
    accountant = PrivacyAccountant()
    for sigma, q, n in steps:
        accountant.step(sigma, q, n)
    history = accountant.history
    assert accountant.total_steps == sum(n for *_, n in steps)
    assert all(entry.steps > 0 for entry in history)
    assert all(a.mechanism != b.mechanism for a, b in zip(history, history[1:], strict=False))
    expanded = [(s, q) for s, q, n in steps for _ in range(n)]
    assert [(e.noise_multiplier, e.sample_rate) for e in history for _ in range(e.steps)] == expanded


PHASES = [(1.1, 0.01, 300), (2.0, 0.02, 200)]


def two_phase(backend: str, phases=PHASES) -> PrivacyAccountant:
    accountant = PrivacyAccountant(backend)
    for sigma, q, n in phases:
        accountant.step(sigma, q, n)
    return accountant


def test_two_phase_prv_equals_prv_accountant_by_hand():
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for s, q, _ in PHASES]
    by_hand = PRVAccountant(prvs=prvs, max_self_compositions=[n for *_, n in PHASES], eps_error=0.01,
                            delta_error=DELTA / 1000).compute_epsilon(DELTA, [n for *_, n in PHASES])
    accountant = two_phase("prv")
    assert accountant.epsilon_bounds(DELTA) == pytest.approx(by_hand, rel=1e-12)
    # composition is exact, not the last phase extended to the whole run
    assert abs(two_phase("prv", [(2.0, 0.02, 500)]).epsilon(DELTA) - accountant.epsilon(DELTA)) > 0.05


@pytest.mark.parametrize("sigma, q, steps", [(1.35, 512 / 1437, 3), (0.6, 0.36, 30), (SIGMA, Q, T), (5.0, 0.5, 20),
                                           (0.3, 0.1, 1000)])
def test_prv_truncation_bound_and_epsilon_match_the_library_s_own(sigma, q, steps):
    """The PRV grid's truncation bound L (Remark 5.6 at ``guess.ORDERS``, 73 orders) against prv_accountant's own
    (its 150 orders), and the ε bounds with it against ``PRVAccountant`` left to size its grid itself."""
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
    from prv_accountant.accountant import compute_safe_domain_size

    from accounting.guess import safe_half_width
    from accounting.history import Composition, HistoryEntry

    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)]
    composition = Composition.of([HistoryEntry(sigma, q, steps)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        library = compute_safe_domain_size(prvs, [steps], eps_error=0.01, delta_error=DELTA / 1000)
    assert safe_half_width(composition, 0.01, DELTA / 1000) == pytest.approx(library, rel=0.01)
    if sigma < 0.5:
        return  # ε ≈ 506: prv-accountant's own numerics fail there (test_large_epsilon_falls_back_to_opacus)
    accountant = PrivacyAccountant("prv")
    accountant.step(sigma, q, steps)
    by_hand = PRVAccountant(prvs=prvs, max_self_compositions=[steps], eps_error=0.01,
                            delta_error=DELTA / 1000).compute_epsilon(DELTA, [steps])
    assert accountant.epsilon_bounds(DELTA) == pytest.approx(by_hand, rel=1e-6)  # eps_error is 0.01


def test_composition_ignores_order_and_splits():
    expected = two_phase("rdp").epsilon(DELTA)
    assert two_phase("rdp", PHASES[::-1]).epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    split = [(1.1, 0.01, 100), (2.0, 0.02, 200), (1.1, 0.01, 200)]
    assert two_phase("rdp", split).epsilon(DELTA) == pytest.approx(expected, rel=1e-12)
    for sigma, q, _ in PHASES:  # neither phase alone stands for the run
        assert abs(two_phase("rdp", [(sigma, q, 500)]).epsilon(DELTA) - expected) > 0.02


def test_two_phase_rdp_equals_opacus_by_hand():
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=orders) for s, q, n in PHASES)
    by_hand, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)
    assert two_phase("rdp").epsilon(DELTA) == pytest.approx(by_hand, rel=1e-12)


def test_two_phase_pld_equals_dp_accounting_by_hand():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import PLDAccountant

    by_hand = PLDAccountant()
    for sigma, q, n in PHASES:
        by_hand.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
    assert two_phase("pld").epsilon(DELTA) == pytest.approx(by_hand.get_epsilon(DELTA), rel=1e-9)


def test_epsilon_curve_matches_prefix_accountants():
    accountant = two_phase("prv")
    curve = accountant.epsilon_curve(DELTA, [0, 150, 400, 500])
    assert curve[0].upper == 0.0
    assert curve[-1].upper == pytest.approx(accountant.epsilon(DELTA), abs=1e-9)
    prefix = two_phase("prv", [(1.1, 0.01, 300), (2.0, 0.02, 100)])  # first 400 steps
    assert curve[2].upper == pytest.approx(prefix.epsilon(DELTA), abs=1e-3)  # same maths, grid sized for 500
    assert [r.upper for r in curve] == sorted(r.upper for r in curve)


# -- persistence -----------------------------------------------------------------------------------


def test_state_dict_round_trips_exactly():
    accountant = PrivacyAccountant("prv", eps_error=0.05)
    accountant.step(SIGMA, Q, 10)
    accountant.step(0.7, 0.003, 5)
    accountant.step(SIGMA, Q, 1)
    state = json.loads(json.dumps(accountant.state_dict()))
    assert state == accountant.state_dict()
    restored = PrivacyAccountant("rdp")
    restored.load_state_dict(state)
    assert restored.state_dict() == accountant.state_dict()
    assert restored.backend == accountant.backend and restored.history == accountant.history
    assert restored.epsilon(DELTA) == accountant.epsilon(DELTA)
    # re-accounting the same history with another backend
    assert PrivacyAccountant("rdp", history=state["history"]).history == accountant.history
    with pytest.raises(ValueError, match="state"):
        restored.load_state_dict({"history": []})


# -- calibration -----------------------------------------------------------------------------------


def test_calibrate_noise_prv_meets_target_within_tolerance():
    target, q, steps, rtol = 2.0, 0.01, 500, 0.01
    sigma = calibrate_noise(target, DELTA, q, steps=steps, rtol=rtol)
    assert two_phase("prv", [(sigma, q, steps)]).epsilon(DELTA) <= target
    assert two_phase("prv", [(sigma / (1 + rtol), q, steps)]).epsilon(DELTA) > target
    assert calibrate_noise(target, DELTA, q, epochs=5, rtol=rtol) == sigma  # 5 epochs at q = 0.01: 500 steps


def test_calibrate_noise_rdp_inverts_reference():
    sigma = calibrate_noise(1.2813, DELTA, Q, steps=T, backend="rdp")
    assert sigma == pytest.approx(SIGMA, rel=2e-3)
    assert two_phase("rdp", [(sigma, Q, T)]).epsilon(DELTA) <= 1.2813


def test_max_steps_inverts_epsilon():
    sigma, q, target = 1.0, 0.01, 1.5
    k = max_steps(sigma, q, target, DELTA)
    assert 0 < k < accounting.MAX_STEPS
    assert two_phase("prv", [(sigma, q, k)]).epsilon(DELTA) <= target
    assert two_phase("prv", [(sigma, q, k + 1)]).epsilon(DELTA) > target
    k_rdp = max_steps(sigma, q, target, DELTA, backend="rdp")
    assert k_rdp < k  # RDP is looser
    epochs = max_epochs(sigma, q, target, DELTA, backend="rdp")
    assert steps_for_epochs(epochs, q) <= k_rdp < steps_for_epochs(epochs + 1, q)


def test_noise_calibrated_for_t_steps_allows_exactly_t_steps():
    # Regression: at q = 8192/54000 the step search (on its bracket's PRV grid) said 419 where epsilon() of the
    # calibrated history says 420 fit: make_private_with_epsilon(max_epsilon=...) then stopped one step early.
    q, steps, target = 8192 / 54000, 420, 3.0
    sigma = calibrate_noise(target, DELTA, q, steps=steps)
    assert PrivacyAccountant("prv", history=[(sigma, q, steps)]).epsilon(DELTA) <= target
    allowed = PrivacyAccountant("prv").max_additional_steps(sigma, q, target, DELTA)
    assert allowed >= steps
    assert PrivacyAccountant("prv", history=[(sigma, q, allowed + 1)]).epsilon(DELTA) > target


def test_max_additional_steps_accounts_for_the_history():
    sigma, q, target = 1.0, 0.01, 1.5
    total = max_steps(sigma, q, target, DELTA, backend="rdp")
    accountant = two_phase("rdp", [(sigma, q, 200)])
    assert accountant.max_additional_steps(sigma, q, target, DELTA) == total - 200
    assert accountant.max_additional_steps(sigma, q, target, DELTA, limit=50) == 50
    assert accountant.max_additional_steps(sigma, q, 0.1, DELTA) == 0  # already over budget
    other = accountant.max_additional_steps(2.0, 0.02, target, DELTA)  # a different mechanism next
    after = two_phase("rdp", [(sigma, q, 200), (2.0, 0.02, other)])
    assert after.epsilon(DELTA) <= target < two_phase("rdp", [(sigma, q, 200), (2.0, 0.02, other + 1)]).epsilon(DELTA)


def test_steps_for_epochs():
    assert steps_for_epochs(15, Q) == T
    assert steps_for_epochs(3, 0.03) == 100  # 3 / 0.03 = 100.00000000000001 in floats


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda a: a.step(0.0, 0.01), "noise_multiplier"),
    (lambda a: a.step(-1.0, 0.01), "noise_multiplier"),
    (lambda a: a.step(math.inf, 0.01), "noise_multiplier"),
    (lambda a: a.step(1.0, 0.0), r"sample_rate must be in \(0, 1\]"),
    (lambda a: a.step(1.0, 1.5), "sample_rate"),
    (lambda a: a.step(1.0, 0.01, -1), "steps must be an integer >= 0"),
    (lambda a: a.step(1.0, 0.01, 1.5), "steps"),
    (lambda a: a.epsilon(0.0), r"delta must be in \(0, 1\)"),
    (lambda a: a.epsilon(1.0), "delta"),
    (lambda a: a.delta(-1.0), "epsilon"),
    (lambda a: a.max_additional_steps(1.0, 0.01, 1.0, 2.0), "delta"),
    (lambda a: PrivacyAccountant("moments"), "backend must be one of"),
    (lambda a: PrivacyAccountant("prv", eps_error=-0.1), "eps_error"),
    (lambda a: PrivacyAccountant("prv", bogus=1), "bad options"),
    (lambda a: calibrate_noise(0.0, DELTA, 0.01, steps=100), "target_epsilon"),
    (lambda a: calibrate_noise(1.0, DELTA, 0.01), "exactly one of steps or epochs"),
    (lambda a: calibrate_noise(1.0, DELTA, 0.01, steps=0), "steps must be an integer >= 1"),
    (lambda a: calibrate_noise(1.0, DELTA, 1.0, steps=10**6, backend="rdp"), "not reachable"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(PrivacyAccountant())


def test_absurd_prv_grid_is_refused_not_allocated():
    accountant = PrivacyAccountant("prv", eps_error=1e-4)
    accountant.step(1.0, 0.01, 10**6)
    with pytest.raises(AccountingError, match="grid"):
        accountant.epsilon(DELTA)


# -- report ----------------------------------------------------------------------------------------


def test_budget_report(tmp_path):
    accountant = two_phase("prv", [(1.1, 0.01, 300), (2.0, 0.01, 250)])  # 10.5 epochs of 52.5 steps
    report = BudgetReport(accountant, DELTA, steps_per_epoch=52.5, target_epsilon=3.0)
    assert [row.epoch for row in report.rows] == [*range(1, 11), 10.4762]
    assert [row.steps for row in report.rows] == [53, 105, 158, 210, 263, 315, 368, 420, 473, 525, 550]
    assert report.epsilon == pytest.approx(accountant.epsilon(DELTA), abs=1e-9)
    text = report.to_text()
    assert "target ε = 3" in text and len(text.splitlines()) == 3 + len(report.rows)
    data = json.loads(report.to_json())
    assert data["epsilon"] == report.epsilon and data["history"] == [[1.1, 0.01, 300], [2.0, 0.01, 250]]
    assert [row["steps"] for row in data["epochs"]] == [row.steps for row in report.rows]
    png = report.plot(tmp_path / "budget.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- CLI -------------------------------------------------------------------------------------------


def budget(*argv: str, capsys) -> tuple[int, str, str]:
    code = lipdp_main(["budget", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_json_reference_all_backends():
    result = run_module("--noise-multiplier", "1.1", "--sample-rate", "0.0042667", "--steps", "3516",
                        "--delta", "1e-5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out["epsilon"]) == set(accounting.available_backends())
    assert out["epsilon"]["prv"] == pytest.approx(1.144, abs=2e-3)
    assert out["epsilon"]["rdp"] == pytest.approx(1.281, abs=1e-3)
    if HAS_PLD:
        assert out["epsilon"]["pld"] == pytest.approx(1.134, abs=2e-3)


def test_cli_help_explains_every_flag():
    result = run_module("--help")
    assert result.returncode == 0
    for flag in ["--noise-multiplier", "--target-epsilon", "--sample-rate", "--batch-size", "--dataset-size",
                 "--steps", "--epochs", "--delta", "--backend", "--json"]:
        assert flag in result.stdout


def test_cli_bad_input_prints_one_line_and_fails():
    result = run_module("--noise-multiplier", "0", "--sample-rate", "0.01", "--steps", "10")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "--noise-multiplier" in result.stderr


def test_missing_pld_extra_is_skipped_cleanly(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # as if the optional extra were not installed
    assert "pld" not in accounting.available_backends()
    with pytest.raises(accounting.BackendUnavailable, match=r"lipdp\[pld\]"):
        PrivacyAccountant("pld")
    code, out, _ = budget("--noise-multiplier", "2", "--sample-rate", "0.01", "--steps", "100", "--json",
                          capsys=capsys)
    data = json.loads(out)
    assert code == 0 and set(data["epsilon"]) == {"prv", "rdp"} and "pld" in data["skipped"]
    code, _, err = budget("--noise-multiplier", "2", "--sample-rate", "0.01", "--steps", "100", "--backend", "pld",
                          capsys=capsys)
    assert code == 2 and "lipdp[pld]" in err and err.count("\n") == 1


def test_run_budget_table_and_calibration(capsys):
    code, out, _ = budget("--noise-multiplier", "1.1", "--batch-size", "256", "--dataset-size", "60000",
                          "--epochs", "15", "--backend", "rdp", capsys=capsys)
    assert code == 0 and "T = 3516 steps" in out and "1.2813" in out
    code, out, _ = budget("--target-epsilon", "1.2813", "--sample-rate", str(Q), "--steps", "3516",
                          "--backend", "rdp", "--json", capsys=capsys)
    data = json.loads(out)
    assert code == 0 and data["noise_multiplier"]["rdp"] == pytest.approx(1.1, rel=2e-3)
    assert data["epsilon"]["rdp"] <= 1.2813
    for argv, match in [(["--batch-size", "10", "--steps", "3"], "--dataset-size"),
                        (["--sample-rate", "2", "--steps", "3"], "--sample-rate"),
                        (["--sample-rate", "0.1", "--steps", "-3"], "--steps"),
                        (["--sample-rate", "0.1", "--steps", "3", "--delta", "1"], "--delta")]:
        code, out, err = budget("--noise-multiplier", "1", *argv, capsys=capsys)
        assert code == 2 and out == "" and match in err and err.count("\n") == 1
