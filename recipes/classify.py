"""Private classification recipe: scattering features + Lipschitz head, or an end-to-end orthogonal CNN.

    python -m recipes.classify --dataset fashion-mnist --epsilons 1 3 8
    python -m recipes.classify --dataset digits --front-end pixels --head cnn --epsilons 3 --epochs 30

Front ends (``recipes.front_end``; per sample, free in privacy, docs/design.md §2): '+'-joined parts among
``scattering`` (2-D wavelet scattering, J = 2, computed once and cached, then per-sample group standardisation),
``fine-scattering`` (the same at J = 1) and ``pixels``, each of norm 1 per sample, side by side; the default uses
all three. The features are then centred on the training features' mean and their scattering channels whitened by
the channels' second moments, both released once by the Gaussian mechanism (``LipDPEngine.private_mean`` and
``private_channel_moments``, noise multipliers ``--centring-noise`` and ``--whitening-noise``; accounted in the
same (epsilon, delta)), each followed by a rescaling to norm 1. Heads: ``linear`` (one dense layer: its per-sample
gradient bound is L * X0 whatever its weights) or ``cnn`` / ``patch`` (orthogonal CNN / patch CNN from lipdp.models,
widths ``--widths``; the patch CNN is ``lipdp train``'s Fashion-MNIST network) on ``pixels`` or on the feature maps
of one scattering part (``scattering``: 81 channels at (H/4) x (W/4); the
preprocessed rows viewed as (channels, h, w), an isometry, so certificates and constants are unchanged).
Hyper-parameters are chosen with ``--validation`` (last 10% of the training split as held-out data); the test
split is only used for the final report. Reports test accuracy and certified accuracy at L2 radii. With
``--normalisation standardise`` (default) the radii are in the head's input space, the preprocessed features (the
per-sample standardisation and rescalings are not Lipschitz). With ``--normalisation lipschitz`` every stage before
the head has a certified constant (``recipes.front_end``; scattering from its filter bank), and the radii are in
pixel space, the images as loaded (pixels / 255 for Fashion-MNIST): the JSON's ``certified_space`` says which, and
``pixel_lipschitz`` is the whole pipeline's constant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lipdp.certify import certified_accuracy
from lipdp.cli.errors import ArgumentParser, run_main
from lipdp.cli.output import write_json
from lipdp.datasets import load_dataset, train_validation_split
from lipdp.engine import LipDPEngine
from lipdp.layers import InputNormClip
from lipdp.models import orthogonal_network
from lipdp.presets import train_preset, training_settings
from lipdp.statistics import ChannelBlock
from lipdp.training import OPTIMIZERS, TrainConfig, train_private
from recipes.front_end import (NORMALISATIONS, PrivatePreprocessing, differentiable_scatter, front_end_features,
                               parse_front_end, release_preprocessing)

logger = logging.getLogger(__name__)

#: Chosen on the validation split (last 10% of Fashion-MNIST's training split), never on the test split; the sweep
#: and its numbers are in the README ("Results and how the settings were chosen").
#: The ``lipschitz`` normalisation's knobs (chosen on the validation split, README): rows divided by RADIUS, and each
#: scattering order's weight (orders 0, 1, 2).
RADIUS = 32.0
ORDER_WEIGHTS = (1.0, 1.0, 1.0)
DEFAULTS = dict(epochs=40, batch_size=4096, learning_rate=0.1, temperature=1.0, groups=27, centring_noise=10.0,
                whitening_noise=10.0, whitening_floor=0.1, noise_strategy="min_energy", weight_averaging=None,
                loss_grad_clip=0.5, optimizer="adam", normalisation="standardise", radius=RADIUS,
                order_weights=ORDER_WEIGHTS)
#: Statistics released before training (``recipes.front_end``), not part of the training loop's TrainConfig.
PREPROCESSING_SETTINGS = ("groups", "centring_noise", "whitening_noise", "whitening_floor", "normalisation", "radius",
                          "order_weights")
DEFAULT_FRONT_END = "scattering+fine-scattering+pixels"
#: The end-to-end heads (pixels -> lipdp's orthogonal CNN or patch CNN) train with ``lipdp train``'s Fashion-MNIST
#: presets for that network (``lipdp.presets``: length, learning rate, temperature and logit-gradient clip, chosen on
#: validation, README) and TrainConfig's noise strategy; the linear head's settings do not fit a deep network. The
#: patch CNN is ``lipdp train --dataset fashion-mnist``'s network. Their input bound stays X0 = 1: the recipe's rows
#: are rescaled to norm 1 by the front end (``lipdp train`` projects raw images onto a ball of radius 10).
NETWORK_PRESETS = {head: train_preset("fashion-mnist", head) for head in ("cnn", "patch")}
HEAD_DEFAULTS = {"linear": {**DEFAULTS, "widths": None},
                 **{head: {**DEFAULTS, "noise_strategy": TrainConfig.noise_strategy, "widths": preset["widths"],
                           **training_settings(preset), "input_norm_bound": 1.0}
                    for head, preset in NETWORK_PRESETS.items()}}
HEADS = tuple(HEAD_DEFAULTS)
HEAD_FRONT_ENDS = {"linear": DEFAULT_FRONT_END, "cnn": "pixels", "patch": "pixels"}
RADII = (0.0, 0.05, 0.1, 0.25, 0.5)
SALIENCY_IMAGES = 8


FRONT_ENDS = ("scattering+fine-scattering+pixels", "scattering+pixels", "scattering", "pixels")


def _features(dataset: TensorDataset, front_end: str, groups: int, normalisation: str = "standardise",
              order_weights: tuple[float, ...] = ORDER_WEIGHTS) -> tuple[TensorDataset, list[ChannelBlock]]:
    """The fixed front end applied to a whole split (scattering coefficients are computed once and cached)."""
    x, y = dataset.tensors
    if front_end == "pixels":
        return TensorDataset(x, y), []
    features, blocks = front_end_features(front_end, x, groups, normalisation=normalisation,
                                          order_weights=order_weights)
    return TensorDataset(features, y), blocks


def logits_of_pixels(head: nn.Module, front_end: str, groups: int, image_shape: tuple[int, ...],
                     head_input: tuple[int, ...], preprocessing: PrivatePreprocessing | None = None,
                     normalisation: str = "standardise", order_weights: tuple[float, ...] = ORDER_WEIGHTS
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trained head composed with its front end (and the private centring and whitening, if any): logits as
    a differentiable function of the images. ``head_input``: the shape of one input of the head (flat rows, images
    or feature maps), the preprocessed features reshaped to it."""
    scatter = differentiable_scatter(tuple(image_shape[-2:]))

    def logits(images: torch.Tensor) -> torch.Tensor:
        if front_end == "pixels":
            features = images.reshape(len(images), *head_input)
        else:
            features, _ = front_end_features(front_end, images, groups, scatter, normalisation, order_weights)
        features = features if preprocessing is None else preprocessing(features)
        return head(features.reshape(len(images), *head_input))

    return logits


