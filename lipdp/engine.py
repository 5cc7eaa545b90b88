"""``LipDPEngine``: private training with no per-sample gradients, shaped like Opacus' ``PrivacyEngine``.

    engine = LipDPEngine(accountant="prv")
    model, optimizer, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
        criterion=loss, noise_multiplier=1.2, input_norm_bound=1.0)
    ... ordinary training loop ...
    engine.get_epsilon(delta=1e-5)

The returned model is the same module with hooks (input checks, output-gradient fix, materialised weights),
the optimizer noises the summed gradient in ``step()`` (see ``mechanism.py``), and the loader draws Poisson
batches from the engine's own generator (DESIGN.md §3).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from accounting import BudgetReport, PrivacyAccountant, calibrate_noise
from accounting.validation import check_delta, check_noise_multiplier, check_positive, check_steps
from lipdp import distributed
from lipdp.bounds import check_model, lipschitz_constant, record_shapes
from lipdp.hooks import InputGuard, OutputGradientHook
from lipdp.journal import StepJournal
from lipdp.losses import loss_lipschitz
from lipdp.mechanism import GradientMechanism, MechanismConfig, PrivacyBudgetExceeded
from lipdp.noise import NOISE_STRATEGIES
from lipdp.optimizer import DPOptimizer
from lipdp.reparametrization import MaterializedWeights
from lipdp.sampling import PoissonDataLoader
from lipdp.statistics import ChannelBlock, private_channel_moments, private_mean

__all__ = ["LipDPEngine", "PrivacyBudgetExceeded"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _seed_from_os() -> int:
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


class LipDPEngine:
    """Makes a Lipschitz model, its optimizer and its data loader differentially private.

    ``secure_mode=True`` seeds the sampling and noise generator from the OS's entropy (``os.urandom``) and
    ignores ``seed``; otherwise ``seed`` (or a random one) makes runs reproducible. Note: torch's Gaussian
    sampler is not a cryptographically secure source; secure_mode protects the seed, as Opacus does without
    torchcsprng.
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False, seed: int | None = None) -> None:
        self.accountant = PrivacyAccountant(backend=accountant)
        self.secure_mode = secure_mode
        self.seed = _seed_from_os() if secure_mode or seed is None else int(seed)
        self.sampling_generator = torch.Generator().manual_seed(self.seed)
        self.noise_generator = torch.Generator().manual_seed(self.seed + 1)
        self.statistics_generator = torch.Generator().manual_seed(self.seed + 2)
        self._statistics_synchronised = False
        self.model: nn.Module | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: PoissonDataLoader | None = None
        self.mechanism: GradientMechanism | None = None
        self.journal: StepJournal | None = None
        self._hooks: list = []

    # ----------------------------------------------------------------------------------------------
    def private_mean(self, data: torch.Tensor, noise_multiplier: float, norm_bound: float) -> torch.Tensor:
        """The mean of ``data``'s rows, each clipped to ``norm_bound``, released by the Gaussian mechanism
        (``lipdp.statistics.private_mean``) and recorded in this engine's accountant as one step at sample rate 1:
        ``make_private_with_epsilon`` then leaves room for it and ``get_epsilon`` includes it. Call it before
        ``make_private``, on the whole training set (every rank the same, in multi-process runs)."""
        return self._release(noise_multiplier, lambda generator: private_mean(
            data, norm_bound, noise_multiplier, generator))

    def private_channel_moments(self, data: torch.Tensor, blocks: list[ChannelBlock], noise_multiplier: float,
                                norm_bound: float) -> list[torch.Tensor]:
        """Each block's channel second moments (sum over rows and positions of x_p x_p^T, rows clipped to
        ``norm_bound``), released by one Gaussian mechanism (``lipdp.statistics.private_channel_moments``) and
        accounted as ``private_mean`` is: one step at sample rate 1, before ``make_private``."""
        return self._release(noise_multiplier, lambda generator: private_channel_moments(
            data, blocks, norm_bound, noise_multiplier, generator))

    def _release(self, noise_multiplier: float, mechanism: Callable[[torch.Generator], T]) -> T:
        """Run a full-data Gaussian mechanism on the statistics generator and account it (one step, q = 1)."""
        if self.model is not None:
            raise RuntimeError("release statistics before make_private(...): the training budget is set there")
        if distributed.is_distributed() and not self._statistics_synchronised:  # every rank draws the same noise
            self.seed = distributed.broadcast_seed(self.seed)
            self.statistics_generator.manual_seed(self.seed + 2)  # once: later releases draw fresh noise
            self._statistics_synchronised = True
        released = mechanism(self.statistics_generator)
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
        return released

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        criterion: nn.Module,
        noise_multiplier: float,
        input_norm_bound: float,
        input_shape: tuple[int, ...] | None = None,
        loss_reduction: str = "mean",
        noise_strategy: str = "global",
        loss_grad_clip: float | None = None,
        max_epsilon: float | None = None,
        target_delta: float | None = None,
    ) -> tuple[nn.Module, DPOptimizer, PoissonDataLoader]:
        """Attach the private mechanism. Every argument is checked here, before any training step.

        Multi-process (``lipdp.distributed``): call it on every rank with the same model, the full dataset and
        the *global* expected batch size; ``module`` may be plain or wrapped in DistributedDataParallel.
        """
        if self.model is not None:
            raise RuntimeError("this engine is already attached to a model; create one engine per training run")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, DPOptimizer):
            raise TypeError("optimizer must be an ordinary torch.optim.Optimizer over the model's parameters")
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
        input_norm_bound = check_positive(input_norm_bound, "input_norm_bound")
        noise_multiplier = check_noise_multiplier(noise_multiplier)
        if loss_grad_clip is not None:
            loss_grad_clip = check_positive(loss_grad_clip, "loss_grad_clip")
        if noise_strategy not in NOISE_STRATEGIES:
            raise ValueError(f"noise_strategy must be one of {NOISE_STRATEGIES}, got {noise_strategy!r}")
        if target_delta is not None:
            target_delta = check_delta(target_delta, "target_delta")
        if max_epsilon is not None:
            if target_delta is None:
                raise ValueError("max_epsilon needs a target_delta")
            max_epsilon = check_positive(max_epsilon, "max_epsilon")
        reduction = getattr(criterion, "reduction", loss_reduction)
        if reduction != loss_reduction:
            raise ValueError(
                f"criterion.reduction={reduction!r} but loss_reduction={loss_reduction!r}: they must agree "
                "(the engine turns a mean over the batch into a sum before noising)."
            )
        if loss_grad_clip is not None:
            try:
                lipschitz = min(loss_grad_clip, loss_lipschitz(criterion))
            except ValueError:
                lipschitz = float(loss_grad_clip)  # the clip alone bounds any loss's logit gradient
        else:
            lipschitz = loss_lipschitz(criterion)
        wrapper, (module, ddp) = module, distributed.unwrap(module)
        check_model(module)
        batch_size = data_loader.batch_size
        if batch_size is None:
            raise ValueError("data_loader needs a batch_size (the expected Poisson batch size)")
        if distributed.is_distributed():  # one mechanism over all ranks: shared generators, equal replicas
            self.seed = distributed.broadcast_seed(self.seed)
            self.sampling_generator.manual_seed(self.seed)
            self.noise_generator.manual_seed(self.seed + 1)
            distributed.broadcast_module(module)
            if ddp is not None:
                distributed.disable_gradient_sync(ddp)
        poisson_loader = PoissonDataLoader(
            data_loader.dataset, batch_size, self.sampling_generator,
            num_workers=data_loader.num_workers, pin_memory=data_loader.pin_memory,
            rank=distributed.rank(), world_size=distributed.world_size(),
        )
        if input_shape is None:
            input_shape = tuple(poisson_loader.dataset[0][0].shape)
        input_shape = tuple(input_shape)
        model_params = {id(p) for p in module.parameters() if p.requires_grad}
        optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not optimizer_params <= {id(p) for p in module.parameters()}:
            raise ValueError("the optimizer holds parameters that are not the model's")
        if not model_params:
            raise ValueError("the model has no trainable parameters")

        materialized = MaterializedWeights(module)
        try:
            shapes = record_shapes(module, input_shape)
            config = MechanismConfig(
                noise_multiplier=float(noise_multiplier),
                sample_rate=poisson_loader.sample_rate,
                expected_batch_size=poisson_loader.expected_batch_size,
                input_norm_bound=float(input_norm_bound),
                loss_lipschitz=float(lipschitz),
                input_shape=input_shape,
                noise_strategy=noise_strategy,
                max_epsilon=max_epsilon,
                target_delta=target_delta,
            )
            self.mechanism = GradientMechanism(
                module, config, self.accountant, self.noise_generator, shapes, materialized,
                reduce_gradients=distributed.gradient_reducer(ddp) if distributed.is_distributed() else None)
            self.mechanism.analysis()  # fail now, not at the first step, if anything cannot be bounded
            # The output hook clips each sample's logit gradient at the constant the bounds use, min(L, clip): a
            # no-op for the declared criterion, and what keeps the bound true if the loss back-propagated is another.
            self._hooks.append(InputGuard(module, input_shape, float(input_norm_bound)).handle)
            self._hooks.append(OutputGradientHook(module, loss_reduction, lipschitz).handle)
        except BaseException:  # leave the user's model as it was
            materialized.detach_from()
            for handle in self._hooks:
                handle.remove()
            self._hooks, self.mechanism = [], None
            raise
        self.model, self.data_loader = module, poisson_loader
        self.optimizer = DPOptimizer(optimizer, self.mechanism)
        return wrapper, self.optimizer, poisson_loader

    def make_private_with_epsilon(
        self, *, target_epsilon: float, target_delta: float, epochs: int, **kwargs
    ) -> tuple[nn.Module, DPOptimizer, PoissonDataLoader]:
        """As ``make_private``, with the smallest noise multiplier that spends at most ``target_epsilon``
        after ``epochs`` epochs (calibrated with this engine's accountant backend), statistics released
        before (``private_mean``) included."""
        if "noise_multiplier" in kwargs:
            raise ValueError("make_private_with_epsilon calibrates noise_multiplier itself; do not pass it")
        loader = kwargs["data_loader"]
        if loader.batch_size is None:
            raise ValueError("data_loader needs a batch_size (the expected Poisson batch size)")
        num_samples = len(loader.dataset)
        if num_samples == 0:
            raise ValueError("the dataset is empty: there is nothing to train on")
        epochs = check_steps(epochs, "epochs", minimum=1)
        sample_rate = loader.batch_size / num_samples
        steps = epochs * max(1, round(num_samples / loader.batch_size))
        sigma = calibrate_noise(target_epsilon, target_delta, sample_rate, steps=steps,
                                backend=self.accountant.backend, spent=self.accountant.history)
        kwargs.setdefault("target_delta", target_delta)
        return self.make_private(noise_multiplier=sigma, **kwargs)

    # ----------------------------------------------------------------------------------------------
    def _require_attached(self) -> GradientMechanism:
        if self.mechanism is None:
            raise RuntimeError("call make_private(...) first")
        return self.mechanism

    @property
    def noise_multiplier(self) -> float:
        return self._require_attached().config.noise_multiplier

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (the accountant's conservative estimate)."""
        return self.accountant.epsilon(delta)

    def sensitivities(self) -> dict[str, float]:
        """Per-parameter Delta used at the last step (materialised-weight names for reparametrised layers)."""
        return dict(self._require_attached().last_sensitivities)

    def noise_stds(self) -> dict[str, float]:
        """Std of the noise added to each parameter's summed gradient at the last step (same keys)."""
        return dict(self._require_attached().last_stds)

    def current_bounds(self):
        """The bound analysis (``BoundReport``) of the current weights, without taking a step."""
        return self._require_attached().analysis()

    def lipschitz_constant(self) -> float:
        """Certified Lipschitz constant of the model with its current weights."""
        mechanism = self._require_attached()
        return lipschitz_constant(self.model, mechanism.config.input_shape)

    def report(self, delta: float | None = None, target_epsilon: float | None = None) -> BudgetReport:
        """Budget report (text, JSON, plot) of the steps taken so far."""
        mechanism = self._require_attached()
        delta = delta if delta is not None else mechanism.config.target_delta
        if delta is None:
            raise ValueError("report() needs a delta (or make_private(..., target_delta=...))")
        target = target_epsilon if target_epsilon is not None else mechanism.config.max_epsilon
        return BudgetReport(self.accountant, delta, self.data_loader.steps_per_epoch, target_epsilon=target)

    @contextlib.contextmanager
    def virtual_batches(self, max_physical_batch_size: int) -> Iterator[Iterator]:
        """Split each Poisson (logical) batch into micro-batches of at most ``max_physical_batch_size``;
        gradients accumulate and the optimizer takes ONE noisy step per logical batch.

            with engine.virtual_batches(256) as batches:
                for x, y in batches:
                    optimizer.zero_grad(); criterion(model(x), y).backward(); optimizer.step()
        """
        self._require_attached()
        if max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
        optimizer = self.optimizer

        def micro_batches():
            for batch in self.data_loader:
                size = len(batch[0])
                chunks = max(1, -(-size // max_physical_batch_size))
                for index in range(chunks):
                    optimizer.skip_next_step = index < chunks - 1
                    start = index * max_physical_batch_size
                    yield [t[start:start + max_physical_batch_size] for t in batch]
                    optimizer.skip_next_step = False  # a zero_grad after the step must clear
            optimizer.skip_next_step = False

        try:
            yield micro_batches()
        finally:
            optimizer.skip_next_step = False

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        mechanism = self._require_attached()
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
            "sampling_generator": self.sampling_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
            "seed": self.seed,
            "noise_multiplier": mechanism.config.noise_multiplier,
            "sample_rate": mechanism.config.sample_rate,
            "noise_strategy": mechanism.config.noise_strategy,
        }

    def save_checkpoint(self, path: str | os.PathLike, **extra) -> Path:
        """Write model, optimizer, accountant history and generator states atomically (temp file, fsync,
        rename, fsync of the folder): the file at ``path`` is always a whole checkpoint, old or new.
        ``extra`` (e.g. epoch=3) is stored alongside and returned by ``load_checkpoint``. Multi-process:
        call it on every rank; rank 0 writes, the others wait for it."""
        path = Path(path)
        if not distributed.is_main_process():
            distributed.barrier()
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        state["extra"] = extra
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)  # make the rename itself durable
            finally:
                os.close(folder)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        distributed.barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> dict:
        """Restore a checkpoint into this (already ``make_private``-d) engine; returns the saved ``extra``."""
        mechanism = self._require_attached()
        state = torch.load(path, weights_only=False)
        if (state["noise_multiplier"], state["sample_rate"]) != (mechanism.config.noise_multiplier,
                                                                   mechanism.config.sample_rate):
            raise ValueError(
                f"checkpoint was trained with noise_multiplier={state['noise_multiplier']}, sample_rate="
                f"{state['sample_rate']}; this engine has {mechanism.config.noise_multiplier}, "
                f"{mechanism.config.sample_rate}. Make the engine private with the same settings to resume."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.accountant.load_state_dict(state["accountant"])
        self.sampling_generator.set_state(state["sampling_generator"])
        self.noise_generator.set_state(state["noise_generator"])
        self.seed = state["seed"]
        mechanism.materialized.invalidate()
        if self.journal is not None:
            self._count_journaled_steps()
        return state.get("extra", {})

    # ----------------------------------------------------------------------------------------------
    def attach_journal(self, path: str | os.PathLike, fsync: bool = True) -> int:
        """Record every future step in the write-ahead journal at ``path`` (``lipdp.journal``), and count the
        steps it holds beyond this engine's accountant. Returns the number of steps so counted.

        Crash-safe resume (steps after the last checkpoint are *counted*, never replayed):

            engine.make_private(...)
            if ckpt.exists():
                engine.load_checkpoint(ckpt)
            engine.attach_journal(lipdp.journal.journal_path(ckpt))  # counts steps lost after ckpt, re-seeds

        (Attached first, the journal is re-read by ``load_checkpoint``, with the same result.)

        Multi-process: call it on every rank with the same (shared) path; only rank 0 writes.
        """
        mechanism = self._require_attached()
        if self.journal is not None:
            raise RuntimeError("a journal is already attached to this engine")
        writer = distributed.is_main_process()
        self.journal = StepJournal(path, fsync=fsync, writable=writer)
        mechanism.journal = self.journal if writer else None
        return self._count_journaled_steps()

    def _count_journaled_steps(self) -> int:
        """Add the journaled steps the accountant has not counted; if any, draw fresh randomness."""
        journal = self.journal
        counted = self.accountant.total_steps
        if journal.entries and journal.last_step < counted:
            raise ValueError(
                f"journal {journal.path} ends at step {journal.last_step} but the accountant has {counted} steps: "
                "it is not this run's journal. Fix: attach the journal written next to this checkpoint."
            )
        missing = journal.entries_after(counted)
        for entry in missing:
            self.accountant.step(noise_multiplier=entry.noise_multiplier, sample_rate=entry.sample_rate)
        if missing:
            logger.warning("counted %d step(s) taken after the checkpoint (journal %s); now %d steps in total",
                           len(missing), journal.path, self.accountant.total_steps)
            self._fresh_randomness()
        return len(missing)

    def _fresh_randomness(self) -> None:
        """Re-seed sampling and noise so no batch or noise draw of a lost (already counted) step is re-used:
        from ``os.urandom`` in secure mode, else derived from (seed, steps counted) to stay reproducible."""
        if self.secure_mode:
            seed = _seed_from_os()
        else:
            digest = hashlib.sha256(f"{self.seed}:{self.accountant.total_steps}".encode()).digest()
            seed = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
        self.seed = distributed.broadcast_seed(seed)
        self.sampling_generator.manual_seed(self.seed)
        self.noise_generator.manual_seed(self.seed + 1)
