"""Private one-class classification with 1-Lipschitz detectors (OCSDF, private subspace), certified AUROC.

    python -m recipes.one_class --dataset breast_cancer --normal-class 1 --epsilon 8 --seeds 0 1 2
    python -m recipes.one_class --dataset fashion-mnist --normal-class all --epsilon 8 --split test

Fits a 1-Lipschitz detector f on the normal class of the training split only, privately through ``LipDPEngine``
when ``--epsilon`` is given, and reports on held-out normals vs. every other class: AUROC, certified AUROC at L2
radii (in the model's input space, with the raw-unit equivalent where the preprocessing has a global Lipschitz
constant), optionally the AUROC under an L2 PGD attack of the same radius (never below the certificate), the same
detector fitted without privacy and an IsolationForest, both for reference.

Detectors (``--detector``; default ``subspace`` for images, ``ocsdf`` for tables, chosen on validation, README):
  * ``ocsdf``: a signed distance function (an orthogonal MLP) trained by private steps against generated negatives
    (they depend on the model alone, lipdp.one_class.training). On tables its input is the preprocessed sample; on
    images (``--features scattering``) it is the subspace coordinates of the certified scattering rows,
    ``(P^T (x - mu), ||(I - P P^T)(x - mu)||)``, from the same two releases as the subspace detector, which spend
    ``--release-fraction`` of epsilon (lipdp.one_class.SubspaceCoordinates, 1-Lipschitz); ``--features input``
    trains an orthogonal CNN on the pixels instead;
  * ``subspace``: minus the distance to the normal rows' principal subspace, from their private mean and centred
    second moment (two Gaussian releases, lipdp.one_class.subspace). On images its rows are the certified
    1-Lipschitz scattering rows of recipes.front_end (``--features scattering``), so radii stay in pixel units.

Evaluation data (``--split``): ``validation`` holds out ``--validation-fraction`` of the training split (tune
here); ``test`` trains on the whole training split and evaluates on the test split (report here only).

Preprocessing (``--preprocess``, all per-sample maps with fixed constants, free in privacy, docs/design.md §2):
  * ``scale``:  x -> s x, then clipped to norm X (images: pixels / 255 from the loader); raw radius = r / s.
  * ``sphere``: x -> X x / ||x||; every sample on the sphere of radius X (no global raw-unit radius).
  * ``lift``:   x -> X [x, c] / ||[x, c]||, one extra coordinate c: every sample on the sphere of radius X
                in dimension d + 1, and the sample's norm survives as an angle. The map is (X / c)-Lipschitz
                (v -> v / ||v|| is 1/c-Lipschitz outside the ball of radius c), so radius r in the model's
                input certifies radius r c / X in the loader's units (log1p units for sklearn tables; since
                log1p is 1-Lipschitz on [0, inf), also in the raw measurements' units).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.ensemble import IsolationForest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear

from accounting import calibrate_noise
from benchmarks.report import load_average, machine_paragraph, write_section
from lipdp.averaging import WeightAverage
from lipdp.bounds import lipschitz_constant
from lipdp.cli.errors import ArgumentParser, UserError, run_main
from lipdp.cli.output import write_json
from lipdp.datasets import load_dataset, train_validation_split
from lipdp.engine import LipDPEngine
from lipdp.layers import InputNormClip, L2NormPool2d
from lipdp.models import orthogonal_cnn, orthogonal_mlp
from lipdp.one_class import (
    BallPrior,
    BoxPrior,
    NegativeSampler,
    OneClassHKR,
    SubspaceCoordinates,
    SubspaceResidual,
    attacked_auroc,
    auroc,
    certified_auroc,
    fit_private_subspace,
    fit_subspace,
    scores,
    train_ocsdf,
)
from lipdp.scattering import scattering_features
from recipes.front_end import Scatter, differentiable_scatter, front_end_features

log = logging.getLogger("recipes.one_class")

# Loader units -> raw units of the data set's pixels (the loaders divide by these fixed constants).
RAW_PIXEL_SCALE = {"fashion-mnist": 255.0, "digits": 16.0, "cifar10": 255.0}


PROG = "python -m recipes.one_class"
DETECTORS = ("ocsdf", "subspace")
#: The subspace detector's defaults, chosen on the validation splits of Fashion-MNIST and digits (README, one-class);
#: on tables the rank is capped at a third of the features (breast_cancer's best of 3 / 10 / 20 on validation: 10).
SUBSPACE_RANK = 40
SUBSPACE_CLIP_FRACTION = 0.35
#: OCSDF on the subspace coordinates of the scattering rows (images): defaults chosen on the validation split of
#: Fashion-MNIST at epsilon = 8 (README, one-class). Each flag left unset takes the value here on images and the
#: tabular default otherwise.
COORDINATE_OCSDF = {"rank": 10, "lam": 0.0, "hidden": [128, 128], "batch_size": 1024, "epochs": 20,
                    "newton_steps": 8, "release_fraction": 0.75}
TABULAR_OCSDF = {"lam": 0.3, "hidden": [64, 64], "batch_size": 64, "newton_steps": 4}


def build_parser() -> ArgumentParser:
    """The recipe's flags (one-line errors, exit status 2: ``lipdp.cli.errors``)."""
    p = ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="breast_cancer",
                      help="a lipdp.datasets name (breast_cancer, wine, digits, fashion-mnist, adult, ...)")
    data.add_argument("--data-root", default=None, help="folder with the data set's files (else standard places)")
    data.add_argument("--normal-class", nargs="+", default=["1"],
                      help="label(s) of the normal class, one run each; 'all' = every class (one-vs-rest). "
                           "breast_cancer: 1 = benign")
    data.add_argument("--split", choices=("validation", "test"), default="validation",
                      help="evaluate on a validation part of the training split (tuning) or on the test split")
    data.add_argument("--validation-fraction", type=float, default=0.25,
                      help="share of the training split held out with --split validation")
    data.add_argument("--data-seed", type=int, default=0, help="seed of the train/test and train/validation splits")
    data.add_argument("--preprocess", choices=("scale", "sphere", "lift"), default=None,
                      help="per-sample input map (module doc); default: lift for tables, scale for images")
    data.add_argument("--input-norm", type=float, default=None,
                      help="X: radius of the sphere (sphere, lift), or the model's input clipping norm (scale); "
                           "default: 30 for tables, sqrt(C H W) for images (the norm of an all-ones image)")
    data.add_argument("--scale", type=float, default=1.0, help="constant factor s of --preprocess scale")
    data.add_argument("--lift-constant", type=float, default=10.0, help="c, the extra coordinate of --preprocess lift")

    detector = p.add_argument_group("detector")
    detector.add_argument("--detector", choices=DETECTORS, default=None,
                          help="ocsdf: signed distance function trained against generated negatives; subspace: "
                               "distance to the private principal subspace (module doc); default: subspace for "
                               "images, ocsdf for tables")
    detector.add_argument("--features", choices=("scattering", "input"), default=None,
                          help="rows of the detector: the certified 1-Lipschitz scattering rows of the images "
                               "(recipes.front_end, lipschitz normalisation; OCSDF then takes their subspace "
                               "coordinates) or the model input itself; default: scattering for images, input for "
                               "tables")
    detector.add_argument("--rank", type=int, default=None,
                          help=f"k, the subspace's dimension; default: {SUBSPACE_RANK} for the subspace detector, "
                               f"{COORDINATE_OCSDF['rank']} for OCSDF's coordinates, at most a third of the rows' "
                               "features")
    detector.add_argument("--clip-fraction", type=float, default=SUBSPACE_CLIP_FRACTION,
                          help="the subspace releases clip rows, then centred rows, to R = this fraction of X "
                               "(--input-norm; the rows of a 1-Lipschitz map of inputs of norm <= X have norm <= X)")
    detector.add_argument("--release-fraction", type=float, default=None,
                          help="OCSDF on scattering rows: the share of --epsilon spent on the subspace's two releases "
                               f"(the training spends the rest); default: {COORDINATE_OCSDF['release_fraction']}")

    model = p.add_argument_group("OCSDF model and loss")
    model.add_argument("--hidden", type=int, nargs="*", default=None,
                       help=f"MLP hidden widths; default: {TABULAR_OCSDF['hidden']} (tables), "
                            f"{COORDINATE_OCSDF['hidden']} (scattering coordinates)")
    model.add_argument("--widths", type=int, nargs="+", default=[8, 16],
                       help="CNN stages (images): orthogonal 3x3 conv -> MaxMin -> 2x2 L2-norm pooling, per width")
    model.add_argument("--cnn-head", choices=("dense", "global"), default="dense",
                       help="dense: flatten -> orthogonal dense -> MaxMin -> orthogonal dense (keeps where things "
                            "are); global: lipdp.models.orthogonal_cnn (global L2 pooling -> orthogonal linear)")
    model.add_argument("--cnn-hidden", type=int, default=64, help="width of the dense head's hidden layer")
    model.add_argument("--margin", type=float, default=None, help="HKR hinge margin m; default: 0.2 for tables, "
                       "1 for images (chosen on validation splits of breast_cancer and Fashion-MNIST class 0)")
    model.add_argument("--lam", type=float, default=None,
                       help="HKR hinge weight lambda; the loss Lipschitz constant, hence the noise, is 1 + lambda; "
                            f"default: {TABULAR_OCSDF['lam']} ({COORDINATE_OCSDF['lam']} on scattering coordinates)")

    neg = p.add_argument_group("negatives (public: they depend on the model alone)")
    neg.add_argument("--prior", choices=("box", "ball", "sphere"), default=None,
                     help="Q_0: uniform in [--prior-low, --prior-high]^d, in the ball of radius X, or on its "
                          "sphere; default: sphere for tables, box (pixels in [0, 1]) for images")
    neg.add_argument("--prior-low", type=float, default=0.0, help="box prior lower corner (a public constant)")
    neg.add_argument("--prior-high", type=float, default=1.0, help="box prior upper corner (a public constant)")
    neg.add_argument("--no-fold", dest="fold", action="store_false",
                     help="do not fold ball/sphere negatives into the non-negative orthant (folding assumes, "
                          "publicly, non-negative features, as log1p of measurements and pixels are)")
    neg.add_argument("--newton-steps", type=int, default=None,
                     help=f"T: Newton-style steps toward the level set; default: {TABULAR_OCSDF['newton_steps']} "
                          f"({COORDINATE_OCSDF['newton_steps']} on scattering coordinates)")
    neg.add_argument("--newton-step-size", type=float, default=1.0, help="eta of the Newton steps")
    neg.add_argument("--level", type=float, default=0.0, help="level set the negatives are pushed toward")
    neg.add_argument("--warm-start-steps", type=int, default=20, help="first optimisation steps with T = 0")
    neg.add_argument("--negatives-per-step", type=int, default=None, help="default: the expected batch size")

    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=None,
                       help=f"default: 50 for tables, 5 for pixels, {COORDINATE_OCSDF['epochs']} for scattering "
                            "coordinates")
    train.add_argument("--batch-size", type=int, default=None,
                       help=f"expected (Poisson, if private) batch size; default: {TABULAR_OCSDF['batch_size']} "
                            f"({COORDINATE_OCSDF['batch_size']} on scattering coordinates)")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    train.add_argument("--ema-decay", type=float, default=None,
                       help="evaluate an exponential moving average of the weights (free post-processing)")
    train.add_argument("--seeds", type=int, nargs="+", default=[0], help="one training run per seed")
    train.add_argument("--threads", type=int, default=1, help="torch CPU threads")

    priv = p.add_argument_group("privacy")
    priv.add_argument("--epsilon", type=float, default=None, help="target epsilon; omit for non-private training")
    priv.add_argument("--delta", type=float, default=1e-5, help="target delta")
    priv.add_argument("--noise-strategy", default="global", choices=("global", "per_layer", "min_energy"),
                      help="how the engine splits noise over parameter groups (same privacy)")
    priv.add_argument("--accountant", default="prv", help="accountant backend of LipDPEngine")
    priv.add_argument("--nonprivate-reference", action="store_true",
                      help="also train the same recipe without noise (reference)")
    priv.add_argument("--isolation-forest", action="store_true",
                      help="also fit scikit-learn's IsolationForest on the same training normals (reference)")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--radii", type=float, nargs="*", default=[0.1, 0.25, 0.5, 1.0],
                    help="L2 radii (model input units) of the certified AUROC")
    ev.add_argument("--attack-steps", type=int, default=0, help="L2 PGD steps per radius (0: no attack)")
    ev.add_argument("--attack-samples", type=int, default=500,
                    help="evaluation samples per class attacked (first ones; the attack is slow)")
    ev.add_argument("--json", default=None, help="write every number to this JSON file")
    ev.add_argument("--results", type=Path, default=None, metavar="MARKDOWN",
                    help="also write the summary as the section one_class-DATASET of this file (e.g. "
                         "benchmarks/RESULTS.md), with the command that made it")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--log-level", default="INFO")
    return p


