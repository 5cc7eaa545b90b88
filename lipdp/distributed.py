"""Multi-process private training over ``torch.distributed`` (docs/design.md §3): one mechanism, however many ranks.

Launch with ``torchrun --nproc_per_node K ...``; :func:`init_from_env` joins the process group (gloo on CPU,
nccl on GPU). Every rank builds the same model, optimizer and *full* dataset, and calls ``make_private`` with
the *global* expected batch size B. The engine then makes the K ranks one Gaussian mechanism:

* **Sampling.** Every rank holds the same sampling generator (seed broadcast from rank 0) and draws the same
  global Poisson mask over all N records, then keeps its shard {i : i = rank (mod K)}. The union of the
  shards is exactly one Poisson sample at rate q = B / N, each record included independently, the sample a
  single process with the same seed would draw; the accountant's amplification by subsampling holds as is.
* **Gradients.** Each rank back-propagates its shard; the mechanism sums every gradient it noises across
  ranks (:func:`all_reduce_sum`, SUM) before noising: plain parameter gradients *and* the gradients of the
  materialised weights of reparametrised layers (not parameters, so DDP never sees them). A model wrapped in
  ``DistributedDataParallel`` is unwrapped for the bounds and its own gradient averaging is switched off
  (:func:`disable_gradient_sync`), so nothing is counted twice.
* **Noise, drawn once in total.** Every rank holds the same noise generator (same broadcast seed), draws the
  same z ~ N(0, s_d^2 I) and adds it to the same all-reduced sum: the released gradient sum_i g_i + z is
  bit-identical on every rank, exactly as if rank 0 drew z and broadcast it, without the broadcast.
  (Independent per-rank draws of N(0, s_d^2) added before the sum would multiply the variance by K.)
* **Accounting.** Every rank's accountant records the same steps (identical copies); rank 0's is the
  authoritative one: it alone writes checkpoints and the step journal.

Parameters stay identical on all ranks without DDP's help: they start equal (:func:`broadcast_module` at
``make_private``) and every rank applies the same released gradient.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)

__all__ = [
    "all_reduce_sum", "barrier", "broadcast_module", "broadcast_seed", "disable_gradient_sync", "gradient_reducer",
    "init_from_env", "is_distributed", "is_main_process", "rank", "unwrap", "world_size",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the group; 0 outside a multi-rank group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks K; 1 outside a multi-rank group."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that prints, writes checkpoints and the step journal."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...).

    Returns True if this process is now one of several ranks, False for a single-process run (WORLD_SIZE
    unset or 1), where nothing is initialised. ``backend`` defaults to nccl when CUDA is available, else gloo.
    Idempotent; the group is destroyed at interpreter exit.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        atexit.register(_destroy)
        logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return is_distributed()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Device for collectives: nccl only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank (so all ranks share the sampling and noise generators)."""
    if not is_distributed():
        return int(seed)
    buffer = torch.tensor([int(seed)], dtype=torch.int64, device=_device())
    dist.broadcast(buffer, src=0)
    return int(buffer.item())


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            staged = tensor.detach().to(_device())
            dist.broadcast(staged, src=0)
            if staged.data_ptr() != tensor.data_ptr():
                tensor.copy_(staged)


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sums of ``tensors`` over all ranks, as new tensors (inputs untouched); one collective per dtype and
    device. Every rank must pass tensors of the same shapes in the same order."""
    if not is_distributed():
        return [tensor.clone() for tensor in tensors]
    reduced: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.dtype, tensor.device), []).append(index)
    for (dtype, device), indices in groups.items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in indices]).to(_device())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(device)
        offset = 0
        for i in indices:
            size = tensors[i].numel()
            reduced[i] = flat[offset:offset + size].view_as(tensors[i])
            offset += size
    return reduced  # type: ignore[return-value]


def barrier() -> None:
    """Wait until every rank reaches this point; a no-op in a single-process run."""
    if is_distributed():
        dist.barrier()


def unwrap(module: nn.Module) -> tuple[nn.Module, DistributedDataParallel | None]:
    """(the module the bounds see, the DDP wrapper or None)."""
    if isinstance(module, DistributedDataParallel):
        return module.module, module
    return module, None


def disable_gradient_sync(ddp: DistributedDataParallel) -> None:
    """Switch off DDP's gradient averaging for good, as its ``no_sync()`` context does for one step: the
    mechanism sums (not averages) every noised gradient itself, including the materialised-weight gradients DDP
    cannot see.

    A no-op communication hook is NOT enough: DDP's reducer finishes a bucket only once every parameter in it
    has a gradient, and the raw tensors of reparametrised layers get theirs from the post-release backward
    (``MaterializedWeights.backpropagate``), at which point DDP would copy the bucket's stale, *un-noised*
    local gradients over the noisy ones (e.g. the biases).
    """
    ddp.require_backward_grad_sync = False


def gradient_reducer(ddp: DistributedDataParallel | None) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """The mechanism's ``reduce_gradients``: :func:`all_reduce_sum`, refusing to run if DDP's own gradient
    sync was switched back on (its average would be summed again, and un-noised gradients could be copied
    over noisy ones)."""

    def reduce(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if ddp is not None and ddp.require_backward_grad_sync:
            raise RuntimeError(
                "DistributedDataParallel's gradient sync is on again (require_backward_grad_sync=True): lipdp "
                "sums the gradients itself. Fix: leave the DDP wrapper as make_private returned it."
            )
        return all_reduce_sum(tensors)

    return reduce