def released_logits(model: nn.Module, head: str, input_shape: tuple[int, ...], num_classes: int, front_end: str,
                    groups: int, image_shape: tuple[int, ...], preprocessing: PrivatePreprocessing | None,
                    normalisation: str, order_weights: tuple[float, ...], widths: Sequence[int] | None = None
                    ) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """A copy of the trained ``model`` (built by ``build_model(head, input_shape, num_classes, widths)``) without the
    engine's training hooks (they rescale and clip gradients at the output), and its logits as a differentiable
    function of the images (:func:`logits_of_pixels`)."""
    released = build_model(head, input_shape, num_classes, widths)
    released.load_state_dict(model.state_dict())
    return released, logits_of_pixels(released.eval(), front_end, groups, image_shape, tuple(input_shape),
                                      preprocessing=preprocessing, normalisation=normalisation,
                                      order_weights=order_weights)


def save_saliency_maps(logits: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                       path: Path) -> Path:
    """PNG: each image over the gradient, with respect to its pixels, of its predicted class's margin (top logit
    minus the runner-up). 1-Lipschitz models trained with OT-style losses have sharp, meaningful input gradients
    (Serrurier et al. 2022, "On the explainable properties of 1-Lipschitz neural networks")."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    images = images.detach().clone().requires_grad_(True)
    top = logits(images).topk(2, dim=1)
    (gradient,) = torch.autograd.grad((top.values[:, 0] - top.values[:, 1]).sum(), images)
    figure, axes = plt.subplots(2, len(images), figsize=(1.6 * len(images), 4.4), squeeze=False)
    for i, (image, saliency) in enumerate(zip(images.detach(), gradient.abs().sum(dim=1))):
        axes[0, i].imshow(image.sum(dim=0).numpy(), cmap="gray")
        axes[0, i].set_title(f"label {int(labels[i])}\npred. {int(top.indices[i, 0])}", fontsize=8)
        axes[1, i].imshow(saliency.numpy(), cmap="hot")
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("input gradients of the predicted class's margin (private model)", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class PreparedData(NamedTuple):
    train: TensorDataset
    evaluation: TensorDataset  # the validation split if asked, else the test split
    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    blocks: list[ChannelBlock]  # where the scattering parts' (channels, positions) blocks sit in a row
    image_shape: tuple[int, ...]  # of one image, as loaded


def prepare_data(dataset: str, front_end: str, groups: int, validation: bool, seed: int,
                 normalisation: str = "standardise", order_weights: tuple[float, ...] = ORDER_WEIGHTS
                 ) -> PreparedData:
    """The front end's features of both splits. They are computed on the full official splits (scattering
    coefficients cached), then the validation split is taken if asked."""
    splits = load_dataset(dataset, seed=seed)
    (train, blocks), (evaluation, _) = (_features(d, front_end, groups, normalisation, order_weights)
                                        for d in (splits.train, splits.test))
    if validation:
        train, evaluation = train_validation_split(train, 0.1, seed=seed)
    return PreparedData(train, evaluation, tuple(train.tensors[0].shape[1:]), splits.num_classes,
                        splits.description, blocks, tuple(splits.train.tensors[0].shape[1:]))


def feature_maps(block: ChannelBlock, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, h, w) of a scattering part's block, for a convolutional head: its positions laid out as the
    image's (h / w = H / W; the scattering transform subsamples both sides by 2^J)."""
    height, width = image_shape[-2:]
    h = round((block.positions * height / width) ** 0.5)
    if h < 1 or block.positions % h:
        raise ValueError(f"{block.positions} scattering positions do not tile a map with the {height}x{width} "
                         "images' aspect ratio")
    return block.channels, h, block.positions // h


