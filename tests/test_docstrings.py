"""Every public class, function and method in lipdp/ and accounting/ has a docstring (checked with ast, nothing imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lipdp", "accounting")

_FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)
# Statements whose bodies are still module (or class) level: `if TYPE_CHECKING:`, `try: ... except ImportError:`.
_BLOCKS = (ast.If, ast.Try, ast.With) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())


def _decorator_name(node: ast.expr) -> str:
    """The dotted name of a decorator, without call arguments (`@a.b(...)` -> "a.b")."""
    if isinstance(node, ast.Call):
        node = node.func
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _skipped(node: ast.AST) -> bool:
    """True for definitions exempt from the rule: `@overload` stubs and `@<prop>.setter` methods."""
    for dec in getattr(node, "decorator_list", ()):
        name = _decorator_name(dec)
        if name.split(".")[-1] == "overload" or name.endswith(".setter"):
            return True
    return False


def _statements(body: list[ast.stmt]):
    """The statements of a module or class body, descending into if/try/with blocks but not into definitions."""
    for stmt in body:
        if isinstance(stmt, _BLOCKS):
            for field in ("body", "orelse", "finalbody"):
                yield from _statements(getattr(stmt, field, []))
            for handler in getattr(stmt, "handlers", []):
                yield from _statements(handler.body)
        else:
            yield stmt


def public_definitions(path: Path):
    """Yield (line, qualified name, has_docstring) for each public definition in the file at `path`.

    Covered: module-level functions and classes, and the methods of public classes (recursively for
    public classes nested in public classes). Names starting with `_` (dunders included), functions
    nested in functions, `@overload` stubs and property setters are skipped.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(body, prefix):
        for node in _statements(body):
            if not isinstance(node, _FUNCS + (ast.ClassDef,)):
                continue
            if node.name.startswith("_") or _skipped(node):
                continue
            name = prefix + node.name
            yield node.lineno, name, ast.get_docstring(node) is not None
            if isinstance(node, ast.ClassDef):
                yield from walk(node.body, name + ".")

    yield from walk(tree.body, "")


def _source_files():
    """Every .py file under the checked packages, sorted."""
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def docstring_census():
    """(number of public definitions, list of "path:line name" for those without a docstring)."""
    total, missing = 0, []
    for path in _source_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, name, documented in public_definitions(path):
            total += 1
            if not documented:
                missing.append(f"{rel}:{line} {name}")
    return total, missing


def report_counts() -> tuple[int, list[str]]:
    """Print (and return) the census: how many public definitions there are, how many lack a docstring, which."""
    total, missing = docstring_census()
    print(f"public definitions: {total}, without docstring: {len(missing)}")
    for offender in missing:
        print(offender)
    return total, missing


def test_public_definitions_have_docstrings():
    """No public class, function or method under lipdp/ or accounting/ lacks a docstring."""
    total, missing = report_counts()
    assert not missing, f"{len(missing)} of {total} public definitions lack a docstring:\n" + "\n".join(missing)


if __name__ == "__main__":
    report_counts()
