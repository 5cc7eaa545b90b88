"""Multi-process training (lipdp.distributed): K ranks are one mechanism, equal to the single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lipdp.sampling import PoissonBatchSampler

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from lipdp import LipDPEngine, distributed
    from lipdp.layers import InputNormClip
    from lipdp.losses import LipschitzCrossEntropy
    from lipdp.models import orthogonal_mlp

    distributed.init_from_env()
    folder = Path(sys.argv[1])

    def private(model, dataset, batch_size, seed, wrap):
        if wrap:
            model = nn.parallel.DistributedDataParallel(model)
        engine = LipDPEngine(accountant="prv", seed=seed)
        criterion = LipschitzCrossEntropy()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            data_loader=DataLoader(dataset, batch_size=batch_size), criterion=criterion,
            noise_multiplier=1.0, input_norm_bound=1.0)
        return engine, model, optimizer, loader, criterion

    def run(wrap):
        # 1. Training: an orthogonium MLP (materialised weights) for one epoch of Poisson batches.
        torch.manual_seed(0)
        x = torch.randn(96, 8); x = x / x.norm(dim=1, keepdim=True); y = torch.randint(0, 3, (96,))
        engine, model, optimizer, loader, criterion = private(orthogonal_mlp(8, 3, hidden=(16,)),
                                                              TensorDataset(x, y), 16, 7, wrap)
        name = "ddp" if wrap else "plain"
        engine.attach_journal(folder / f"{name}.journal", fsync=False)  # rank 0 writes, all ranks read
        local_sizes = []
        for xb, yb in loader:
            local_sizes.append(len(xb))
            optimizer.zero_grad(); criterion(model(xb), yb).backward(); optimizer.step()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        engine.save_checkpoint(folder / f"{name}.pt")  # collective: rank 0 writes, the others wait
        engine.load_checkpoint(folder / f"{name}.pt")  # every rank resumes from it (journal: nothing lost)
        # 2. Noise of the released (summed) gradient: zero gradients, so the release is the noise alone.
        torch.manual_seed(1)
        wide = nn.Sequential(InputNormClip(1.0), nn.Linear(64, 256))
        data = TensorDataset(torch.zeros(64, 64), torch.zeros(64).long())
        noise_engine, wide, wide_optimizer, *_ = private(wide, data, 32, 11, wrap)
        wide_optimizer.zero_grad()
        (wide(torch.zeros(2, 64)).sum() * 0).backward()
        wide_optimizer.step()
        weight = dict(distributed.unwrap(wide)[0].named_parameters())["1.weight"]
        released = weight.grad * 32  # un-normalise by the expected batch size
        # 3. Statistics released before training: two releases on zero data are two independent noise draws.
        statistics_engine = LipDPEngine(seed=13)
        means = [statistics_engine.private_mean(torch.zeros(10, 4), 1.0, 1.0).tolist() for _ in range(2)]
        return {"params": params.tolist(), "released_means": means, "epsilon": engine.get_epsilon(1e-5),
                "steps": engine.accountant.total_steps, "local_sizes": local_sizes,
                "claimed_std": noise_engine.noise_stds()["1.weight"], "measured_std": released.std().item(),
                "noise_head": released.flatten()[:5].tolist()}

    variants = {"plain": run(False)}
    if distributed.is_distributed():
        variants["ddp"] = run(True)
    print(json.dumps({"rank": distributed.rank(), **variants}))
""")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(world: int, folder: Path, timeout: float = 180) -> list[dict]:
    """Run WORKER as ``world`` processes of one gloo group (the environment torchrun would set)."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(folder)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = []
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(outputs, key=lambda o: o["rank"])


def test_rank_shards_of_one_generator_are_exactly_the_single_process_batch():
    single = PoissonBatchSampler(1000, 0.05, 20, torch.Generator().manual_seed(3))
    shards = [PoissonBatchSampler(1000, 0.05, 20, torch.Generator().manual_seed(3), rank=r, world_size=3)
              for r in range(3)]
    for batch, *parts in zip(single, *shards):
        assert sorted(i for part in parts for i in part) == batch
        assert all(i % 3 == r for r, part in enumerate(parts) for i in part)


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank"):
        PoissonBatchSampler(10, 0.5, 1, torch.Generator(), rank=2, world_size=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict], Path]:
    (single,) = run_ranks(1, tmp_path_factory.mktemp("single"))
    folder = tmp_path_factory.mktemp("ranks")
    return single, run_ranks(2, folder), folder


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["plain", "ddp"])
def test_two_processes_are_one_mechanism_equal_to_the_single_process_run(runs, wrap):
    single, ranks, folder = runs
    single, ranks = single["plain"], [rank[wrap] for rank in ranks]
    # the journal (written by rank 0 alone) was compacted by the checkpoint, which holds all 6 steps; the checkpoint
    # is whole and resumable on every rank
    assert (folder / f"{wrap}.journal").read_text() == ""
    assert ranks[0]["epsilon"] == ranks[1]["epsilon"] > 0
    assert (folder / f"{wrap}.pt").exists()
    # ranks hold identical parameters after every step (bit for bit), and release the same noise draw
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["noise_head"] == ranks[1]["noise_head"]
    # together they sampled the single-process batches (the shards partition each of them)
    assert [a + b for a, b in zip(ranks[0]["local_sizes"], ranks[1]["local_sizes"])] == single["local_sizes"]
    # the same training as one process (up to the order of floating-point summation)
    torch.testing.assert_close(torch.tensor(ranks[0]["params"]), torch.tensor(single["params"]),
                               rtol=1e-4, atol=1e-5)
    # one accountant, same epsilon; noise of the summed gradient drawn once: std s, not s * sqrt(2)
    for rank in ranks:
        assert rank["steps"] == single["steps"] == 6
        assert rank["epsilon"] == single["epsilon"]
        assert rank["claimed_std"] == single["claimed_std"]
        assert rank["measured_std"] == pytest.approx(single["claimed_std"], rel=0.03)
    assert ranks[0]["noise_head"] == pytest.approx(single["noise_head"], rel=1e-6)
    # released statistics: the same on every rank and as in one process, fresh noise for each release
    assert ranks[0]["released_means"] == ranks[1]["released_means"] == single["released_means"]
    assert ranks[0]["released_means"][0] != ranks[0]["released_means"][1]


@pytest.mark.slow
def test_torchrun_cli_train_runs_two_ranks_and_rank_0_reports(tmp_path):
    out = tmp_path / "run.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lipdp.cli",
         "train", "--dataset", "digits", "--epochs", "1", "--batch-size", "512", "--no-progress", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("test accuracy") == 1  # rank 0 alone reports
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["epsilon"] <= 3.0 + 1e-9