def check_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse values the parser cannot check by type alone (``UserError``: one line on the command line)."""
    if any(r < 0 or not math.isfinite(r) for r in args.radii):
        raise UserError(f"--radii must be finite and >= 0, got {args.radii}.", "give radii such as 0 0.25 1")
    if args.epsilon is not None and not args.epsilon > 0:
        raise UserError(f"--epsilon must be > 0, got {args.epsilon}.", "omit it for non-private training")
    if not 0 < args.delta < 1:
        raise UserError(f"--delta must be in (0, 1), got {args.delta}.", "use e.g. 1e-5 (below 1/N)")
    if args.rank is not None and args.rank < 0:
        raise UserError(f"--rank must be >= 0, got {args.rank}.", "give the subspace's dimension, e.g. --rank 10")
    if not 0 < args.clip_fraction <= 1:
        raise UserError(f"--clip-fraction must be in (0, 1], got {args.clip_fraction}.", "use e.g. 0.35")
    if args.release_fraction is not None and not 0 < args.release_fraction < 1:
        raise UserError(f"--release-fraction must be in (0, 1), got {args.release_fraction}.", "use e.g. 0.75")
    if args.results is not None and not args.results.parent.is_dir():
        raise UserError(f"--results {args.results}: its folder does not exist.", "create it, or name another file")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed and checked arguments of the recipe."""
    return check_arguments(build_parser().parse_args(argv))


