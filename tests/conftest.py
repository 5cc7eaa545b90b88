"""Session hooks: the tightness table of the soundness suite (observed max / claimed bound per layer kind)."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.soundness_utils import tightness_table

    table = tightness_table()
    if table:
        terminalreporter.section("lipdp bound tightness (observed max / certified bound)")
        terminalreporter.write_line(table)
