"""The design document ships with the code, and every reference to it points to a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
REFERENCE = re.compile(r"docs/design\.md §(\d+)")


def test_every_reference_to_the_design_doc_names_an_existing_section():
    sections = set(re.findall(r"^## §(\d+) ", DESIGN.read_text(), flags=re.MULTILINE))
    assert sections >= {str(n) for n in range(1, 10)}
    cited = {}
    for path in [*REPO.glob("lipdp/**/*.py"), *REPO.glob("accounting/**/*.py"), *REPO.glob("recipes/*.py"),
                 *REPO.glob("benchmarks/*.py"), *REPO.glob("tests/*.py"), REPO / "README.md",
                 *REPO.glob("scripts/*")]:
        for number in REFERENCE.findall(path.read_text()):
            cited.setdefault(number, []).append(str(path.relative_to(REPO)))
    assert cited, "the code cites the design document"
    missing = {number: paths for number, paths in cited.items() if number not in sections}
    assert missing == {}


def test_no_reference_to_a_design_file_outside_the_repository():
    offenders = [str(path.relative_to(REPO)) for path in [*REPO.glob("lipdp/**/*.py"), *REPO.glob("accounting/**/*.py"),
                                                          *REPO.glob("recipes/*.py"), REPO / "README.md"]
                 if re.search(r"(?<!docs/)DESIGN\.md", path.read_text())]
    assert offenders == []