# ------------------------------------------------------------------------------------------------- data


class ScatteringRows(nn.Module):
    """(N, C, H, W) images -> their certified 1-Lipschitz scattering rows (``recipes.front_end``, the
    ``lipschitz`` normalisation of the J = 2 part: each path divided by the transform's certified constant)."""

    def __init__(self, image_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scatter = differentiable_scatter(tuple(image_shape[-2:]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.rows(images, self.scatter)

    @staticmethod
    def lipschitz() -> float:
        """1: the rows are the weighted transform divided by its certified constant (``scattering_lipschitz``)."""
        return 1.0

    @staticmethod
    def rows(images: torch.Tensor, scatter: Scatter) -> torch.Tensor:
        """The rows from ``scatter``'s coefficients (groups do not apply to the lipschitz normalisation: 1)."""
        return front_end_features("scattering", images, 1, scatter, normalisation="lipschitz")[0]

    @classmethod
    def of_split(cls, images: torch.Tensor, progress: bool = True) -> torch.Tensor:
        """The same rows of a whole split, from the cached coefficients (``lipdp.scattering.scattering_features``)."""
        return cls.rows(images, functools.partial(scattering_features, progress=progress))


@dataclass
class Task:
    """One one-class problem: private training normals, evaluation normals and anomalies, as the detector's
    inputs (the preprocessed samples, or their ``feature_map`` rows)."""

    normal_class: int
    train: torch.Tensor
    normal: torch.Tensor
    anomaly: torch.Tensor
    input_shape: tuple[int, ...]
    image: bool
    raw_radius_factor: float | None  # raw-unit radius per unit of model-input radius (None: no global one)
    raw: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # train, normal, anomaly as the loader gives them
    feature_map: ScatteringRows | None = None  # preprocessed samples -> the detector's rows (None: identity)


def preprocess(x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The per-sample map of ``--preprocess`` (module doc); no statistic across samples is used."""
    flat = x.flatten(1)
    if args.preprocess == "scale":  # then clipped to norm X (1-Lipschitz, so radii still transfer)
        scaled = x * args.scale
        norms = scaled.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        return scaled * (args.input_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    if args.preprocess == "sphere":
        norms = flat.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            raise ValueError("--preprocess sphere needs non-zero samples; use lift (c > 0) instead")
        return (flat / norms * args.input_norm).view_as(x)
    if x.dim() != 2:
        raise ValueError("--preprocess lift is for tabular (N, F) data")
    lifted = torch.cat([flat, torch.full((len(x), 1), args.lift_constant)], dim=1)
    return lifted / lifted.norm(dim=1, keepdim=True) * args.input_norm


def raw_radius_factor(args: argparse.Namespace) -> float | None:
    unit = RAW_PIXEL_SCALE.get(args.dataset.replace("_", "-"), 1.0)
    if args.preprocess == "scale":
        return unit / args.scale
    if args.preprocess == "lift":
        return unit * args.lift_constant / args.input_norm
    return None


def resolve_defaults(args: argparse.Namespace, input_shape: tuple[int, ...]) -> None:
    """Fill the options whose default depends on the kind of data (tables or images)."""
    image = len(input_shape) == 3
    if args.preprocess is None:
        args.preprocess = "scale" if image else "lift"
    if args.prior is None:
        args.prior = "box" if image else "sphere"
    if args.input_norm is None:
        args.input_norm = math.sqrt(math.prod(input_shape)) if image else 30.0
    if args.margin is None:
        args.margin = 1.0 if image else 0.2
    if args.detector is None:
        args.detector = "subspace" if image else "ocsdf"
    if args.features is None:
        args.features = "scattering" if image else "input"
    if args.features == "scattering" and not image:
        raise UserError(f"--features scattering needs images; {args.dataset} is a table.", "use --features input")
    coordinates = args.detector == "ocsdf" and args.features == "scattering"
    for name, value in (COORDINATE_OCSDF if coordinates else TABULAR_OCSDF).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.epochs is None:
        args.epochs = 5 if image else 50


def load_tasks(args: argparse.Namespace) -> list[Task]:
    splits = load_dataset(args.dataset, root=args.data_root, seed=args.data_seed)
    if args.split == "validation":
        train, evaluation = train_validation_split(splits.train, args.validation_fraction, args.data_seed)
    else:
        train, evaluation = splits.train, splits.test
    (x_train, y_train), (x_eval, y_eval) = train.tensors, evaluation.tensors
    image = len(splits.input_shape) == 3
    resolve_defaults(args, splits.input_shape)
    if args.epochs < 0:
        raise ValueError(f"--epochs must be >= 0, got {args.epochs}")
    classes = list(range(splits.num_classes)) if args.normal_class == ["all"] else [int(c) for c in args.normal_class]
    for c in classes:
        if not 0 <= c < splits.num_classes:
            raise UserError(f"--normal-class {c} is not a class of {args.dataset} (0..{splits.num_classes - 1}).",
                            f"give classes between 0 and {splits.num_classes - 1}, or 'all'")
    inputs_train, inputs_eval = preprocess(x_train, args), preprocess(x_eval, args)  # per sample: free
    feature_map = ScatteringRows(splits.input_shape) if args.features == "scattering" else None
    if feature_map is not None:
        inputs_train, inputs_eval = (ScatteringRows.of_split(x, progress=not args.quiet)
                                     for x in (inputs_train, inputs_eval))
    features = inputs_train[0].numel()
    if args.rank is None:
        args.rank = min(SUBSPACE_RANK, features // 3)
    if (args.detector == "subspace" or args.features == "scattering") and args.rank > features:
        raise UserError(f"--rank {args.rank} exceeds the {features} features of the detector's rows.",
                        f"give --rank between 0 and {features}")
    tasks = []
    for c in classes:
        raw = (x_train[y_train == c], x_eval[y_eval == c], x_eval[y_eval != c])
        tasks.append(Task(c, inputs_train[y_train == c], inputs_eval[y_eval == c], inputs_eval[y_eval != c],
                          tuple(inputs_train.shape[1:]), image, raw_radius_factor(args), raw, feature_map))
    log.info("%s (%s split): %s", splits.name, args.split, splits.description)
    return tasks


# ------------------------------------------------------------------------------------------------ model


def orthogonal_cnn_dense_head(
    input_shape: tuple[int, ...], widths: list[int], hidden: int, input_norm_bound: float
) -> nn.Sequential:
    """InputNormClip -> [AOC conv 3x3 -> MaxMin -> 2x2 L2-norm pooling]* -> flatten -> OrthoLinear -> MaxMin ->
    OrthoLinear(1). Every block is 1-Lipschitz (orthogonium layers, permutations, non-overlapping pooling)."""
    channels, height, width = input_shape
    layers: list[nn.Module] = [InputNormClip(input_norm_bound)]
    for out_channels in widths:
        layers += [AdaptiveOrthoConv2d(channels, out_channels, 3, padding="same", padding_mode="zeros", bias=False),
                   MaxMin()]
        channels = out_channels
        if min(height, width) >= 2:
            layers.append(L2NormPool2d(2))
            height, width = height // 2, width // 2
    layers += [nn.Flatten(), OrthoLinear(channels * height * width, hidden), MaxMin(), OrthoLinear(hidden, 1)]
    return nn.Sequential(*layers)


def build_model(task: Task, args: argparse.Namespace) -> nn.Module:
    """The OCSDF network: an orthogonal MLP on the subspace coordinates (``--features scattering``) or on tables, an
    orthogonal CNN on pixels."""
    if task.feature_map is not None:  # coordinates of rows clipped to R before the releases: clipped to R here
        return orthogonal_mlp(args.rank + 1, 1, hidden=args.hidden, input_norm_bound=coordinate_norm_bound(args))
    bound = args.input_norm  # X_0: every sample has norm X (sphere, lift) or is clipped to X (scale)
    if task.image and args.cnn_head == "global":
        return orthogonal_cnn(task.input_shape, 1, widths=args.widths, input_norm_bound=bound)
    if task.image:
        return orthogonal_cnn_dense_head(task.input_shape, args.widths, args.cnn_hidden, bound)
    return orthogonal_mlp(task.input_shape[0], 1, hidden=args.hidden, input_norm_bound=bound)


def coordinate_norm_bound(args: argparse.Namespace) -> float:
    """R: the OCSDF network's input clip and its negatives' ball on subspace coordinates (``--clip-fraction`` X)."""
    return args.clip_fraction * args.input_norm


def build_sampler(task: Task, args: argparse.Namespace) -> NegativeSampler:
    if task.feature_map is not None:  # signed coordinates: the whole ball of radius R, not folded
        prior = BallPrior((args.rank + 1,), coordinate_norm_bound(args))
    elif args.prior == "box":
        prior = BoxPrior(task.input_shape, args.prior_low, args.prior_high)
    else:
        prior = BallPrior(task.input_shape, args.input_norm, surface=args.prior == "sphere", fold=args.fold)
    return NegativeSampler(prior, steps=args.newton_steps, step_size=args.newton_step_size, level=args.level)


# --------------------------------------------------------------------------------------------- training


def fit_detector(task: Task, args: argparse.Namespace, seed: int, epsilon: float | None) -> tuple[nn.Module, dict]:
    """Fit ``--detector`` on the task's training normals; returns the detector and the privacy record."""
    if args.detector == "subspace":
        return fit_subspace_detector(task, args, seed, epsilon)
    return train_detector(task, args, seed, epsilon)


def fit_subspace_detector(task: Task, args: argparse.Namespace, seed: int, epsilon: float | None
                          ) -> tuple[SubspaceResidual, dict]:
    """The subspace detector: two releases at one noise multiplier, calibrated so that together they meet
    (``epsilon``, ``--delta``) (``lipdp.one_class.subspace``), or exact statistics without ``epsilon``."""
    started = time.perf_counter()
    record: dict = {"private": epsilon is not None}
    if epsilon is None:
        model = fit_subspace(task.train, args.rank)
    else:
        sigma = calibrate_noise(epsilon, args.delta, 1.0, steps=2, backend=args.accountant)
        engine = LipDPEngine(accountant=args.accountant, seed=seed)
        model = fit_private_subspace(engine, task.train, args.rank, args.clip_fraction * args.input_norm,
                                     sigma, sigma)
        record.update(epsilon=engine.get_epsilon(args.delta), delta=args.delta, noise_multiplier=sigma,
                      sample_rate=1.0, steps=engine.accountant.total_steps)
    record["train_seconds"] = time.perf_counter() - started
    return model, record


def fit_coordinates(task: Task, args: argparse.Namespace, engine: LipDPEngine | None,
                    epsilon: float | None) -> SubspaceCoordinates:
    """The subspace coordinates of the task's rows: from exact statistics, or from two releases through ``engine``
    calibrated to spend ``--release-fraction`` of ``epsilon`` (the training then spends the rest)."""
    if engine is None:
        subspace = fit_subspace(task.train, args.rank)
    else:
        sigma = calibrate_noise(args.release_fraction * epsilon, args.delta, 1.0, steps=2, backend=args.accountant)
        subspace = fit_private_subspace(engine, task.train, args.rank, coordinate_norm_bound(args), sigma, sigma)
    return SubspaceCoordinates(subspace.mean, subspace.basis)


def train_detector(task: Task, args: argparse.Namespace, seed: int, epsilon: float | None) -> tuple[nn.Module, dict]:
    """Train one OCSDF detector; returns a plain (hook-free) model to evaluate and the privacy record. On
    scattering rows the detector is ``SubspaceCoordinates`` followed by the network, one accountant for both."""
    torch.manual_seed(seed)
    engine = LipDPEngine(accountant=args.accountant, seed=seed) if epsilon is not None else None
    coordinates = fit_coordinates(task, args, engine, epsilon) if task.feature_map is not None else None
    train = task.train if coordinates is None else coordinates(task.train)
    model = build_model(task, args)
    ema = WeightAverage(model, args.ema_decay) if args.ema_decay is not None else None
    criterion = OneClassHKR(args.margin, args.lam, reduction="sum")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    dataset = TensorDataset(train, torch.zeros(len(train), dtype=torch.long))
    batch_size = min(args.batch_size, len(dataset))
    input_shape = tuple(train.shape[1:])
    record: dict = {"private": epsilon is not None}
    if epsilon is None:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        divisor = 1.0
    else:
        model, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=batch_size),
            criterion=criterion, target_epsilon=epsilon, target_delta=args.delta, epochs=args.epochs,
            input_norm_bound=coordinate_norm_bound(args) if coordinates is not None else args.input_norm,
            input_shape=input_shape, loss_reduction="sum",
            noise_strategy=args.noise_strategy,
        )
        divisor = float(loader.expected_batch_size)
    started = time.perf_counter()
    train_ocsdf(
        model, loader, optimizer, criterion, build_sampler(task, args), args.epochs, expected_batch_size=batch_size,
        negatives_per_step=args.negatives_per_step, warm_start_steps=args.warm_start_steps,
        gradient_divisor=divisor, ema=ema, generator=torch.Generator().manual_seed(seed), progress=not args.quiet,
    )
    record["train_seconds"] = time.perf_counter() - started
    if epsilon is not None:
        record.update(epsilon=engine.get_epsilon(args.delta), delta=args.delta,
                      noise_multiplier=engine.noise_multiplier, sample_rate=loader.sample_rate,
                      steps=engine.accountant.total_steps)
    plain = build_model(task, args)  # the engine's hooks stay on `model`: evaluate a clean copy
    plain.load_state_dict(model.state_dict())
    plain = ema.copy_into(plain) if ema is not None else plain
    return (plain if coordinates is None else nn.Sequential(coordinates, plain)), record


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(model: nn.Module, task: Task, args: argparse.Namespace, seed: int) -> dict:
    """AUROC, certified AUROC at ``--radii`` (in the preprocessed samples' units: the feature map is
    1-Lipschitz), and optionally the L2 PGD attack on the samples, through the feature map."""
    model.eval()
    lip = detector_lipschitz(model, task.input_shape)
    normal, anomaly = scores(model, task.normal), scores(model, task.anomaly)
    if task.feature_map is not None:
        lip *= task.feature_map.lipschitz()
    out = {"auroc": auroc(normal, anomaly), "lipschitz": lip, "certified": {}, "attacked": {}}
    for r in args.radii:
        out["certified"][str(r)] = certified_auroc(normal, anomaly, r, lipschitz=lip)
    if args.attack_steps > 0:
        n = args.attack_samples
        xn, xa = task.normal[:n], task.anomaly[:n]
        if task.feature_map is not None:  # attack the samples, not the rows
            model = nn.Sequential(task.feature_map, model)
            xn, xa = preprocess(task.raw[1][:n], args), preprocess(task.raw[2][:n], args)
        subset = {"certified": {}, "attacked": {}}
        for r in args.radii:
            gen = torch.Generator().manual_seed(seed)
            subset["attacked"][str(r)] = attacked_auroc(model, xn, xa, r, steps=args.attack_steps, generator=gen)
            subset["certified"][str(r)] = certified_auroc(scores(model, xn), scores(model, xa), r, lipschitz=lip)
        out["attack_subset"] = subset
    return out


def detector_lipschitz(model: nn.Module, input_shape: tuple[int, ...]) -> float:
    """Certified constant of a detector in its rows: the subspace's own, the network's (``lipschitz_constant``),
    or their product for ``SubspaceCoordinates`` followed by a network."""
    if isinstance(model, SubspaceResidual):
        return model.lipschitz()
    if isinstance(model, nn.Sequential) and isinstance(model[0], SubspaceCoordinates):
        return model[0].lipschitz() * lipschitz_constant(model[1], (model[0].residual.basis.shape[1] + 1,))
    return lipschitz_constant(model, input_shape)


def isolation_forest(task: Task, seed: int) -> float:
    """Non-private scikit-learn IsolationForest (default settings) on the loader's features (no --preprocess)."""
    train, normal, anomaly = (t.flatten(1).numpy() for t in task.raw)
    forest = IsolationForest(random_state=seed).fit(train)
    return auroc(torch.from_numpy(forest.score_samples(normal)), torch.from_numpy(forest.score_samples(anomaly)))


# ---------------------------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(results: list[dict], args: argparse.Namespace) -> str:
    """Text table: one row per method and normal class, mean ± std over seeds."""
    lines = []
    radii = [str(r) for r in args.radii]
    factor = results[0]["raw_radius_factor"] if results else None
    head = "  ".join(f"cert r={r}" + (f" ({float(r) * factor:.3g} raw)" if factor else "") for r in radii)
    lines.append(f"{'class':>5}  {'method':<22}  {'AUROC':>15}  {head}")
    methods = ["isolation_forest", "nonprivate", "private"]
    for c in sorted({r["normal_class"] for r in results}):
        rows = [r for r in results if r["normal_class"] == c]
        for method in methods:
            runs = [r[method] for r in rows if method in r]
            if not runs:
                continue
            if method == "isolation_forest":
                lines.append(f"{c:>5}  {'IsolationForest':<22}  {_mean_std(runs):>15}")
                continue
            detector = "OCSDF" if args.detector == "ocsdf" else "subspace"
            name = f"{detector} non-private" if method == "nonprivate" else \
                f"{detector} eps={runs[0]['epsilon']:.3g} delta={runs[0]['delta']:.0e}"
            cert = "  ".join(f"{_mean_std([run['certified'][r] for run in runs]):>15}" for r in radii)
            lines.append(f"{c:>5}  {name:<22}  {_mean_std([run['auroc'] for run in runs]):>15}  {cert}")
    if len({r["normal_class"] for r in results}) > 1:
        for method in methods[1:]:
            per_class = {}
            for r in results:
                if method in r:
                    per_class.setdefault(r["normal_class"], []).append(r[method]["auroc"])
            if per_class:
                means = [statistics.mean(v) for v in per_class.values()]
                lines.append(f"mean over {len(means)} classes, {method}: AUROC {statistics.mean(means):.3f}")
    private = [r["private"] for r in results if "private" in r]
    if private:
        sigmas = sorted({round(p["noise_multiplier"], 4) for p in private})
        rates = sorted({round(p["sample_rate"], 4) for p in private})
        lines.append(
            f"privacy: (eps, delta) = ({max(p['epsilon'] for p in private):.4g}, {private[0]['delta']:.0e}) per "
            f"run ({args.accountant} accountant), noise multiplier {', '.join(map(str, sigmas))}, sample rate "
            f"{', '.join(map(str, rates))}, {private[0]['steps']} steps; " + (
                f"loss Lipschitz 1 + lambda = {1 + args.lam:g}" if args.detector == "ocsdf" else
                f"rows clipped to R = {args.clip_fraction * args.input_norm:.4g}, rank {args.rank}") + (
                f"; the first 2 steps are the subspace releases (rank {args.rank}, R = "
                f"{coordinate_norm_bound(args):.4g}, {args.release_fraction:g} of epsilon)"
                if args.detector == "ocsdf" and args.features == "scattering" else "")
        )
    attacks = [(r["normal_class"], m, r[m]["attack_subset"]) for r in results for m in ("nonprivate", "private")
               if m in r and "attack_subset" in r[m]]
    if attacks:
        lines.append("L2 PGD attack vs certificate (attacked subset): radius: attacked AUROC >= certified AUROC")
        for c, m, sub in attacks:
            pairs = ", ".join(f"r={r}: {sub['attacked'][r]:.3f} >= {sub['certified'][r]:.3f}" for r in radii)
            lines.append(f"  class {c} {m}: {pairs}")
    return "\n".join(lines)


def run(args: argparse.Namespace, command_line: str | None = None) -> list[dict]:
    """Every (normal class, seed) run of the parsed ``args``: printed as a summary, written to ``--json`` (and to
    ``--results``, naming ``command_line``, the flags that made it), returned."""
    check_arguments(args)
    load_at_start = load_average()
    logging.getLogger().setLevel(args.log_level)
    torch.set_num_threads(args.threads)
    tasks = load_tasks(args)
    results = []
    runs = [(task, seed) for task in tasks for seed in args.seeds]
    for task, seed in tqdm(runs, desc="runs", disable=args.quiet or len(runs) == 1):
        result: dict = {"normal_class": task.normal_class, "seed": seed, "raw_radius_factor": task.raw_radius_factor,
                        "n_train": len(task.train), "n_normal": len(task.normal), "n_anomaly": len(task.anomaly)}
        if args.isolation_forest:
            result["isolation_forest"] = isolation_forest(task, seed)
        settings = ([None] if args.epsilon is None or args.nonprivate_reference else []) + \
            ([args.epsilon] if args.epsilon is not None else [])
        for epsilon in settings:
            model, record = fit_detector(task, args, seed, epsilon)
            record.update(evaluate(model, task, args, seed))
            result["private" if epsilon is not None else "nonprivate"] = record
            log.info("class %d seed %d %s: AUROC %.4f", task.normal_class, seed,
                     f"eps={record['epsilon']:.3g}" if epsilon is not None else "non-private", record["auroc"])
        results.append(result)
    summary = summarise(results, args)
    print(summary)
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results})
    if args.results:
        write_section(f"one_class-{args.dataset}", results_section(summary, args, command_line, load_at_start),
                      args.results)
        print(f"wrote {args.results} (section one_class-{args.dataset})")
    return results


