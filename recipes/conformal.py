"""Private robust conformal prediction: a LipDPEngine-trained certified model, split conformal sets, robust
(lip-rcp) sets certified for every L2 perturbation of radius r, and an eps-DP calibration threshold.

    python -m recipes.conformal --dataset fashion-mnist --alpha 0.1 --radius 0.25 --epsilon 3
    python -m recipes.conformal --dataset digits --epochs 5 --calibration-size 300 --test-size 300

Data (``--calibration-split``, default per data set: ``DEFAULT_CALIBRATION_SPLIT``, else ``evaluated``): the
calibration part of ``--calibration-size`` samples (a fraction, ``CALIBRATION_FRACTION`` by default, or a count) is
cut at random (fixed seed) either from the split the report evaluates (``evaluated``: half of the test split; the
model trains on the whole training split, and calibration and evaluation samples are exchangeable, which is what the
coverage guarantee assumes) or from the training split (``train``: 0.2 of it; for a small test split such as
digits'). Nothing is tuned on the test split: the report reads the rest of it once (``--validation F`` holds out a
fraction F of the training split first and evaluates, and in ``evaluated`` mode calibrates, on it instead, to choose
settings).
Model (``--model``, default per data set: ``DEFAULT_MODEL``, else ``FALLBACK_MODEL``): ``patch``, ``lipdp train``'s
Fashion-MNIST patch CNN on the pixels; ``scattering``, the classification recipe's pipeline with every stage
certified (scattering front end, private centring and whitening, linear head; its constant is the head's times the
preprocessing's, in pixel space); or an orthogonal CNN / MLP on pixels (each network starts with InputNormClip(X0), so
radii are in pixel space). Trained with (eps_train, delta)-DP by ``lipdp.training.train_private`` (certified bounds,
or for the patch CNN / CNN / MLP ``--mechanism clipping``: per-sample clipping on the same model, same accountant;
the model stays 1-Lipschitz either way, so its certificate does not depend on the mechanism).

Conformal (``lipdp.conformal``): non-conformity score s (softmax LAC or sigmoid LAC at temperature tau);
q_hat = s_(ceil((n+1)(1-alpha))) on the calibration part; vanilla sets {y : s(x, y) <= q}; robust sets
{y : lower_rho(x, y) <= q} with rho = Lip(f) r, which keep coverage >= 1 - alpha under any attack of norm <= r;
the private variants replace q_hat by the eps_cal-DP exponential-mechanism threshold with corrected rank.
Evaluation: coverage and mean set size on clean test inputs, and on test inputs attacked by L2 PGD of radius r
maximising the true label's statistic (the score for vanilla sets, its lower bound for robust ones), i.e.
trying to push the true label out of the set.

Privacy: the released model is (eps_train, delta)-DP w.r.t. the training part (the engine's accountant); the
released private threshold is (eps_cal, 0)-DP w.r.t. the calibration part for every fixed model (the model is a
DP release of the other part: adaptive composition). The two parts are disjoint sets fixed before training by a
seeded split. A person whose data lie in one part only changes the input of one mechanism, so the pair
(model, threshold) is (max(eps_train, eps_cal), delta)-DP for them: parallel composition, the headline. Someone
whose data may be in both parts (several records per person, duplicates across parts) gets the sequential sum
(eps_train + eps_cal, delta), also reported. The split is by position with a public seed: it is not part of
either guarantee (as usual, each part is the data set its mechanism protects).
The vanilla and robust rows with the non-private q_hat release a threshold that is NOT private w.r.t. the
calibration part; they are there for comparison.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from lipdp.attacks import l2_pgd
from lipdp.clipping import MECHANISMS
from lipdp.cli.errors import ArgumentParser, UserError, run_main
from lipdp.cli.output import write_json
from lipdp.conformal import (
    DEFAULT_GRID_SIZE,
    conformal_quantile,
    coverage,
    default_grid,
    logit_radius,
    make_score,
    mean_set_size,
    prediction_sets,
    private_conformal_quantile,
    true_label_scores,
)
from lipdp.datasets import load_dataset, train_validation_split
from lipdp.engine import LipDPEngine
from lipdp.evaluation import predict
from lipdp.models import orthogonal_network
from lipdp.presets import TRAIN_PRESETS, training_settings
from lipdp.training import TrainConfig, TrainResult, train_private
from recipes import classify
from recipes.front_end import front_end_features, release_preprocessing

logger = logging.getLogger(__name__)


#: Each model's settings. ``scattering``: the classification recipe's certified pipeline (its defaults,
#: recipes.classify.DEFAULTS, with the ``lipschitz`` normalisation), rows divided by ``feature_radius`` c before the
#: private releases. ``patch``: ``lipdp train``'s Fashion-MNIST network and preset (one stage of 4 patch channels,
#: X0 = 10, logit clip 1) at tau = 2, which gave smaller robust sets than its tau = 4 (README), trained for 48 epochs
#: (validation: 12 / 24 / 48 / 96 epochs 1.45 / 1.43 / 1.41 / 1.41 labels; B 4096 at 48 / 96 epochs 1.43 / 1.41; README)
#: with per-sample clipping at C = 4, whose robust sets were smaller than the certified bounds' (README). ``cnn``: the
#: orthogonal CNN on pixels (the recipe's earlier default). ``mlp``: the orthogonal MLP
#: of ``lipdp train``'s digits preset, with X0 = 4 (the images' typical norm is 3.9: X0 = 1 shrank them, and their
#: margins, ~4x against the radius), tau = 4 and per-sample clipping at C = 1.
MODEL_SETTINGS = {
    "scattering": dict(model="scattering", widths=(), epochs=classify.DEFAULTS["epochs"],
                       batch_size=classify.DEFAULTS["batch_size"], learning_rate=classify.DEFAULTS["learning_rate"],
                       temperature=classify.DEFAULTS["temperature"], input_norm_bound=1.0, mechanism="bounds",
                       max_grad_norm=None, feature_radius=classify.RADIUS,
                       loss_grad_clip=classify.DEFAULTS["loss_grad_clip"], margin=0.0, weight_averaging=None),
    "patch": dict(model="patch", widths=TRAIN_PRESETS["fashion-mnist"]["widths"],
                  **training_settings(TRAIN_PRESETS["fashion-mnist"]), mechanism="clipping", max_grad_norm=4.0,
                  feature_radius=None, margin=0.0, weight_averaging=None) | dict(temperature=2.0, epochs=48),
    "cnn": dict(model="cnn", widths=(16, 32, 64), epochs=8, batch_size=1024, learning_rate=1e-2, temperature=2.0,
                input_norm_bound=10.0, mechanism="bounds", max_grad_norm=None, feature_radius=None,
                loss_grad_clip=None, margin=0.0, weight_averaging=None),
    "mlp": dict(model="mlp", widths=(64,), epochs=30, batch_size=256, learning_rate=5e-2, temperature=4.0,
                input_norm_bound=4.0, mechanism="clipping", max_grad_norm=1.0, feature_radius=None,
                loss_grad_clip=None, margin=0.0, weight_averaging=None),
}
MODELS = tuple(MODEL_SETTINGS)
#: The default model per data set, chosen with ``--validation 0.2`` (seed 0, calibration eps 3) by the smallest
#: private robust sets (README). Fashion-MNIST (the fallback): the patch CNN (4 channels, tau 2) with per-sample
#: clipping at C = 4 for 12 epochs 1.49 labels at 82.4% clean accuracy, 48 epochs (later, calibrating on half the
#: validation part) 1.41 at 83.9% (6 epochs: C = 2 / 4 / 8 1.55 / 1.53 / 1.56;
#: C = 4 at tau 4 1.56; the certified bounds 1.66 at 82.3%; before the per-image centring, with the bounds: 1.72 at
#: 81.0%, tau 4 1.88 at 82.7%); scattering (c = 32) 3.01 labels at 76.8%, c = 64 3.05, c = 32 with the
#: sigmoid score 3.92, the CNN 5.68 at 55.8%. Digits (1,437 training images, where the CNN stays near
#: chance): X0 / tau / mechanism 1 / 8 / bounds 9.92 labels (the old preset), 4 / 2 / bounds 5.32, 4 / 4 / bounds
#: 5.52, 4 / 4 / clipping 2.53 (C = 0.5: 2.57, C = 2: 2.53), 4 / 2 / clipping 2.79, 2 / 4 / clipping 5.69.
DEFAULT_MODEL = {"digits": "mlp"}
FALLBACK_MODEL = "patch"
#: Where the calibration part is cut (module docstring), and its default fraction of that split. Digits keeps
#: ``train``: its test split (360 images) halved would leave 180 to calibrate and 180 to evaluate.
CALIBRATION_FRACTION = {"evaluated": 0.5, "train": 0.2}
CALIBRATION_SPLITS = tuple(CALIBRATION_FRACTION)
DEFAULT_CALIBRATION_SPLIT = {"digits": "train"}
FALLBACK_CALIBRATION_SPLIT = "evaluated"


def calibration_count(size: float, available: int, split: str) -> int:
    """Samples held out for calibration: ``size`` as a fraction of ``available`` if below 1, else as a count; at
    least 1 and leaving at least 1 of the ``split``'s samples for the other use."""
    count = round(size * available) if 0 < size < 1 else int(size)
    if size <= 0 or (size >= 1 and size != int(size)) or not 1 <= count < available:
        raise UserError(f"--calibration-size {size:g} does not fit the {available} {split} samples.",
                        f"give a fraction in (0, 1), e.g. 0.1, or a count below {available}")
    return count