def build_model(head: str, input_shape: tuple[int, ...], num_classes: int,
                widths: Sequence[int] | None = None) -> nn.Module:
    """``linear``: InputNormClip(1) -> one dense layer on the flat rows; ``cnn`` / ``patch``: the orthogonal CNN /
    patch CNN (``lipdp.models``) on the images or feature maps, with ``widths`` (default ``NETWORK_PRESETS``')."""
    if head == "linear":
        features = int(torch.tensor(input_shape).prod())
        return nn.Sequential(nn.Flatten(), InputNormClip(1.0), nn.Linear(features, num_classes))
    return orthogonal_network(head, input_shape, num_classes, tuple(widths or NETWORK_PRESETS[head]["widths"]))


class PrivateFeatures(NamedTuple):
    """What :func:`private_features` returns: the preprocessed rows and the engine that released their statistics."""

    train: TensorDataset  # the training rows, preprocessed with the released statistics
    evaluation: TensorDataset  # the validation split if asked, else the test split, preprocessed the same way
    preprocessing: PrivatePreprocessing  # the released centring and whitening (for other inputs)
    input_shape: tuple[int, ...]  # of one row, as the head takes it
    num_classes: int
    description: str
    blocks: list[ChannelBlock]  # where the scattering parts' (channels, positions) blocks sit in a row
    engine: LipDPEngine  # its accountant holds the releases; train with it (or pass its history on)


