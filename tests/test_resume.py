"""Crash-safe resume: SIGKILL mid-epoch, resume from the last checkpoint, epsilon counts every step ever taken.

Steps taken after the last checkpoint are *counted* (write-ahead journal, ``lipdp.journal``), never replayed,
and the resumed run draws fresh randomness. Checkpoints are atomic: a kill mid-write leaves the old one whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from accounting import PrivacyAccountant
from lipdp.journal import StepJournal, journal_path

ROOT = Path(__file__).resolve().parents[1]
SIGMA, RATE, DELTA = 1.0, 16 / 256, 1e-5

TRAINER = textwrap.dedent("""
    import io, json, sys, time
    from pathlib import Path
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from lipdp import LipDPEngine
    from lipdp.journal import journal_path
    from lipdp.losses import LipschitzCrossEntropy
    from lipdp.models import orthogonal_mlp

    mode, ckpt, extra_steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    x = torch.randn(256, 8); x = x / x.norm(dim=1, keepdim=True); y = torch.randint(0, 3, (256,))
    model = orthogonal_mlp(8, 3, hidden=(16,))
    engine = LipDPEngine(accountant="prv", seed=7)
    criterion = LipschitzCrossEntropy()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.Adam(model.parameters(), 1e-2),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=16), criterion=criterion,
        noise_multiplier=1.0, input_norm_bound=1.0)
    if ckpt.exists():
        engine.load_checkpoint(ckpt)
    counted = engine.attach_journal(journal_path(ckpt))
    print(json.dumps({"steps": engine.accountant.total_steps, "counted": counted, "seed": engine.seed}), flush=True)

    real_save = torch.save
    def torn_save(state, file):  # writes half of the checkpoint, then hangs: the parent kills us mid-write
        buffer = io.BytesIO(); real_save(state, buffer); data = buffer.getvalue()
        file.write(data[:len(data) // 2]); file.flush()
        print("mid-write", flush=True); time.sleep(120)

    taken = 0
    while True:
        for xb, yb in loader:
            optimizer.zero_grad(); criterion(model(xb), yb).backward(); optimizer.step()
            taken += 1
            print(f"step {engine.accountant.total_steps}", flush=True)
            if mode == "finish" and taken == extra_steps:
                print(json.dumps({"steps": engine.accountant.total_steps, "epsilon": engine.get_epsilon(1e-5)}))
                sys.exit(0)
            time.sleep(0.01)
        engine.save_checkpoint(ckpt, steps=engine.accountant.total_steps)
        print("checkpoint", flush=True)
        if mode == "torn":
            torch.save = torn_save  # the next checkpoint is killed half-written
""")


def launch(mode: str, ckpt: Path, extra_steps: int = 0) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", TRAINER, mode, str(ckpt), str(extra_steps)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, done) -> list[str]:
    """Lines of ``proc``'s stdout up to the first for which ``done(line)`` holds."""
    lines = []
    while True:
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise AssertionError(f"trainer exited ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        lines.append(line.strip())
        if done(line.strip()):
            return lines


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def checkpoint_steps(ckpt: Path) -> int:
    state = torch.load(ckpt, weights_only=False)
    return PrivacyAccountant(state["accountant"]["backend"], history=state["accountant"]["history"]).total_steps


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_counts_every_step_ever_taken(tmp_path):
    ckpt = tmp_path / "run.pt"
    trainer = launch("train", ckpt)
    try:
        lines = read_until(trainer, lambda line: line == "step 24")  # epoch 2 of 16 steps, checkpoint at 16
    finally:
        kill(trainer)
    printed = max(int(line.split()[1]) for line in lines if line.startswith("step"))
    saved = checkpoint_steps(ckpt)
    journaled = StepJournal(journal_path(ckpt), writable=False).last_step
    assert saved == 16 and printed >= 24
    assert journaled >= printed  # write-ahead: every released step is on disk (at most one more, never fewer)

    resumed = launch("finish", ckpt, extra_steps=5)
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-3000:]
    start, *_, final = (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    assert start["counted"] == journaled - saved > 0  # the steps after the checkpoint are counted
    assert start["seed"] != 7  # ... and not replayed: fresh randomness after lost steps
    assert final["steps"] == journaled + 5
    expected = PrivacyAccountant("prv", history=[(SIGMA, RATE, journaled + 5)]).epsilon(DELTA)
    forgetful = PrivacyAccountant("prv", history=[(SIGMA, RATE, saved + 5)]).epsilon(DELTA)
    assert final["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert final["epsilon"] > forgetful


@pytest.mark.slow
def test_checkpoint_killed_mid_write_leaves_the_previous_one_whole(tmp_path):
    ckpt = tmp_path / "run.pt"
    trainer = launch("torn", ckpt)
    try:
        read_until(trainer, lambda line: line == "mid-write")  # first checkpoint whole, second half-written
    finally:
        kill(trainer)
    leftovers = [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    assert len(leftovers) == 1
    with pytest.raises(Exception):
        torch.load(leftovers[0], weights_only=False)  # truly half a checkpoint
    state = torch.load(ckpt, weights_only=False)  # ... but the checkpoint itself is the previous, whole one
    assert state["extra"] == {"steps": 16} and checkpoint_steps(ckpt) == 16
    assert StepJournal(journal_path(ckpt), writable=False).last_step == 32


def test_journal_drops_a_torn_last_line_and_refuses_gaps(tmp_path):
    path = tmp_path / "j"
    journal = StepJournal(path, fsync=False)
    for step in (1, 2, 3):
        journal.append(step, 1.5, 0.01)
    journal.close()
    with open(path, "ab") as file:
        file.write(b"4 1.5")  # a power cut mid-line: that step was not released yet
    reopened = StepJournal(path)
    assert reopened.last_step == 3 and path.read_bytes().endswith(b"\n")
    reopened.append(4, 1.5, 0.01)
    assert [e.step for e in StepJournal(path, writable=False).entries] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="unaccounted"):
        StepJournal(path, writable=False).entries_after(-2)
    path.write_text("1 1.5 0.01\n3 1.5 0.01\n")
    with pytest.raises(ValueError, match="consecutive"):
        StepJournal(path, writable=False)


def test_journal_counts_lost_steps_in_process_and_reseeds(tmp_path):
    from tests.test_engine import private_setup

    engine, model, optimizer, loader, criterion = private_setup(lr=0.1)
    ckpt = tmp_path / "c.pt"
    engine.attach_journal(journal_path(ckpt), fsync=False)
    engine.save_checkpoint(ckpt)
    for x, y in loader:  # 4 steps after the checkpoint, then "crash"
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
    fresh, *_ = private_setup(lr=0.1)
    fresh.load_checkpoint(ckpt)
    assert fresh.accountant.total_steps == 0
    assert fresh.attach_journal(journal_path(ckpt)) == 4
    assert fresh.accountant.total_steps == 4 and fresh.seed != engine.seed
    assert fresh.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