def results_section(summary: str, args: argparse.Namespace, command_line: str | None,
                    load_at_start: list[float]) -> str:
    """The RESULTS.md section of a run: the command, what the radii mean, the summary table, the machine."""
    command = f"`{PROG} {command_line}`" if command_line is not None else "`recipes.one_class.run`"
    units = ("pixels as loaded (Fashion-MNIST: pixels / 255), through the certified scattering"
             if args.features == "scattering" else "the preprocessed samples' units")
    return "\n\n".join([
        f"## Private one-class detection: {args.dataset}, {args.split} split",
        f"Generated by {command}. One-vs-rest AUROC (mean ± std over seeds "
        f"{', '.join(map(str, args.seeds))}) of the {args.detector} detector; certified AUROC at L2 radius r, "
        f"r in {units}; the PGD lines (if any) are attacked AUROC on a subset of at most {args.attack_samples} "
        "samples per side, never below the certificate.",
        "```text\n" + summary + "\n```",
        machine_paragraph({args.threads}, load_at_start),
    ])


def main(argv: list[str] | None = None) -> int:
    """``python -m recipes.one_class``: returns the exit status (2 with one line for a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def run_command(args: argparse.Namespace) -> int:
        run(args, shlex.join(argv))
        return 0

    return run_main(PROG, build_parser, run_command, argv)


if __name__ == "__main__":
    sys.exit(main())