def private_features(dataset: str = "fashion-mnist", front_end: str = DEFAULT_FRONT_END, head: str = "linear",
                     validation: bool = False, seed: int = 0, accountant: str = "prv", *,
                     groups: int = DEFAULTS["groups"], centring_noise: float | None = DEFAULTS["centring_noise"],
                     whitening_noise: float | None = DEFAULTS["whitening_noise"],
                     whitening_floor: float = DEFAULTS["whitening_floor"],
                     normalisation: str = DEFAULTS["normalisation"], radius: float = RADIUS,
                     order_weights: tuple[float, ...] = ORDER_WEIGHTS) -> PrivateFeatures:
    """The recipe's inputs for ``head``: the front end's features of both splits (flat rows for the linear head),
    centred and whitened with statistics of the training rows released through a fresh engine (seeded with
    ``seed``; a noise multiplier of 0/None skips a release). Its accountant holds the releases, to be paid from the
    same (epsilon, delta) by whatever trains on the rows. ``radius`` is used by the ``lipschitz`` normalisation."""
    parts = parse_front_end(front_end)  # a clear error for unknown parts
    if head != "linear" and len(parts) > 1:
        raise ValueError(f"the {head} head convolves images or feature maps: use front_end='pixels' or one scattering "
                         f"part ('scattering', 'fine-scattering'); the {front_end} front end's rows are for the "
                         "linear head")
    order_weights = tuple(order_weights)
    train, evaluation, input_shape, num_classes, description, blocks, image_shape = prepare_data(
        dataset, front_end, groups, validation, seed, normalisation, order_weights)
    if head == "linear" and front_end == "pixels":
        train = TensorDataset(train.tensors[0].flatten(1), train.tensors[1])
        evaluation = TensorDataset(evaluation.tensors[0].flatten(1), evaluation.tensors[1])
        input_shape = (int(torch.tensor(input_shape).prod()),)
    engine = LipDPEngine(accountant=accountant, seed=seed)
    preprocessing, train_rows = release_preprocessing(
        engine, train.tensors[0], blocks, centring_noise, whitening_noise, whitening_floor,
        radius if normalisation == "lipschitz" else None)
    evaluation_rows = preprocessing(evaluation.tensors[0])
    if head != "linear" and blocks:  # the rows of one scattering part, as (channels, h, w) maps
        input_shape = feature_maps(blocks[0], image_shape)
        train_rows, evaluation_rows = (rows.view(len(rows), *input_shape) for rows in (train_rows, evaluation_rows))
    return PrivateFeatures(TensorDataset(train_rows, train.tensors[1]),
                           TensorDataset(evaluation_rows, evaluation.tensors[1]),
                           preprocessing, input_shape, num_classes, description, blocks, engine)


