"""Private hyper-parameter tuning: a random number of private trials, the best one released (docs/design.md §4).

``tune`` carves a validation part out of the training data (a coin per record, independent of the data), draws the
number of trials K from a declared distribution (``accounting.tuning``: truncated negative binomial or Poisson), and
runs K independent trials, each a whole ``lipdp.training.train_private`` run on the other part with settings drawn
uniformly from a :class:`SearchSpace` (public randomness) and its own seed. Each trial is scored privately: its
count of correct validation predictions plus Gaussian noise (``accounting.tuning.score_noise_multiplier``: its RDP
stays below the training's, and the two parts compose in parallel, so the score costs no ε), over the expected size
of the validation part. The best trial's model, settings and noisy score are the release, and
``TuningResult.epsilon`` (Papernot & Steinke 2022, Theorems 2 and 6) covers it, the search included. The trial count
and the other trials' scores are a log for the data curator: publishing them is covered only by
``TuningResult.naive_epsilon``, the composition of every trial that ran.

Noise: every (epochs, batch size) schedule of the space gets its σ from ``accounting.tuning.calibrate_trial_noise``
before any trial runs. A trial is then asked for the single-run ε (RDP backend) that its σ gives, and
``train_private`` calibrates σ' back from it; RDP's ε is strictly decreasing in σ, so σ' ≥ σ (the trial is checked).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from accounting import PrivacyAccountant
from accounting.history import HistoryEntry
from accounting.tuning import (TrialCount, calibrate_trial_noise, naive_epsilon, single_trial_epsilon,
                               score_noise_multiplier, tuned_epsilon)
from lipdp.datasets import independent_split
from lipdp.evaluation import correct_predictions
from lipdp.training import TrainConfig, train_private

logger = logging.getLogger(__name__)

#: Settings a trial draws; every other TrainConfig field comes from the ``base`` config of :func:`tune`.
TUNED_SETTINGS = ("learning_rate", "temperature", "loss_grad_clip", "epochs", "batch_size")


@dataclass(frozen=True)
class SearchSpace:
    """The choices of each tuned setting; a trial draws each uniformly and independently (``None`` in
    ``loss_grad_clip``: no clipping). Drawing costs no privacy: it does not look at the data."""

    learning_rate: tuple[float, ...]
    temperature: tuple[float, ...]
    loss_grad_clip: tuple[float | None, ...]
    epochs: tuple[int, ...]
    batch_size: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in TUNED_SETTINGS:
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"the search space's {name} must be a non-empty list of choices, got {values!r}. "
                                 f"Fix: give at least one value for {name}")
            object.__setattr__(self, name, tuple(values))
            for value in values:
                if value is None and name == "loss_grad_clip":
                    continue
                integer = name in ("epochs", "batch_size")
                valid = (isinstance(value, int) if integer else isinstance(value, (int, float))) \
                    and not isinstance(value, bool) and math.isfinite(value) and value > 0
                if not valid:
                    kind = "whole numbers >= 1" if integer else "finite numbers > 0"
                    raise ValueError(f"the search space's {name} choices must be {kind}, got {value!r}. "
                                     f"Fix: give {name} as {kind}")
            if len(set(values)) != len(values):
                raise ValueError(f"the search space's {name} repeats a choice: {values!r}. "
                                 f"Fix: list each {name} once (repeats only change the drawing weights)")

    @classmethod
    def around(cls, preset: dict) -> SearchSpace:
        """The default space centred on a ``lipdp.presets`` preset: learning rate and temperature times ½, 1 and
        2, no loss-gradient clip or C = 1 or 0.5, the preset's epochs or half of them, its batch size or twice it.
        No trial takes more steps than the preset's own run, so the search costs about E[K] preset runs of time."""
        epochs, batch = int(preset["epochs"]), int(preset["batch_size"])
        return cls(
            learning_rate=tuple(preset["learning_rate"] * f for f in (0.5, 1.0, 2.0)),
            temperature=tuple(preset["temperature"] * f for f in (0.5, 1.0, 2.0)),
            loss_grad_clip=(None, 1.0, 0.5),
            epochs=tuple(sorted({max(1, epochs // 2), epochs})),
            batch_size=(batch, 2 * batch),
        )

    def schedules(self) -> list[tuple[int, int]]:
        """Every (epochs, batch size) pair a trial can draw: they alone fix its (q, steps)."""
        return list(itertools.product(self.epochs, self.batch_size))

    def draw(self, rng: np.random.Generator) -> dict:
        """One trial's settings, each drawn uniformly among its choices."""
        return {name: getattr(self, name)[int(rng.integers(len(getattr(self, name))))] for name in TUNED_SETTINGS}

    def to_dict(self) -> dict:
        """JSON form: each setting's list of choices."""
        return {name: list(getattr(self, name)) for name in TUNED_SETTINGS}


def schedule_steps(num_samples: int, epochs: int, batch_size: int) -> tuple[float, int]:
    """(q, T) of a run as ``LipDPEngine.make_private_with_epsilon`` accounts it: ``q = B/N``,
    ``T = epochs·max(1, round(N/B))``."""
    return batch_size / num_samples, epochs * max(1, round(num_samples / batch_size))


@dataclass
class Trial:
    """One trial: its settings, private validation score (noisy count of correct predictions over the part's expected
    size), the score's noise (standard deviation, in predictions), noise multiplier, (q, steps) and training time."""

    index: int
    settings: dict
    validation_accuracy: float
    score_noise: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    seed: int
    seconds: float


@dataclass
class TuningResult:
    """The search's outcome. ``model``/``selected`` (None if no trial ran) and the selected trial's settings and
    score are the release covered by ``epsilon``; ``trials`` is the curator's log (covered by ``naive_epsilon``)."""

    epsilon: float  # the whole search, what was spent before it included (Papernot & Steinke 2022)
    delta: float
    trial_epsilon: float  # one trial alone, spent mechanisms included: what a single run would have cost
    naive_epsilon: float  # composition of every trial that ran: the cost of publishing the whole log
    distribution: dict
    search_space: dict
    planned_noise: dict[str, float]  # "epochs x batch" -> the σ the accounting assumes for that schedule
    trials: list[Trial]
    selected: int | None
    seconds: float
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def best(self) -> Trial | None:
        """The selected trial (None if K = 0)."""
        return None if self.selected is None else self.trials[self.selected]

    def to_dict(self) -> dict:
        """JSON form (without the model)."""
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "trials")}
        record["trials"] = len(self.trials)
        record["trial_log"] = [asdict(trial) for trial in self.trials]
        record["best"] = None if self.best is None else asdict(self.best)
        return record


def _key(epochs: int, batch_size: int) -> str:
    return f"{epochs} epochs x batch {batch_size}"


def tune(build_model: Callable[[], nn.Module], train_set: TensorDataset, space: SearchSpace, epsilon: float,
         delta: float, count: TrialCount, *, base: TrainConfig | None = None, validation_fraction: float = 0.2,
         spent: Sequence[HistoryEntry] = (), seed: int = 0, progress: bool = True,
         on_trial: Callable[[Trial, int], None] | None = None) -> TuningResult:
    """Private selection over ``space`` at a total (``epsilon``, ``delta``) that covers the search.

    ``build_model()`` returns a fresh model per trial; ``train_set`` is private and split (``seed``; each record
    joins the validation part with probability ``validation_fraction``) into the trials' training part and the part
    that scores them (private validation accuracy, ties to the earlier trial). K ~ ``count`` (``seed``); each
    trial's settings and seed are drawn from the same generator. ``base`` gives every TrainConfig field the space
    does not tune. ``spent``: mechanisms already released on the same data (paid from the same budget).
    ``on_trial(trial, K)`` is called after each trial (progress reports). As for the noise, the guarantee assumes
    ``seed`` is secret: a known seed reveals K, and the theorem needs K hidden.
    """
    base = base or TrainConfig()
    train, validation = independent_split(train_set, validation_fraction, seed=seed)
    expected_validation = validation_fraction * len(train_set)  # public: N is, as in every sampling rate q = B/N
    n = len(train)
    if max(space.batch_size) > n:
        raise ValueError(f"the search space's batch sizes {space.batch_size} exceed the {n} training samples left "
                         f"after the validation split. Fix: use batch sizes <= {n}")
    shapes = space.schedules()
    planned = calibrate_trial_noise(epsilon, delta, [schedule_steps(n, e, b) for e, b in shapes], count,
                                    spent=spent)
    noise = {shape: entry for shape, entry in zip(shapes, planned, strict=True)}
    rng = np.random.default_rng(seed)
    trials_to_run = count.sample(rng)
    logger.info("private search: %d trials, noise multipliers %s", trials_to_run,
                {_key(*s): round(e.noise_multiplier, 4) for s, e in noise.items()})
    start = time.perf_counter()
    trials: list[Trial] = []
    selected: int | None = None
    best_model: nn.Module | None = None
    for index in range(trials_to_run):
        settings = space.draw(rng)
        trial_seed = int(rng.integers(2 ** 31))
        entry = noise[(settings["epochs"], settings["batch_size"])]
        trial_epsilon = PrivacyAccountant("rdp", history=[entry]).epsilon(delta)
        config = replace(base, **settings, epsilon=trial_epsilon, delta=delta, accountant="rdp", seed=trial_seed)
        began = time.perf_counter()
        torch.manual_seed(trial_seed)  # the trial's initial weights
        model = build_model()
        result, _ = train_private(model, train, None, config, progress=progress)
        if result.noise_multiplier < entry.noise_multiplier or result.steps != entry.steps:
            raise RuntimeError(f"trial {index} ran at sigma={result.noise_multiplier}, {result.steps} steps; the "
                               f"accounting assumed sigma >= {entry.noise_multiplier}, {entry.steps} steps")
        score_noise = score_noise_multiplier(HistoryEntry(result.noise_multiplier, entry.sample_rate, result.steps))
        score = (correct_predictions(model, validation) + rng.normal(0.0, score_noise)) / expected_validation
        trial = Trial(index, settings, score, score_noise, result.noise_multiplier, entry.sample_rate,
                      result.steps, trial_seed, time.perf_counter() - began)
        trials.append(trial)
        if selected is None or trial.validation_accuracy > trials[selected].validation_accuracy:
            selected, best_model = index, model
        if on_trial is not None:
            on_trial(trial, trials_to_run)
    ran = [HistoryEntry(t.noise_multiplier, t.sample_rate, t.steps) for t in trials]
    return TuningResult(
        epsilon=tuned_epsilon(planned, count, delta, spent), delta=delta,
        trial_epsilon=single_trial_epsilon(planned, delta, spent), naive_epsilon=naive_epsilon(ran, delta, spent),
        distribution=count.to_dict(), search_space=space.to_dict(),
        planned_noise={_key(*s): e.noise_multiplier for s, e in noise.items()}, trials=trials,
        selected=selected, seconds=time.perf_counter() - start, model=best_model,
    )
