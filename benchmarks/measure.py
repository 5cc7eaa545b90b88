"""One measurement: the median step time and peak memory of one (method, batch size) training configuration.

Every configuration runs in a fresh interpreter (``run_isolated``), so that its peak resident set size (RSS) is
its own. The child imports the same libraries whatever the method (torch, opacus, orthogonium, lipdp), so that
their baseline memory is equal, builds the model, a fixed batch of synthetic inputs (step cost does not depend on
pixel values) and the method's (model, optimizer, criterion), then times ``warmup + steps`` full steps
(zero_grad, forward, loss, backward, optimizer step) and reports the median of the last ``steps``.

Methods:

- ``plain-orthogonal``: lipdp's orthogonal CNN (``lipdp.models.orthogonal_cnn``), Adam, the Lipschitz
  cross-entropy; no privacy. orthogonium's layers back-propagate through their orthogonalisation.
- ``lipdp``: the same model, optimizer and loss made private by ``LipDPEngine`` (global noise).
- ``noise-floor``: ``plain-orthogonal`` plus one Gaussian draw of all the gradients' size added to them before the
  optimizer step: the least work any Gaussian mechanism does (no bounds, no accounting, no checks).
- ``plain-cnn``: the Opacus baseline's GroupNorm CNN (``recipes.opacus_baseline.groupnorm_cnn``), SGD with
  momentum, cross-entropy; no privacy.
- ``opacus-ghost`` / ``opacus-hooks`` / ``opacus-functorch``: that CNN under Opacus DP-SGD in each per-sample
  gradient mode.

Memory limit: with ``memory_limit_bytes`` the child, once set up, caps its address space (``RLIMIT_AS``) at its
current size plus the memory it has left under the limit (limit - current RSS). An allocation beyond that fails
and the configuration is reported as ``oom`` ("does not fit"); a configuration also does not fit if its peak
RSS exceeds the limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.harness import peak_rss_bytes, process_status_bytes, run_child

logger = logging.getLogger(__name__)

#: name -> one-line description (the order of the benchmark tables).
METHODS = {
    "plain-orthogonal": "orthogonal CNN, Adam, no privacy",
    "lipdp": "orthogonal CNN, Adam, LipDPEngine",
    "noise-floor": "orthogonal CNN, Adam, no privacy, one Gaussian draw added to the gradients",
    "plain-cnn": "GroupNorm CNN, SGD, no privacy",
    "opacus-ghost": "GroupNorm CNN, SGD, Opacus ghost clipping",
    "opacus-hooks": "GroupNorm CNN, SGD, Opacus hooks",
    "opacus-functorch": "GroupNorm CNN, SGD, Opacus functorch",
}
#: Models of the plain-orthogonal / noise-floor / lipdp methods: the orthogonal CNN, or a dense MLP (InputNormClip ->
#: Linear(d, 128) -> MaxMin -> Linear(128, classes), plain torch layers, d = prod(input_shape)).
MODELS = ("orthogonal-cnn", "mlp")
#: Records in the (virtual) training set: the sample rate is batch_size / this (Fashion-MNIST's size).
DATASET_SIZE = 60_000


@dataclass(frozen=True)
class Configuration:
    """What one isolated measurement runs."""

    method: str
    batch_size: int
    steps: int = 10
    warmup: int = 3
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    seed: int = 0
    model: str = "orthogonal-cnn"  # for plain-orthogonal / noise-floor / lipdp: one of MODELS
    compile: bool = False  # torch.compile the model (both sides alike)
    device: str = "cpu"


@dataclass
class Measurement:
    """Result of one configuration. ``status`` is "ok", "oom" (an allocation failed under the memory limit),
    "timeout", or "crashed (...)"; the numbers are None unless it is "ok"."""

    configuration: Configuration
    status: str
    step_seconds: list[float] = field(default_factory=list)
    median_step_seconds: float | None = None
    peak_rss_bytes: int | None = None
    setup_rss_bytes: int | None = None
    threads: int | None = None

    def fits(self, memory_limit_bytes: float | None) -> bool:
        """Ran to the end and, with a limit, stayed within it."""
        return self.status == "ok" and (memory_limit_bytes is None or self.peak_rss_bytes <= memory_limit_bytes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Measurement:
        configuration = dict(data["configuration"], input_shape=tuple(data["configuration"]["input_shape"]))
        return cls(**dict(data, configuration=Configuration(**configuration)))


# ------------------------------------------------------------------------------------------------ child side


def current_rss_bytes() -> int:
    return process_status_bytes("VmRSS")


def _cap_address_space(memory_limit_bytes: int) -> None:
    remaining = memory_limit_bytes - current_rss_bytes()
    if remaining <= 0:
        raise MemoryError("the set-up alone exceeds the memory limit")
    cap = process_status_bytes("VmSize") + remaining
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))


def build_step(config: Configuration) -> Callable[[], None]:
    """Set up ``config.method`` and return a function that runs one full training step on a fixed batch."""
    import torch
    from orthogonium.layers import MaxMin
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lipdp import LipDPEngine
    from lipdp.layers import InputNormClip
    from lipdp.losses import LipschitzCrossEntropy
    from lipdp.models import orthogonal_cnn
    from recipes.opacus_baseline import groupnorm_cnn, make_private

    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(config.seed)
    shape, batch, device = config.input_shape, config.batch_size, torch.device(config.device)
    x = torch.rand(batch, *shape, device=device)
    if config.compile:  # the input check cannot see the clip layer inside torch.compile's wrapper: norm <= 1
        x = x / x.flatten(1).norm(dim=1).clamp_min(1.0).view(-1, *[1] * len(shape))
    y = torch.randint(config.num_classes, (batch,), device=device)
    # A dataset of the right size that takes no memory: the loaders are only read for their sizes.
    virtual = TensorDataset(torch.zeros(1, *shape).expand(max(DATASET_SIZE, batch), *shape),
                            torch.zeros(1, dtype=torch.long).expand(max(DATASET_SIZE, batch)))
    loader = DataLoader(virtual, batch_size=batch)

    if config.method in ("plain-orthogonal", "noise-floor", "lipdp"):
        if config.model == "mlp":
            model = nn.Sequential(nn.Flatten(), InputNormClip(1.0), nn.Linear(math.prod(shape), 128), MaxMin(),
                                  nn.Linear(128, config.num_classes))
        else:
            model = orthogonal_cnn(shape, config.num_classes)
        model = model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        criterion = LipschitzCrossEntropy(temperature=8.0)
        if config.compile:
            model = torch.compile(model)
        if config.method == "lipdp":
            engine = LipDPEngine(accountant="prv", seed=config.seed)
            model, optimizer, _ = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=1.0,
                input_norm_bound=1.0)
    else:
        model = groupnorm_cnn(shape, config.num_classes).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        criterion = nn.CrossEntropyLoss()
        if config.method.startswith("opacus-"):
            mode = config.method.removeprefix("opacus-")
            model, optimizer, criterion, _ = make_private(model, optimizer, loader, criterion, noise_multiplier=1.0,
                                                          max_grad_norm=1.0, grad_sample_mode=mode, seed=config.seed)

    parameters = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device=device).manual_seed(config.seed + 1)
    sizes = [p.numel() for p in parameters]

    def step() -> None:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        if config.method == "noise-floor":
            draws = torch.randn(sum(sizes), generator=generator, device=device).split(sizes)
            torch._foreach_add_([p.grad for p in parameters], [d.view_as(p) for d, p in zip(draws, parameters)])
        optimizer.step()

    return step


def measure(config: Configuration, memory_limit_bytes: int | None = None) -> Measurement:
    """Run ``config`` in this process (``run_isolated`` runs it in a fresh one)."""
    import torch

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    step = build_step(config)
    setup_rss = current_rss_bytes()
    try:
        if memory_limit_bytes is not None:
            _cap_address_space(memory_limit_bytes)
        seconds = []
        for _ in range(config.warmup + config.steps):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
    except MemoryError:
        return Measurement(config, "oom", setup_rss_bytes=setup_rss, peak_rss_bytes=peak_rss_bytes())
    except RuntimeError as error:  # torch's allocator reports "not enough memory" as a RuntimeError
        if "memory" not in str(error).lower():
            raise
        return Measurement(config, "oom", setup_rss_bytes=setup_rss, peak_rss_bytes=peak_rss_bytes())
    timed = seconds[config.warmup:]
    return Measurement(config, "ok", step_seconds=timed, median_step_seconds=statistics.median(timed),
                       peak_rss_bytes=peak_rss_bytes(), setup_rss_bytes=setup_rss, threads=torch.get_num_threads())


# ----------------------------------------------------------------------------------------------- parent side


def run_isolated(config: Configuration, memory_limit_bytes: int | None = None,
                 timeout: float | None = None) -> Measurement:
    """Measure ``config`` in a fresh interpreter (``python -m benchmarks.measure``)."""
    argv = ["--config", json.dumps(asdict(config))]
    if memory_limit_bytes is not None:
        argv += ["--memory-limit-bytes", str(int(memory_limit_bytes))]
    outcome = run_child("benchmarks.measure", argv, timeout=timeout, capture_stderr=True)
    if outcome.result is not None:
        return Measurement.from_dict(outcome.result)
    if outcome.returncode is None:
        return Measurement(config, "timeout")
    logger.warning("%s at batch %d crashed (exit code %s): %s", config.method, config.batch_size,
                   outcome.returncode, outcome.stderr_tail)
    return Measurement(config, f"crashed (exit code {outcome.returncode})")


def gigabytes(value: float) -> int:
    """Bytes in ``value`` GB (10^9), for command-line memory limits."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"a memory limit must be a positive number of GB, got {value}")
    return int(value * 1e9)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: measure one configuration and write the result as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.measure",
        description="Measure one configuration in this process (the benchmark scripts run this as a child).")
    parser.add_argument("--config", required=True, help="the Configuration as a JSON object")
    parser.add_argument("--memory-limit-bytes", type=int, default=None,
                        help="cap this process's memory here once set up; exceeding it reports 'oom'")
    parser.add_argument("--result", type=Path, default=None,
                        help="write the Measurement as JSON to this file (default: stdout)")
    args = parser.parse_args(argv)
    # Same libraries in every child, whatever the method: equal baseline memory.
    import opacus  # noqa: F401
    import orthogonium  # noqa: F401
    import torch  # noqa: F401

    import lipdp  # noqa: F401

    data = json.loads(args.config)
    config = Configuration(**dict(data, input_shape=tuple(data["input_shape"])))
    result = json.dumps(measure(config, args.memory_limit_bytes).to_dict())
    if args.result is None:
        print(result)
    else:
        args.result.write_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
