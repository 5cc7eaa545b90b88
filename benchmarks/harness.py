"""The measurement harness of the comparisons and benchmarks: isolated child processes, peak memory, step timing and
the machine's description. Imports only the standard library at module level (torch and opacus inside functions), and
nothing from ``recipes``: the recipes and benchmarks import it, never the other way round (docs/design.md §7).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def process_status_bytes(field: str) -> int:
    """A memory line of this process's ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ``VmSize``...), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB (KiB)
    raise RuntimeError(f"{field} is not in /proc/self/status (lipdp's memory measurements need Linux)")


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``VmHWM``; ``getrusage``'s ``ru_maxrss`` lags behind it)."""
    return process_status_bytes("VmHWM")


@dataclass
class ChildOutcome:
    """How a child process ended: ``returncode`` None means it was killed at the timeout; ``result`` is the JSON
    it wrote (None if it wrote none)."""

    returncode: int | None
    result: dict | None
    seconds: float
    stderr_tail: str = ""


def run_child(module: str, argv: list[str], timeout: float | None = None, capture_stderr: bool = False,
              environment: dict[str, str] | None = None) -> ChildOutcome:
    """Run ``python -m module *argv --result FILE`` in a fresh interpreter and read the JSON it writes to FILE.

    The child's stdout is discarded; its stderr goes to this terminal (progress bars), or is captured and its
    last lines kept for error messages with ``capture_stderr``. ``environment`` adds to this process's variables.
    """
    with tempfile.TemporaryDirectory(prefix="lipdp-child-") as folder:
        path = Path(folder) / "result.json"
        command = [sys.executable, "-m", module, *argv, "--result", str(path)]
        start = time.perf_counter()
        try:
            completed = subprocess.run(command, stdout=subprocess.DEVNULL, timeout=timeout, text=True,
                                       stderr=subprocess.PIPE if capture_stderr else None,
                                       env={**os.environ, **(environment or {})})
        except subprocess.TimeoutExpired:
            return ChildOutcome(None, None, time.perf_counter() - start)
        seconds = time.perf_counter() - start
        result = json.loads(path.read_text()) if completed.returncode == 0 and path.exists() else None
    tail = "\n".join((completed.stderr or "").strip().splitlines()[-5:])
    return ChildOutcome(completed.returncode, result, seconds, tail)


def machine_description() -> dict:
    """CPU model, core count, memory, OS and library versions of this machine."""
    import opacus
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(memory_kib * 1024 / 1e9, 1),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "opacus": opacus.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


class StepTimer:
    """Times every training step taken in this process, whoever builds the model and the optimizer.

    A step starts at the first module forward call with gradients enabled after the previous step and ends when
    an optimizer step finishes (torch's global module and optimizer hooks). Forward calls under ``no_grad``
    (evaluation) are ignored; so is an optimizer step with no forward before it (a wrapper stepping its inner
    optimizer).
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start: float | None = None
        self._handles: list = []

    def _forward(self, module, args) -> None:
        import torch

        if self._start is None and torch.is_grad_enabled():
            self._start = time.perf_counter()

    def _step_end(self, optimizer, args, kwargs) -> None:
        if self._start is not None:
            self.seconds.append(time.perf_counter() - self._start)
            self._start = None

    def __enter__(self) -> StepTimer:
        from torch.nn.modules.module import register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handles = [register_module_forward_pre_hook(self._forward),
                         register_optimizer_step_post_hook(self._step_end)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def median(self) -> float | None:
        """Median step time in seconds (None before any step)."""
        import statistics

        return statistics.median(self.seconds) if self.seconds else None


class ChildFailed(RuntimeError):
    """A measured child process exited without a result; its own messages are above on stderr."""
