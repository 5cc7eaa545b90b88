"""Checkpoints that never run code, leftovers of crashed writes cleaned, the journal compacted at each checkpoint,
and the habits an Opacus user brings (``accountant.get_epsilon``, ``max_grad_norm``, a plain cross-entropy)."""

from __future__ import annotations

import math
import os
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lipdp import LipDPEngine
from lipdp.checkpoint import CheckpointError
from lipdp.journal import journal_path
from lipdp.layers import InputNormClip
from lipdp.losses import LipschitzCrossEntropy


def attach(criterion: nn.Module | None = None, **arguments):
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    x = x / x.norm(dim=1, keepdim=True)
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    engine = LipDPEngine(seed=3)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, torch.arange(64) % 3), batch_size=16),
        criterion=criterion or LipschitzCrossEntropy(temperature=8.0), noise_multiplier=1.0, input_norm_bound=1.0,
        **arguments)
    return engine, model, optimizer, loader


def train(engine, model, optimizer, loader, steps: int) -> None:
    criterion = LipschitzCrossEntropy(temperature=8.0)
    for _, (x, y) in zip(range(steps), loader):
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()


class WritesAFile:
    """A pickle payload: unpickling it calls ``open(path, 'w').write(...)``: code run by a tampered checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_a_tampered_checkpoint_runs_no_code_and_changes_nothing(tmp_path):
    engine, model, optimizer, loader = attach()
    train(engine, model, optimizer, loader, 2)
    path = engine.save_checkpoint(tmp_path / "run.pt")
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "marker"
    state["extra"] = {"payload": WritesAFile(str(marker))}
    torch.save(state, path)  # same checkpoint, one crafted object in it
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    steps = engine.accountant.total_steps
    train(engine, model, optimizer, loader, 1)
    after_step = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match="nothing was loaded"):
        engine.load_checkpoint(path)
    assert not marker.exists()  # the payload never ran
    assert engine.accountant.total_steps == steps + 1  # nothing was restored either
    for name, p in model.named_parameters():
        assert torch.equal(p, after_step[name]) and not torch.equal(p, before[name])


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_a_foreign_or_damaged_file_is_refused(tmp_path, content):
    engine, *_ = attach()
    path = tmp_path / "foreign.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        engine.load_checkpoint(path)
    torch.save({"model": {}}, path)  # loadable, but not lipdp's
    with pytest.raises(CheckpointError, match="not a lipdp checkpoint"):
        engine.load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        engine.load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_restores_model_optimizer_and_accountant_exactly(tmp_path):
    engine, model, optimizer, loader = attach()
    train(engine, model, optimizer, loader, 3)
    path = engine.save_checkpoint(tmp_path / "run.pt", epoch=1)
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    epsilon = engine.get_epsilon(1e-5)
    train(engine, model, optimizer, loader, 2)
    assert engine.load_checkpoint(path) == {"epoch": 1}
    assert engine.get_epsilon(1e-5) == epsilon and engine.accountant.total_steps == 3
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name])


def test_leftovers_of_a_crashed_write_are_removed_by_the_next_save(tmp_path):
    engine, *_ = attach()
    leftover = tmp_path / ".run.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / ".other.pt.abc.tmp"
    unrelated.write_bytes(b"someone else's")
    engine.save_checkpoint(tmp_path / "run.pt")
    assert not leftover.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc.tmp", "run.pt"]


def test_each_checkpoint_compacts_the_journal_and_lost_steps_are_still_counted(tmp_path):
    ckpt = tmp_path / "run.pt"
    engine, model, optimizer, loader = attach()
    engine.attach_journal(journal_path(ckpt), fsync=False)
    train(engine, model, optimizer, loader, 3)
    assert len(journal_path(ckpt).read_text().splitlines()) == 3
    engine.save_checkpoint(ckpt)
    assert journal_path(ckpt).read_text() == ""  # the checkpoint holds those steps
    train(engine, model, optimizer, loader, 2)  # then the process dies: 2 steps after the checkpoint
    assert [line.split()[0] for line in journal_path(ckpt).read_text().splitlines()] == ["4", "5"]
    resumed, *_ = attach()
    resumed.load_checkpoint(ckpt)
    assert resumed.attach_journal(journal_path(ckpt)) == 2
    assert resumed.accountant.total_steps == 5
    assert resumed.get_epsilon(1e-5) == engine.get_epsilon(1e-5)


def test_opacus_style_accountant_get_epsilon():
    engine, model, optimizer, loader = attach()
    train(engine, model, optimizer, loader, 2)
    assert engine.accountant.get_epsilon(delta=1e-5) == engine.get_epsilon(1e-5) > 0


@pytest.mark.parametrize("argument, hint", [("max_grad_norm", "loss_grad_clip"), ("poisson_sampling", "Poisson"),
                                            ("grad_sample_mode", "no per-sample"), ("clipping", "noise_strategy")])
def test_opacus_only_arguments_name_lipdp_s_equivalent(argument, hint):
    with pytest.raises(TypeError, match=f"Opacus argument '{argument}'.*{hint}"):
        attach(**{argument: 1.0})
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_thing'"):
        attach(no_such_thing=1)


def test_a_loss_a_lipschitz_model_cannot_fit_gets_a_warning_naming_the_temperature():
    """On an orthogonal MLP (Lipschitz 1 for ever) with inputs of norm 1, plain cross-entropy stays near log K."""
    from lipdp.models import orthogonal_mlp

    def private(criterion, model):
        x = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
        LipDPEngine(seed=0).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=criterion,
            data_loader=DataLoader(TensorDataset(x, torch.arange(32) % 10), batch_size=8), noise_multiplier=1.0,
            input_norm_bound=1.0)

    with pytest.warns(UserWarning, match=r"Fix: use lipdp.losses.LipschitzCrossEntropy\(temperature=\d+\)"):
        private(nn.CrossEntropyLoss(), orthogonal_mlp(8, 10, hidden=(16,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        private(LipschitzCrossEntropy(temperature=8.0), orthogonal_mlp(8, 10, hidden=(16,)))  # fits: no warning
        attach(nn.CrossEntropyLoss())  # a free nn.Linear can grow its Lipschitz constant: no warning either


def test_the_warning_bound_is_the_real_best_loss():
    """best_cross_entropy is the minimum of CE over logits in the ball: random logit vectors never go below it."""
    from lipdp.checks import best_cross_entropy

    generator = torch.Generator().manual_seed(0)
    for classes, radius, temperature in [(2, 1.0, 1.0), (10, 1.0, 1.0), (10, 3.0, 2.0)]:
        best = best_cross_entropy(radius, classes, temperature)
        z = torch.randn(20000, classes, generator=generator)
        z = z / z.norm(dim=1, keepdim=True) * radius * torch.rand(20000, 1, generator=generator)
        losses = nn.functional.cross_entropy(temperature * z, torch.zeros(20000, dtype=torch.long),
                                             reduction="none") / temperature
        assert losses.min().item() >= best - 1e-6
        direction = torch.full((1, classes), -1.0 / classes, dtype=torch.float64)
        direction[0, 0] += 1.0
        optimum = radius * direction / direction.norm()  # the logit vector the formula says is best: it reaches it
        reached = nn.functional.cross_entropy(temperature * optimum, torch.zeros(1, dtype=torch.long)) / temperature
        assert reached.item() == pytest.approx(best, rel=1e-5)
    assert math.isclose(best_cross_entropy(1.0, 10, 1.0), math.log1p(9 * math.exp(-math.sqrt(10 / 9))))


def test_pickle_payload_is_a_real_payload(tmp_path):
    """The crafted object does run code under an unrestricted unpickler: the refusal above is what protects."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(WritesAFile(str(marker))))
    assert marker.read_text() == "pwned"
    os.unlink(marker)
