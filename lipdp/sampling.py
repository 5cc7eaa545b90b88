"""Poisson sampling (docs/design.md §1): each record joins each batch independently with rate q = B / N.

The batch size varies (and may be 0); the accountant's privacy amplification assumes exactly this sampling.
The generator belongs to the engine, so the sequence of batches is reproducible from its state and can be
checkpointed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from lipdp.augment import Augmentation, make_views
from lipdp.hooks import PassCounter


def random_seed() -> int:
    """A 63-bit seed from the operating system's entropy (``os.urandom``): the engine's secure mode."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class PoissonBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields ``steps`` batches of indices; index i is in each batch with probability ``sample_rate``.

    With ``world_size`` K > 1 (see ``lipdp.distributed``), every rank draws the same global mask from an
    identical generator and keeps its shard {i : i = rank (mod K)}: together the ranks sample each record at
    rate q exactly once, the single-process sample.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1) -> None:
        if num_samples <= 0:
            raise ValueError("the dataset is empty: Poisson sampling needs at least one record")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps
        self.generator = generator
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            indices = mask.nonzero().flatten()
            if self.world_size > 1:
                indices = indices[indices % self.world_size == self.rank]
            yield indices.tolist()


def _empty_collate(dataset: Dataset):
    """Collate that turns an empty batch into zero-length tensors shaped like one record (shapes are public)."""
    example = default_collate([dataset[0]])

    def collate(batch):
        if len(batch) == 0:
            return torch.utils._pytree.tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) else t, example)
        return default_collate(batch)

    return collate


class _BatchedTensorDataset(Dataset):
    """A TensorDataset view that fetches a whole batch with one indexing operation (``__getitems__``)."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.tensors = dataset.tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index):
        return tuple(tensor[index] for tensor in self.tensors)

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        return [tensor[index] for tensor in self.tensors]


def _identity(batch):
    return batch


class PoissonDataLoader(DataLoader):
    """A ``DataLoader`` over a map-style dataset that draws Poisson batches of expected size ``batch_size``.

    One epoch = round(N / batch_size) batches (so q * steps_per_epoch ~ 1). In a multi-process run
    ``batch_size`` is the *global* expected batch size and this rank yields its shard of each batch.

    With ``views`` K > 1, each batch holds K random views of every sampled record (``lipdp.augment.make_views``,
    view-major, drawn with ``view_generator``): K n rows for n records. The engine then averages each record's K
    view gradients (``lipdp.hooks``), whose norm stays within the same bound: views cost no privacy.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        generator: torch.Generator,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
        views: int = 1,
        augment: Augmentation | None = None,
        view_generator: torch.Generator | None = None,
    ) -> None:
        if not (isinstance(views, int) and views >= 1):
            raise ValueError(f"views must be an integer >= 1, got {views!r}")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a function (images, generator) -> images, got {type(augment).__name__}")
        self.views, self.augment = views, augment
        self.view_generator = view_generator if view_generator is not None else torch.Generator()
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise TypeError(
                "lipdp needs a map-style dataset (with __len__ and __getitem__) to sample each record "
                "independently; an IterableDataset cannot be Poisson-sampled. Fix: materialise it into a "
                "TensorDataset or a map-style Dataset."
            )
        num_samples = len(dataset)
        if num_samples == 0:
            raise ValueError("the dataset is empty: there is nothing to train on")
        if not 0 < batch_size <= num_samples:
            raise ValueError(f"batch_size must be in [1, {num_samples}] (dataset size), got {batch_size}")
        self.expected_batch_size = int(batch_size)
        self.sample_rate = batch_size / num_samples
        steps = max(1, round(num_samples / batch_size))
        sampler = PoissonBatchSampler(num_samples, self.sample_rate, steps, generator, rank, world_size)
        if isinstance(dataset, TensorDataset):
            dataset, collate = _BatchedTensorDataset(dataset), _identity
        else:
            collate = _empty_collate(dataset)
        super().__init__(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, round(N / expected batch size)."""
        return len(self.batch_sampler)

    def __iter__(self):
        """The Poisson batches, each with its records' views when ``views`` > 1 (or an augmentation is set)."""
        for batch in super().__iter__():
            if self.views > 1 or self.augment is not None:
                batch = make_views(batch, self.views, self.augment, self.view_generator)
            yield batch


@contextlib.contextmanager
def virtual_batches(loader: PoissonDataLoader, optimizer, max_physical_batch_size: int,
                    passes: PassCounter | None = None) -> Iterator[Iterator]:
    """Split each Poisson (logical) batch of ``loader`` into micro-batches of at most ``max_physical_batch_size``;
    gradients accumulate and ``optimizer`` (a ``DPOptimizer``) takes ONE noisy step per logical batch: its
    ``skip_next_step`` is set for every micro-batch but the last. The micro-batches hold disjoint samples, so the
    step accounts for one backward pass each (``passes.allow``, ``lipdp.hooks``)."""
    if not (isinstance(max_physical_batch_size, int) and max_physical_batch_size >= 1):
        raise ValueError(f"max_physical_batch_size must be an integer >= 1, got {max_physical_batch_size!r}")
    views = loader.views
    records_per_chunk = max(1, max_physical_batch_size // views)  # a record's K views stay in one micro-batch

    def micro_batches():
        for batch in loader:
            records = len(batch[0]) // views
            chunks = max(1, -(-records // records_per_chunk))
            for index in range(chunks):
                if index > 0 and passes is not None:
                    passes.allow()
                optimizer.skip_next_step = index < chunks - 1
                start, stop = index * records_per_chunk, (index + 1) * records_per_chunk
                yield [torch.cat([t[view * records + start:view * records + min(stop, records)]
                                  for view in range(views)]) for t in batch]
                optimizer.skip_next_step = False  # a zero_grad after the step must clear
        optimizer.skip_next_step = False

    try:
        yield micro_batches()
    finally:
        optimizer.skip_next_step = False