def _subset(dataset: TensorDataset, size: int | None, seed: int) -> TensorDataset:
    """The first ``size`` samples of a seeded permutation (all of them if size is None)."""
    x, y = dataset.tensors
    if size is None or size >= len(x):
        return TensorDataset(x, y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return TensorDataset(x[order], y[order])


class PixelLogits(nn.Module):
    """Images -> logits of a head on the certified front end (``recipes.classify.logits_of_pixels``)."""

    def __init__(self, head: nn.Module, logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.head, self.logits = head, logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)


def train_scattering_pipeline(train: TensorDataset, evaluation: TensorDataset, num_classes: int,
                              config: TrainConfig, feature_radius: float, progress: bool
                              ) -> tuple[PixelLogits, TrainResult, float]:
    """The classification recipe's certified pipeline trained on ``train``'s images: the default front end with the
    ``lipschitz`` normalisation (radius c = ``feature_radius``), its private centring and whitening, and the
    linear head, all paid from ``config``'s (epsilon, delta). Returns the pixels -> logits module, the training
    result and the pipeline's certified Lipschitz constant in pixel space (head x preprocessing; front end 1)."""
    groups, front_end = classify.DEFAULTS["groups"], classify.DEFAULT_FRONT_END
    order_weights = classify.ORDER_WEIGHTS
    (x, y), (x_eval, y_eval) = train.tensors, evaluation.tensors
    rows, blocks = front_end_features(front_end, x, groups, normalisation="lipschitz", order_weights=order_weights)
    engine = LipDPEngine(accountant=config.accountant, seed=config.seed)
    preprocessing, rows = release_preprocessing(
        engine, rows, blocks, classify.DEFAULTS["centring_noise"], classify.DEFAULTS["whitening_noise"],
        classify.DEFAULTS["whitening_floor"], feature_radius)
    eval_rows = preprocessing(front_end_features(front_end, x_eval, groups, normalisation="lipschitz",
                                                 order_weights=order_weights)[0])
    head = classify.build_model("linear", (rows.shape[1],), num_classes)
    result, engine = train_private(head, TensorDataset(rows, y), TensorDataset(eval_rows, y_eval), config,
                                   progress=progress, engine=engine)
    lipschitz = engine.lipschitz_constant() * preprocessing.lipschitz()
    released, logits = classify.released_logits(head, "linear", (rows.shape[1],), num_classes, front_end, groups,
                                                tuple(x.shape[1:]), preprocessing, "lipschitz", order_weights)
    return PixelLogits(released, logits), result, lipschitz


def _attack(model: nn.Module, statistic: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
            radius: float, steps: int, batch_size: int, seed: int, progress: bool, name: str) -> torch.Tensor:
    """L2 PGD of radius ``radius`` maximising statistic(logits)[i, y_i] (pushes the true label out of the set)."""
    generator = torch.Generator().manual_seed(seed)
    attacked = []
    for start in tqdm(range(0, len(x), batch_size), desc=f"attack ({name})", disable=not progress, leave=False):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        attacked.append(l2_pgd(lambda inputs: true_label_scores(statistic(model(inputs)), yb), xb, radius,
                               steps=steps, generator=generator))
    return torch.cat(attacked)


def run(dataset: str = "fashion-mnist", alpha: float = 0.1, radius: float = 0.25, epsilon: float = 3.0,
        delta: float = 1e-5, calibration_epsilon: float | None = None, calibration_size: float | None = None,
        calibration_split: str | None = None, test_size: int | None = None, score: str = "softmax",
        score_temperature: float | None = None, score_bias: float = 0.0, grid_size: int = DEFAULT_GRID_SIZE,
        attack_steps: int = 10, seed: int = 0,
        data_root: str | None = None, progress: bool = True, validation: float | None = None,
        **model_settings) -> dict:
    """Train privately, calibrate, evaluate; returns every number of the report (see module docstring).
    ``calibration_epsilon``: the threshold's budget (default: ``epsilon``, so that the pair is (epsilon, delta)-DP for
    a person in one part, by parallel composition).
    ``calibration_split``: ``"evaluated"`` or ``"train"``, the split the calibration part is cut from (default: the
    data set's ``DEFAULT_CALIBRATION_SPLIT``, else ``FALLBACK_CALIBRATION_SPLIT``). ``calibration_size``: a fraction
    of that split in (0, 1) (default ``CALIBRATION_FRACTION`` of it), or a number of samples. ``validation``: a
    fraction of the training split held out (before calibration is cut) and evaluated instead of the test split, to
    choose settings without reading it. ``test_size``: evaluate a seeded subset of that many of the evaluated
    samples left after calibration (None: all). ``model_settings`` (model, widths, epochs, batch_size, learning_rate,
    temperature, input_norm_bound, mechanism, max_grad_norm, feature_radius, loss_grad_clip, margin,
    weight_averaging) override the
    data set's model's ``MODEL_SETTINGS`` (the model: ``DEFAULT_MODEL`` of the data set, else ``FALLBACK_MODEL``)."""
    unknown = set(model_settings) - set(MODEL_SETTINGS[FALLBACK_MODEL])
    if unknown:
        raise TypeError(f"run() got unexpected settings {sorted(unknown)}")
    if validation is not None and not 0 < validation < 1:
        raise UserError(f"--validation {validation:g} is not a fraction.", "give a fraction in (0, 1), e.g. 0.2")
    calibration_epsilon = epsilon if calibration_epsilon is None else calibration_epsilon
    model = model_settings.get("model") or DEFAULT_MODEL.get(dataset, FALLBACK_MODEL)
    if model not in MODEL_SETTINGS:
        raise UserError(f"--model {model} is not a model of this recipe.", f"use one of {', '.join(MODELS)}")
    settings = {**MODEL_SETTINGS[model], **{k: v for k, v in model_settings.items() if v is not None}}
    if settings["model"] == "scattering" and settings["mechanism"] != "bounds":
        raise UserError("--model scattering trains its linear head with the certified bounds only.",
                        "drop --mechanism clipping, or use --model patch / cnn / mlp")
    if settings["feature_radius"] is not None and settings["model"] != "scattering":
        raise UserError("--feature-radius is the radius c of --model scattering's normalisation.",
                        "drop --feature-radius, or add --model scattering")
    if settings["mechanism"] == "bounds":
        if model_settings.get("max_grad_norm") is not None:
            raise UserError("--max-grad-norm is the clipping norm of --mechanism clipping; the certified mechanism "
                            "clips no per-sample gradient.", "drop --max-grad-norm, or add --mechanism clipping")
        settings["max_grad_norm"] = None  # a preset's clipping norm belongs to its clipping mechanism
    elif settings["max_grad_norm"] is None:
        raise UserError("--mechanism clipping needs a clipping norm.", "add --max-grad-norm C, e.g. 1")
    epochs, batch_size, learning_rate = settings["epochs"], settings["batch_size"], settings["learning_rate"]
    temperature, input_norm_bound, widths = settings["temperature"], settings["input_norm_bound"], settings["widths"]
    calibration_split = calibration_split or DEFAULT_CALIBRATION_SPLIT.get(dataset, FALLBACK_CALIBRATION_SPLIT)
    if calibration_split not in CALIBRATION_SPLITS:
        raise UserError(f"--calibration-split {calibration_split} is not a split of this recipe.",
                        f"use one of {', '.join(CALIBRATION_SPLITS)}")
    calibration_size = CALIBRATION_FRACTION[calibration_split] if calibration_size is None else calibration_size
    splits = load_dataset(dataset, root=data_root, seed=seed)
    train, evaluated = splits.train, splits.test
    if validation is not None:
        train, evaluated = train_validation_split(splits.train, validation, seed=seed + 1)
    if calibration_split == "train":
        n_calibration = calibration_count(calibration_size, len(train), "training")
        train, calibration = train_validation_split(train, n_calibration / len(train), seed=seed)
    else:
        n_calibration = calibration_count(calibration_size, len(evaluated),
                                          "test" if validation is None else "validation")
        evaluated, calibration = train_validation_split(evaluated, n_calibration / len(evaluated), seed=seed)
    test = _subset(evaluated, test_size, seed)

    torch.manual_seed(seed)
    scattering = settings["model"] == "scattering"
    config = TrainConfig(epsilon=epsilon, delta=delta, epochs=epochs, batch_size=min(batch_size, len(train)),
                         learning_rate=learning_rate, temperature=temperature, input_norm_bound=input_norm_bound,
                         mechanism=settings["mechanism"], max_grad_norm=settings["max_grad_norm"], seed=seed,
                         loss_grad_clip=settings["loss_grad_clip"] or None, margin=settings["margin"],
                         weight_averaging=settings["weight_averaging"],
                         **({"noise_strategy": classify.DEFAULTS["noise_strategy"]} if scattering else {}))
    if scattering:
        model, trained, lipschitz = train_scattering_pipeline(train, test, splits.num_classes, config,
                                                              settings["feature_radius"], progress)
    else:
        model = orthogonal_network(settings["model"], splits.input_shape, splits.num_classes, widths,
                                   input_norm_bound=input_norm_bound)
        trained, engine = train_private(model, train, test, config, progress=progress)
        model.eval()
        lipschitz = engine.lipschitz_constant()
    rho = logit_radius(lipschitz, radius)

    conformity = make_score(score, temperature if score_temperature is None else score_temperature, score_bias)
    x_cal, y_cal = calibration.tensors
    x_test, y_test = test.tensors
    cal_scores = true_label_scores(conformity(predict(model, x_cal, 1000)), y_cal)
    thresholds = {"non-private": conformal_quantile(cal_scores, alpha)}
    release = private_conformal_quantile(cal_scores, alpha, calibration_epsilon, grid=default_grid(grid_size),
                                         generator=np.random.default_rng(seed))
    thresholds["private"] = release.threshold

    statistics = {
        "vanilla": conformity,
        "robust": lambda logits: conformity.bounds(logits, rho).lower,
    }
    clean_logits = predict(model, x_test, 1000)
    rows, sets = [], {}
    for kind, statistic in statistics.items():
        attacked = _attack(model, statistic, x_test, y_test, radius, attack_steps, 500, seed, progress, kind)
        with torch.no_grad():
            clean_stat, attacked_stat = statistic(clean_logits), statistic(predict(model, attacked, 1000))
        for calibration_kind, threshold in thresholds.items():
            clean_sets = prediction_sets(clean_stat, threshold)
            attacked_sets = prediction_sets(attacked_stat, threshold)
            sets[kind, calibration_kind] = clean_sets, attacked_sets
            rows.append({
                "sets": kind, "threshold": calibration_kind, "q": threshold,
                "clean_coverage": coverage(clean_sets, y_test), "clean_size": mean_set_size(clean_sets),
                "attacked_coverage": coverage(attacked_sets, y_test), "attacked_size": mean_set_size(attacked_sets),
                "calibration_epsilon": calibration_epsilon if calibration_kind == "private" else None,
            })
    # The certificate, checked pointwise: a label in the clean vanilla set must stay in the attacked robust set.
    violations = {calibration_kind: int((sets["vanilla", calibration_kind][0] & ~sets["robust", calibration_kind][1])
                                        .any(dim=1).sum())
                  for calibration_kind in thresholds}
    return {
        "dataset": dataset, "evaluated": "test" if validation is None else "validation",
        "calibration_split": calibration_split,
        "certificate_violations": violations, "description": splits.description, "alpha": alpha, "radius": radius,
        "score": repr(conformity), "lipschitz": lipschitz, "logit_radius": rho, "score_lipschitz": conformity.lipschitz,
        "sizes": {"train": len(train), "calibration": len(calibration), "test": len(test)},
        "train": {"epsilon": trained.epsilon, "delta": delta, "noise_multiplier": trained.noise_multiplier,
                  "steps": trained.steps, "seconds": trained.seconds, "config": vars(config)},
        "clean_accuracy": (clean_logits.argmax(dim=1) == y_test).float().mean().item(),
        "calibration": {"epsilon": calibration_epsilon, "delta": 0.0, "gamma": release.plan.gamma,
                        "rank": release.plan.rank, "target_rank": release.plan.target, "grid_size": grid_size,
                        "non_private_rank": int(np.ceil((len(calibration) + 1) * (1 - alpha)))},
        "privacy": {"train_epsilon": trained.epsilon, "calibration_epsilon": calibration_epsilon, "delta": delta,
                    "parallel_composition_epsilon": max(trained.epsilon, calibration_epsilon),
                    "sequential_composition_epsilon": trained.epsilon + calibration_epsilon},
        "rows": rows, "seed": seed,
    }


def markdown_table(result: dict) -> str:
    """The report's table: one row per (sets, threshold) variant."""
    eps_train = result["privacy"]["train_epsilon"]
    lines = [
        f"| sets | threshold q | clean coverage | clean size | attacked coverage (r={result['radius']}) | "
        "attacked size | eps train | eps calibration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        eps_cal = "not private" if row["calibration_epsilon"] is None else f"{row['calibration_epsilon']:g}"
        lines.append(
            f"| {row['sets']} | {row['threshold']} ({row['q']:.4f}) | {row['clean_coverage']:.4f} | "
            f"{row['clean_size']:.3f} | {row['attacked_coverage']:.4f} | {row['attacked_size']:.3f} | "
            f"{eps_train:.3f} | {eps_cal} |"
        )
    privacy = result["privacy"]
    lines.append("")
    lines.append(
        f"Target coverage {1 - result['alpha']:g}. Private sets: training (eps={privacy['train_epsilon']:.3f}, "
        f"delta={privacy['delta']:g}) + calibration (eps={privacy['calibration_epsilon']:g}, delta=0) on disjoint "
        f"parts: parallel composition eps={privacy['parallel_composition_epsilon']:.3f} for a person in one part; "
        f"sequential eps={privacy['sequential_composition_epsilon']:.3f} for a person who may be in both."
    )
    lines.append(
        f"Certificate violations (a clean vanilla label missing from the attacked robust set): "
        f"{result['certificate_violations']}."
    )
    lines.append(
        f"Clean accuracy {result['clean_accuracy']:.4f}; certified Lip(f)={result['lipschitz']:.4f}, logit radius "
        f"rho={result['logit_radius']:.4f}, {result['score']} (Lipschitz {result['score_lipschitz']:.4f} in the "
        f"logits); sizes {result['sizes']}."
    )
    return "\n".join(lines)


PROG = "python -m recipes.conformal"


def build_parser() -> ArgumentParser:
    """The recipe's flags (one-line errors, exit status 2: ``lipdp.cli.errors``)."""
    parser = ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", help="image data set (fashion-mnist, digits, ...)")
    parser.add_argument("--data-root", default=None, help="folder holding the data set's files (optional)")
    parser.add_argument("--alpha", type=float, default=0.1, help="miscoverage level: target coverage 1 - alpha")
    parser.add_argument("--radius", type=float, default=0.25,
                        help="L2 radius r of the input perturbations (pixel space, pixels in [0, 1])")
    parser.add_argument("--epsilon", type=float, default=3.0, help="training privacy budget eps_train")
    parser.add_argument("--delta", type=float, default=1e-5, help="training delta")
    parser.add_argument("--calibration-epsilon", type=float, default=None,
                        help="privacy budget of the private calibration threshold (pure eps-DP; default: --epsilon, "
                             "which keeps the headline at eps_train for a person in one part)")
    parser.add_argument("--calibration-split", choices=CALIBRATION_SPLITS, default=None,
                        help="where the calibration part is cut: from the evaluated split (the test split, or the "
                             "--validation part; the model trains on the whole training split) or from the "
                             "training split; default: train on digits, else evaluated (DEFAULT_CALIBRATION_SPLIT)")
    parser.add_argument("--calibration-size", type=float, default=None,
                        help="calibration samples (public size n): a fraction in (0, 1) of --calibration-split, or "
                             "a count (default: "
                             + ", ".join(f"{f:g} of {split}" for split, f in CALIBRATION_FRACTION.items()) + ")")
    parser.add_argument("--test-size", type=int, default=0,
                        help="evaluated samples left after calibration that the report reads (a seeded subset, to "
                             "cut the PGD attack's cost); default 0 = all")
    parser.add_argument("--score", choices=("softmax", "sigmoid"), default="softmax",
                        help="non-conformity score: 1 - softmax(tau z)_y or 1 - sigmoid(tau z_y - b)")
    parser.add_argument("--score-temperature", type=float, default=None,
                        help="score temperature tau (default: the training temperature)")
    parser.add_argument("--score-bias", type=float, default=0.0, help="bias b of the sigmoid score")
    parser.add_argument("--grid-size", type=int, default=DEFAULT_GRID_SIZE,
                        help="thresholds of the private quantile's grid (a coarser grid needs a smaller rank "
                             "correction; default: %(default)s)")
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="patch CNN, orthogonal CNN or MLP on pixels, or scattering: the classification recipe's "
                             "certified pipeline (certified scattering front end, private centring and whitening, "
                             "linear head; certified in pixel space); default: mlp on digits, else patch "
                             "(DEFAULT_MODEL)")
    parser.add_argument("--feature-radius", type=float, default=None, metavar="C",
                        help=f"--model scattering: rows divided by c before the releases (default "
                             f"{classify.RADIUS:g}, recipes.classify.RADIUS): larger c, smaller Lipschitz constant")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the data set's)")
    parser.add_argument("--batch-size", type=int, default=None, help="expected Poisson batch size (default: the data "
                                                                     "set's)")
    parser.add_argument("--lr", dest="learning_rate", type=float, default=None, help="Adam learning rate")
    parser.add_argument("--temperature", type=float, default=None, help="training cross-entropy temperature")
    parser.add_argument("--input-norm-bound", type=float, default=None,
                        help="X0: each input is clipped to this L2 norm by the model's first layer (a fixed constant; "
                             "default: the data set's)")
    parser.add_argument("--margin", type=float, default=None, metavar="M",
                        help="logit margin of the training cross-entropy (added to every logit but the true one; "
                             "default: the model's)")
    parser.add_argument("--weight-averaging", type=float, default=None, metavar="DECAY",
                        help="release the EMA of the iterates with this decay, e.g. 0.9 (post-processing: no "
                             "privacy cost; default: the model's, none)")
    parser.add_argument("--loss-grad-clip", type=float, default=None, metavar="C",
                        help="clip each sample's logit gradient to this norm (no per-sample work; 0 = none; "
                             "default: the model's)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="channels of the CNN's stages, or the MLP's hidden widths (default: the data set's)")
    parser.add_argument("--mechanism", choices=MECHANISMS, default=None,
                        help="bounds (certified, no per-sample work) or clipping (DP-SGD's per-sample clipping on the "
                             "same model; needs --max-grad-norm); default: the data set's")
    parser.add_argument("--max-grad-norm", type=float, default=None, metavar="C",
                        help="with --mechanism clipping: the norm each record's gradient is clipped to")
    parser.add_argument("--validation", type=float, default=None, metavar="FRACTION",
                        help="hold out this fraction of the training split and report on it instead of the test "
                             "split (to choose settings)")
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps of the L2 attack")
    parser.add_argument("--seed", type=int, default=0, help="seed of split, init, sampling, noise, mechanism, attack")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the full result as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def run_from_arguments(args: argparse.Namespace) -> int:
    """Run the recipe for parsed ``args``: print the table, write ``--json``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(
        dataset=args.dataset, alpha=args.alpha, radius=args.radius, epsilon=args.epsilon, delta=args.delta,
        calibration_epsilon=args.calibration_epsilon, calibration_size=args.calibration_size,
        calibration_split=args.calibration_split, test_size=args.test_size or None, score=args.score, score_temperature=args.score_temperature,
        score_bias=args.score_bias, grid_size=args.grid_size, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, temperature=args.temperature, input_norm_bound=args.input_norm_bound,
        widths=args.widths and tuple(args.widths), model=args.model, mechanism=args.mechanism,
        max_grad_norm=args.max_grad_norm, feature_radius=args.feature_radius, loss_grad_clip=args.loss_grad_clip,
        margin=args.margin, weight_averaging=args.weight_averaging, attack_steps=args.attack_steps,
        seed=args.seed, data_root=args.data_root,
        progress=not args.no_progress, validation=args.validation,
    )
    print(markdown_table(result))
    if args.json:
        write_json(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m recipes.conformal``: returns the exit status (2 with one line for a user error)."""
    return run_main(PROG, build_parser, run_from_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
