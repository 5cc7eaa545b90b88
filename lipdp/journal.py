"""Write-ahead step journal: the accountant never forgets a step, even after a SIGKILL (docs/design.md §3).

A checkpoint holds the accountant's history up to the step it was saved at; a crash loses the steps taken
after it. Those steps were released (their noisy gradients updated the in-memory model, and anything
printed or logged since depends on them), so they must be **counted**. They are not *replayed*: re-running
them from the checkpoint with the same generator states would draw the same noise on a possibly different
gradient (floating-point non-determinism), and re-using noise or a Poisson sample is not covered by the
accounting. Resuming therefore (1) adds every journaled step beyond the checkpoint to the accountant and
(2) re-seeds the sampling and noise generators (``fresh_seed``), so the resumed run's
randomness is independent of the lost steps'.

Format: one text line per noisy step, ``"<n> <sigma> <q>\\n"``, n = the accountant's total number of steps
once this step is counted (1, 2, ...; a journal attached mid-run starts at the current count + 1), sigma
and q as ``repr`` floats (exact round trip). The mechanism appends the line, then fsyncs it, *before* it adds
noise and touches any gradient (write-ahead): a step on disk may not have been released (a crash between the
two over-counts by one step, which is conservative), but no released step is ever missing. One ``write``
of a complete line is never torn by a killed process; a torn last line (power loss) belongs to a step that
was not released yet, and is dropped and truncated when the journal is reopened.

Each checkpoint compacts the journal (``StepJournal.compact``): the steps the checkpoint holds are dropped from it, so
the journal only ever holds the steps since the last checkpoint (it is rewritten atomically, ``lipdp.atomic``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from accounting import PrivacyAccountant
from lipdp.atomic import atomic_write
from lipdp.sampling import random_seed

logger = logging.getLogger(__name__)

__all__ = ["JournalEntry", "StepJournal", "count_journaled_steps", "fresh_seed", "journal_path"]


def journal_path(checkpoint: str | os.PathLike) -> Path:
    """The journal that belongs next to a checkpoint file: ``<checkpoint>.journal``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".journal")


@dataclass(frozen=True)
class JournalEntry:
    """One journaled noisy step: the accountant's step count once it is counted, its sigma and its q."""

    step: int
    noise_multiplier: float
    sample_rate: float


class StepJournal:
    """Append-only journal of noisy steps at ``path`` (created if missing).

    ``fsync=True`` (default) makes each line durable before the step is released (survives power loss);
    ``fsync=False`` only survives a killed process (the line is in the OS page cache), and is cheaper.
    ``writable=False`` opens for reading only (non-main ranks of a distributed run).
    """

    def __init__(self, path: str | os.PathLike, fsync: bool = True, writable: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.entries: list[JournalEntry] = self._read()
        self._fd: int | None = None
        if writable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _read(self) -> list[JournalEntry]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            logger.warning("journal %s: dropping a torn last line (a step that was never released)", self.path)
            with open(self.path, "r+b") as file:
                file.truncate(complete)
                os.fsync(file.fileno())
        entries: list[JournalEntry] = []
        for number, line in enumerate(data[:complete].decode("ascii").splitlines(), start=1):
            try:
                step, sigma, rate = line.split()
                entry = JournalEntry(int(step), float(sigma), float(rate))
            except ValueError as error:
                raise ValueError(f"journal {self.path} line {number} is corrupt ({line!r}); it cannot prove "
                                 "which steps were taken. Fix: restore the file, or start a new run.") from error
            if entries and entry.step != entries[-1].step + 1:
                raise ValueError(f"journal {self.path} line {number}: step {entry.step} follows step "
                                 f"{entries[-1].step}; steps must be consecutive. Fix: one journal per run.")
            entries.append(entry)
        return entries

    @property
    def last_step(self) -> int:
        """Total steps counted once the last journaled step is (0 for an empty journal)."""
        return self.entries[-1].step if self.entries else 0

    def entries_after(self, step: int) -> list[JournalEntry]:
        """The journaled steps numbered above ``step`` (steps the accountant at ``step`` has not counted)."""
        if self.entries and self.entries[0].step > step + 1:
            raise ValueError(
                f"journal {self.path} starts at step {self.entries[0].step} but the accountant has only "
                f"{step} steps: steps {step + 1}..{self.entries[0].step - 1} are unaccounted for. Fix: resume "
                "from the checkpoint this journal was written with."
            )
        return [entry for entry in self.entries if entry.step > step]

    def append(self, step: int, noise_multiplier: float, sample_rate: float) -> None:
        """Record step ``step`` durably; called before the step's noise is drawn."""
        if self._fd is None:
            raise RuntimeError(f"journal {self.path} was opened read-only")
        if self.entries and step != self.last_step + 1:
            raise RuntimeError(f"journal {self.path}: step {step} does not follow step {self.last_step}")
        os.write(self._fd, f"{step} {noise_multiplier!r} {sample_rate!r}\n".encode("ascii"))
        if self.fsync:
            os.fsync(self._fd)
        self.entries.append(JournalEntry(step, noise_multiplier, sample_rate))

    def compact(self, through_step: int) -> None:
        """Drop the entries up to ``through_step`` (a checkpoint now holds them), rewriting the file atomically."""
        kept = [entry for entry in self.entries if entry.step > through_step]
        if len(kept) == len(self.entries):
            return
        text = "".join(f"{e.step} {e.noise_multiplier!r} {e.sample_rate!r}\n" for e in kept).encode("ascii")
        writable = self._fd is not None
        self.close()
        atomic_write(self.path, lambda file: file.write(text))
        self.entries = kept
        if writable:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        """Close the file (appending is impossible afterwards)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def count_journaled_steps(journal: StepJournal, accountant: PrivacyAccountant) -> list[JournalEntry]:
    """Add to ``accountant`` every journaled step it has not counted (taken after its checkpoint); returns them.
    A journal that ends before the accountant's count belongs to another run and is refused."""
    counted = accountant.total_steps
    if journal.entries and journal.last_step < counted:
        raise ValueError(
            f"journal {journal.path} ends at step {journal.last_step} but the accountant has {counted} steps: "
            "it is not this run's journal. Fix: attach the journal written next to this checkpoint."
        )
    missing = journal.entries_after(counted)
    for entry in missing:
        accountant.step(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate)
    if missing:
        logger.warning("counted %d step(s) taken after the checkpoint (journal %s); now %d steps in total",
                       len(missing), journal.path, accountant.total_steps)
    return missing


def fresh_seed(seed: int, steps: int, secure: bool) -> int:
    """The seed of the randomness after counted-but-lost steps, so no batch or noise draw of theirs is re-used:
    from ``os.urandom`` in secure mode, else derived from (seed, steps counted) to stay reproducible."""
    if secure:
        return random_seed()
    digest = hashlib.sha256(f"{seed}:{steps}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
