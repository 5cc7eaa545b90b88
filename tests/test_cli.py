"""The command line as a user meets it: one-line errors with exit status 2, fast start, the layering of the code."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lipdp.cli.errors import UserError, one_line

REPO = Path(__file__).resolve().parents[1]
ONE_LINE_ERROR = re.compile(r"^(?P<prog>[\w .-]+): error: (?P<what>.+) \(fix: (?P<fix>.+)\)$")


def run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGV`` in a fresh interpreter from the repository root."""
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def run_in_process(module: str, *argv: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGV`` as its ``main(argv)`` in this interpreter (no fresh ~6 s of imports): its exit
    status, stdout and stderr. The ``python -m`` entry points themselves are run for real in
    ``test_an_unknown_data_set_is_one_line_and_exit_2``."""
    main = importlib.import_module(module).main
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(list(argv))
        except SystemExit as exit_:  # argparse's parse errors and --help
            status = exit_.code
    return subprocess.CompletedProcess([module, *argv], status, stdout.getvalue(), stderr.getvalue())


def assert_one_line_user_error(result: subprocess.CompletedProcess, prog: str, *words: str) -> None:
    """Exit status 2, nothing on stdout after the error, exactly one line on stderr: PROG: error: WHAT (fix: HOW)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    match = ONE_LINE_ERROR.match(lines[0])
    assert match and match["prog"] == prog, lines[0]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize("command, prog", [
    (["-m", "recipes.classify"], "python -m recipes.classify"),
    (["-m", "recipes.conformal"], "python -m recipes.conformal"),
    (["-m", "recipes.one_class"], "python -m recipes.one_class"),
    (["-m", "lipdp.cli", "train"], "lipdp train"),
])
def test_an_unknown_data_set_is_one_line_and_exit_2(command, prog):
    assert_one_line_user_error(run(*command, "--dataset", "no-such-set"), prog, "no-such-set", "digits")


def test_an_impossible_class_is_one_line():
    result = run_in_process("recipes.one_class", "--normal-class", "12")
    assert_one_line_user_error(result, "python -m recipes.one_class", "--normal-class 12", "between 0 and 1")


def test_parse_errors_are_one_line_and_name_help():
    assert_one_line_user_error(run_in_process("lipdp.cli", "trian"), "lipdp", "invalid choice", "--help")
    assert_one_line_user_error(run_in_process("lipdp.cli", "train", "--epochs", "x"), "lipdp train", "--epochs")
    assert_one_line_user_error(run_in_process("recipes.classify", "--head", "mlp"), "python -m recipes.classify",
                               "--head")


def test_clipping_without_its_norm_is_one_line():
    result = run_in_process("lipdp.cli", "train", "--mechanism", "clipping", "--epochs", "1")
    assert_one_line_user_error(result, "lipdp train", "clipping", "--max-grad-norm")


def test_the_cli_s_choices_are_the_library_s():
    """The CLI repeats a few choice lists so that --help needs no torch; they must stay the library's."""
    from lipdp.cli import train
    from lipdp.clipping import MECHANISMS
    from lipdp.models import NETWORK_KINDS
    from lipdp.noise import NOISE_STRATEGIES
    from lipdp.training import OPTIMIZERS

    assert (train.MECHANISMS, train.NOISE_STRATEGIES, train.OPTIMIZERS, train.MODELS) == (
        MECHANISMS, NOISE_STRATEGIES, OPTIMIZERS, NETWORK_KINDS)


def test_budget_errors_are_one_line():
    result = run_in_process("lipdp.cli", "budget", "--noise-multiplier", "-1", "--sample-rate", "0.1", "--steps", "3")
    assert_one_line_user_error(result, "lipdp budget", "--noise-multiplier")


def test_help_and_budget_start_without_torch():
    """``lipdp --help`` and ``lipdp budget --help`` import neither torch nor opacus (the 0.5 s start-up budget is
    measured by the import set, not by a timer: a timed unit test would be flaky)."""
    code = ("import sys\nfrom lipdp.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'opacus', 'orthogonium', 'matplotlib') if m in sys.modules))")
    result = run("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    help_text = run("-m", "lipdp.cli", "--help").stdout
    for command in ("train", "budget", "bounds", "demo", "audit"):
        assert command in help_text


def test_library_never_imports_recipes_or_benchmarks():
    pattern = re.compile(r"^\s*(from|import)\s+(recipes|benchmarks)\b", re.MULTILINE)
    offenders = [str(path.relative_to(REPO)) for folder in ("lipdp", "accounting")
                 for path in (REPO / folder).rglob("*.py") if pattern.search(path.read_text())]
    assert offenders == []


def test_accounting_never_imports_torch_or_lipdp():
    pattern = re.compile(r"^\s*(from|import)\s+(torch|lipdp)\b", re.MULTILINE)
    offenders = [str(path.relative_to(REPO)) for path in (REPO / "accounting").rglob("*.py")
                 if pattern.search(path.read_text())]
    assert offenders == []


def test_one_line_keeps_a_message_s_own_fix_and_collapses_lines():
    assert one_line(ValueError("bad thing.\n  more. Fix: do this."), "default") == "bad thing. more (fix: do this)"
    assert one_line(ValueError("no fix here"), "see --help") == "no fix here (fix: see --help)"
    assert one_line(UserError("what went wrong.", "how to fix it"), "unused") == "what went wrong (fix: how to fix it)"


@pytest.mark.slow
def test_conformal_runs_on_digits_with_its_defaults():
    """Its calibration size is a fraction of the training split: the defaults fit a 1,437-image data set."""
    result = run_in_process("recipes.conformal", "--dataset", "digits", "--epochs", "1", "--test-size", "100",
                            "--attack-steps", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "'calibration': 287" in result.stdout


def _module_level_imports(path: Path, package_root: Path) -> set[str]:
    """The project modules ``path`` imports at module level (imports inside functions are lazy: not counted)."""
    import ast

    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.split(".")[0] in ("lipdp", "accounting", "recipes", "benchmarks")}


def test_no_import_cycles_between_modules():
    modules = {}
    for folder in ("lipdp", "accounting", "recipes", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {name: {m for m in _module_level_imports(path, REPO) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle of concepts: drop parent -> child edges
    graph = {name: {m for m in targets if not m.startswith(name + ".")} for name, targets in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        if node in done:
            return
        if node in visiting:
            cycles.append(trail[trail.index(node):] + [node])
            return
        visiting.add(node)
        for target in sorted(graph[node]):
            visit(target, trail + [node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []


def test_bounds_prints_the_table_of_lipdp_trains_network(capsys):
    """``lipdp bounds``: the preset's network (digits: the orthogonal MLP at X0 = 1); --input-norm-bound scales the
    bound of the first layer's weight with X0."""
    from lipdp.cli import main

    tables = []
    for bound in ("1", "4"):
        assert main(["bounds", "--dataset", "digits", "--input-norm-bound", bound]) == 0
        tables.append(capsys.readouterr().out)

    def first_weight_bound(table: str) -> float:
        rows = [line.split() for line in table.splitlines() if line.split()[:1] and line.split()[0].endswith(".weight")]
        return float(rows[0][-1])

    # the first layer's weight gradient is delta x^T, its bound sqrt(2) * X0
    assert first_weight_bound(tables[0]) == pytest.approx(2 ** 0.5, rel=1e-4)
    assert first_weight_bound(tables[1]) == pytest.approx(4 * 2 ** 0.5, rel=1e-4)


def test_train_with_one_seed_gives_the_same_run_twice(tmp_path):
    """--seed fixes the split, the sampling, the noise and the model's initial weights: two runs in one process (the
    global generator moved on between them) report the same accuracy."""
    from lipdp.cli import main

    results = []
    for run_index in range(2):
        torch.rand(run_index + 1)  # another state of the global generator before each run
        out = tmp_path / f"run{run_index}.json"
        assert main(["train", "--dataset", "digits", "--epochs", "2", "--validation", "0.2", "--seed", "3",
                     "--no-progress", "--json", str(out)]) == 0
        results.append(json.loads(out.read_text())["test_accuracy"])
    assert results[0] == results[1]