def run(dataset: str = "fashion-mnist", epsilon: float = 3.0, delta: float = 1e-5, seed: int = 0,
        front_end: str | None = None, head: str = "linear", validation: bool = False, progress: bool = True,
        saliency: Path | None = None, **overrides) -> dict:
    """One private training run; returns accuracy, certified accuracy, (epsilon, delta), timings. Unset settings
    and ``front_end`` take the head's defaults (``HEAD_DEFAULTS``, ``HEAD_FRONT_ENDS``). With ``saliency``, also
    saves the input-gradient maps of the first test images there (PNG)."""
    front_end = front_end or HEAD_FRONT_ENDS[head]
    settings = {**HEAD_DEFAULTS[head], **{k: v for k, v in overrides.items() if v is not None}}
    settings["loss_grad_clip"] = settings["loss_grad_clip"] or None  # 0: no clip
    preprocessing_settings = {name: settings.pop(name) for name in PREPROCESSING_SETTINGS}
    widths = settings.pop("widths")
    normalisation = preprocessing_settings["normalisation"]
    order_weights = tuple(preprocessing_settings["order_weights"])
    features = private_features(dataset, front_end, head, validation, seed,
                                settings.get("accountant", TrainConfig.accountant), **preprocessing_settings)
    train, evaluation, preprocessing = features.train, features.evaluation, features.preprocessing
    torch.manual_seed(seed)  # the head's initial weights
    model = build_model(head, features.input_shape, features.num_classes, widths)
    config = TrainConfig(epsilon=epsilon, delta=delta, seed=seed,
                         batch_size=min(settings.pop("batch_size"), len(train)), **settings)
    result, engine = train_private(model, train, evaluation, config, progress=progress, engine=features.engine)
    lipschitz = engine.lipschitz_constant()
    # lipschitz: every stage before the head is certified (front end 1, preprocessing), radii in the images' units
    pixel_lipschitz = lipschitz * preprocessing.lipschitz() if normalisation == "lipschitz" else None
    certified = {str(r): certified_accuracy(
        model, evaluation, r, lipschitz if pixel_lipschitz is None else pixel_lipschitz) for r in RADII}
    if saliency is not None:
        images, labels = load_dataset(dataset, seed=seed).test.tensors
        _, logits = released_logits(model, head, features.input_shape, features.num_classes, front_end,
                                    preprocessing_settings["groups"], tuple(images.shape[1:]), preprocessing,
                                    normalisation, order_weights, widths)
        save_saliency_maps(logits, images[:SALIENCY_IMAGES], labels[:SALIENCY_IMAGES], saliency)
    return {
        "dataset": dataset, "description": features.description, "front_end": front_end, "head": head,
        "widths": None if widths is None else list(widths),
        "evaluated_on": "validation" if validation else "test", "config": asdict(config),
        "centring_noise": preprocessing_settings["centring_noise"] or None,
        "whitening_noise": (preprocessing_settings["whitening_noise"] or None) if features.blocks else None,
        "accuracy": result.test_accuracy, "epsilon": result.epsilon, "delta": delta,
        "noise_multiplier": result.noise_multiplier, "steps": result.steps, "train_seconds": result.seconds,
        "normalisation": normalisation,
        **({"radius": preprocessing.radius, "order_weights": list(order_weights)} if normalisation == "lipschitz"
           else {}),
        "lipschitz": lipschitz, "pixel_lipschitz": pixel_lipschitz,
        "certified_space": "pixels" if normalisation == "lipschitz" else "features",
        "certified_accuracy": certified, "epochs": result.epoch_log,
    }


def markdown_table(results: list[dict]) -> str:
    lines = ["| epsilon (delta) | accuracy | " + " | ".join(f"cert. r={r}" for r in RADII[1:]) + " | train s |",
             "|---|---|" + "---|" * (len(RADII) - 1) + "---|"]
    for r in results:
        certs = " | ".join(f"{r['certified_accuracy'][str(radius)]:.3f}" for radius in RADII[1:])
        lines.append(f"| {r['epsilon']:.2f} ({r['delta']:g}) | {r['accuracy']:.4f} | {certs} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


PROG = "python -m recipes.classify"


def _default_text(name: str) -> str:
    """A flag's default as its help says it: one value, or each head's where they differ."""
    values = {head: defaults[name] for head, defaults in HEAD_DEFAULTS.items()}
    if len(set(map(str, values.values()))) == 1:
        return f"default {values['linear']}"
    return "default " + ", ".join(f"{value} ({head} head)" for head, value in values.items())


def build_parser() -> ArgumentParser:
    """The recipe's flags (one-line errors, exit status 2: ``lipdp.cli.errors``)."""
    parser = ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist, digits, cifar10, ...")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[3.0], help="target epsilons, one run each")
    parser.add_argument("--delta", type=float, default=1e-5, help="target delta")
    parser.add_argument("--front-end", choices=FRONT_ENDS, default=None,
                        help=f"fixed per-sample feature extractor (free in privacy), default {DEFAULT_FRONT_END} "
                             "for the linear head, pixels for the cnn and patch heads")
    parser.add_argument("--head", choices=HEADS, default="linear",
                        help="trainable Lipschitz model: linear, or the orthogonal cnn or patch CNN (lipdp.models)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="cnn and patch heads: channels of each stage, default " + ", ".join(
                            f"{' '.join(map(str, p['widths']))} ({head})" for head, p in NETWORK_PRESETS.items()))
    parser.add_argument("--epochs", type=int, default=None, help=_default_text("epochs"))
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"expected Poisson batch, {_default_text('batch_size')}")
    parser.add_argument("--lr", dest="learning_rate", type=float, default=None,
                        help=f"learning rate, {_default_text('learning_rate')}")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help=f"adam, or sgd with momentum 0.9; default {DEFAULTS['optimizer']}")
    parser.add_argument("--temperature", type=float, default=None,
                        help=f"cross-entropy temperature tau, {_default_text('temperature')}")
    parser.add_argument("--groups", type=int, default=None, help="per-sample standardisation groups of scattering channels")
    parser.add_argument("--centring-noise", type=float, default=None, metavar="SIGMA",
                        help="noise multiplier of the private training-feature mean the features are centred on "
                             f"(0: no centring); accounted in the budget; default {DEFAULTS['centring_noise']}")
    parser.add_argument("--whitening-noise", type=float, default=None, metavar="SIGMA",
                        help="noise multiplier of the private channel second moments that whiten the scattering "
                             f"channels (0: no whitening); accounted in the budget; default {DEFAULTS['whitening_noise']}")
    parser.add_argument("--whitening-floor", type=float, default=None,
                        help="eigenvalue floor of the whitening, as a fraction of the mean eigenvalue; default "
                             f"{DEFAULTS['whitening_floor']}")
    parser.add_argument("--normalisation", choices=NORMALISATIONS, default=None,
                        help="standardise: per-sample standardisation and rescaling to norm 1, certificates in "
                             "feature space; lipschitz: every stage certified, certificates in pixel space (the "
                             f"images as loaded, pixels / 255); default {DEFAULTS['normalisation']}")
    parser.add_argument("--radius", type=float, default=None,
                        help="lipschitz normalisation: rows divided by this radius before centring, whitening and "
                             f"projection onto the unit ball (pixel Lipschitz constant x 1 / radius); default {RADIUS}")
    parser.add_argument("--order-weights", type=float, nargs=3, default=None, metavar=("W0", "W1", "W2"),
                        help="lipschitz normalisation: fixed weight of the scattering orders 0, 1, 2; default "
                             f"{' '.join(map(str, ORDER_WEIGHTS))}")
    parser.add_argument("--noise-strategy", choices=("global", "per_layer", "min_energy"), default=None,
                        help=f"noise allocation, {_default_text('noise_strategy')}")
    parser.add_argument("--loss-grad-clip", type=float, default=None, help="clip each sample's logit gradient to this norm (0: no clip), "
                             f"{_default_text('loss_grad_clip')}")
    parser.add_argument("--weight-averaging", type=float, default=None, help="EMA decay of the iterates (e.g. 0.99)")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on a held-out 10%% of the training split (for tuning) instead of the test split")
    parser.add_argument("--seed", type=int, default=0, help="seed for split, init, sampling and noise")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--saliency", type=Path, default=None, metavar="PNG",
                        help="save input-gradient saliency maps of the private model on the first test images "
                             "(one file per epsilon: the epsilon is appended to the name)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def run_from_arguments(args: argparse.Namespace) -> int:
    """One run per ``--epsilons`` value: print each and the table, write ``--json``."""
    overrides = {k: getattr(args, k) for k in ("epochs", "batch_size", "learning_rate", "temperature", "groups",
                                               "centring_noise", "whitening_noise", "whitening_floor",
                                               "noise_strategy", "loss_grad_clip",
                                               "weight_averaging", "optimizer", "normalisation", "radius",
                                               "order_weights", "widths")}
    results = []
    for epsilon in args.epsilons:
        saliency = args.saliency and args.saliency.with_name(f"{args.saliency.stem}-eps{epsilon:g}.png")
        result = run(args.dataset, epsilon, args.delta, args.seed, args.front_end, args.head, args.validation,
                     progress=not args.no_progress, saliency=saliency, **overrides)
        results.append(result)
        print(f"{args.dataset} {result['front_end']}+{args.head}: accuracy {result['accuracy']:.4f} on "
              f"{result['evaluated_on']} at (epsilon={result['epsilon']:.3f}, delta={args.delta:g}), "
              f"{result['train_seconds']:.0f} s", flush=True)
    print(markdown_table(results))
    if args.json:
        write_json(args.json, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m recipes.classify``: returns the exit status (2 with one line for a user error)."""
    return run_main(PROG, build_parser, run_from_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
