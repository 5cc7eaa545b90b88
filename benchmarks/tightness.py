"""How tight lipdp's certified bounds are on real data: each parameter's real per-sample gradient norm over its bound.

    python -m benchmarks.tightness                       # Fashion-MNIST, the CNN and the patch CNN; rewrites RESULTS.md
    python -m benchmarks.tightness --networks cnn --samples 64 --steps 0 --results /tmp/R.md

For each network (``lipdp.models.orthogonal_network``: ``cnn`` = ``lipdp train``'s orthogonal CNN, ``patch`` = the
patch CNN whose trainable layers have no overlap factor), at initialisation and after ``--steps`` plain
(non-private) Adam steps on the training split (widths: each network's Fashion-MNIST preset): the real per-sample gradients of every parameter on ``--samples``
real training images (``lipdp.clipping.PerRowGradients``, torch.func), each norm divided by the certified bound
Delta the engine uses for that parameter (``LipDPEngine.current_bounds``), median over the images. The last
column compares the whole gradient: median ||g_i|| over sqrt(sum Delta^2) — how much more noise the certified
mechanism adds than clipping at the typical norm would. 1.0 would be a bound met exactly.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

from benchmarks.report import OUT_DIR, RESULTS, table, write_json, write_section
from lipdp.presets import TRAIN_PRESETS, input_norm_bound, train_preset

logger = logging.getLogger(__name__)

SECTION = "tightness"
#: kind -> its preset: the networks of ``lipdp train --dataset fashion-mnist --model KIND`` (widths, input bound X0).
NETWORKS = {kind: train_preset("fashion-mnist", kind) for kind in ("cnn", "patch")}
TEMPERATURE = 8.0
LEARNING_RATE = 1e-3
#: The logit-gradient clip of ``lipdp train``'s Fashion-MNIST preset: the bound the engine uses there.
PRESET_LOSS_GRAD_CLIP = TRAIN_PRESETS["fashion-mnist"].get("loss_grad_clip")


def measure(kind: str, widths: tuple[int, ...], x0: float, images, labels, train_images, train_labels,
            steps: int, seed: int, loss_grad_clip: float | None = None) -> list[dict]:
    """Tightness per parameter at initialisation and after ``steps`` plain Adam steps (rows of the table). With
    ``loss_grad_clip`` C, the bounds and the real gradients both have each sample's logit gradient clipped to C."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lipdp import LipDPEngine
    from lipdp.clipping import PerRowGradients
    from lipdp.losses import LipschitzCrossEntropy
    from lipdp.models import orthogonal_network

    torch.manual_seed(seed)
    model = orthogonal_network(kind, tuple(images.shape[1:]), int(labels.max()) + 1, widths, input_norm_bound=x0)
    criterion = LipschitzCrossEntropy(TEMPERATURE)
    rows, done = [], 0
    for target in sorted({0, steps}):
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        generator = torch.Generator().manual_seed(seed)
        while done < target:  # plain training, to see the bounds on weights that have learned something
            batch = torch.randint(0, len(train_images), (256,), generator=generator)
            optimizer.zero_grad()
            criterion(model(train_images[batch]), train_labels[batch]).backward()
            optimizer.step()
            done += 1
        probe = _copy(model, kind, widths, x0, images, labels)
        engine = LipDPEngine(seed=seed)
        probe, _, _ = engine.make_private(module=probe, optimizer=torch.optim.SGD(probe.parameters(), lr=0.0),
                                          data_loader=DataLoader(TensorDataset(images, labels), batch_size=len(images)),
                                          criterion=criterion, noise_multiplier=1.0, input_norm_bound=x0,
                                          loss_grad_clip=loss_grad_clip)
        bounds = engine.current_bounds().sensitivities
        mechanism = engine.mechanism
        per_row = PerRowGradients(probe, mechanism.materialized, mechanism.plan.plain_parameters())
        weights = per_row.weights()
        with torch.no_grad():
            logits = probe.forward(images)
        logits.requires_grad_(True)
        summed = LipschitzCrossEntropy(TEMPERATURE, reduction="sum")(logits, labels)
        (grad_outputs,) = torch.autograd.grad(summed, logits)
        if loss_grad_clip is not None:  # as the engine's output hook does
            grad_outputs = grad_outputs * (loss_grad_clip / grad_outputs.norm(dim=1, keepdim=True)).clamp(max=1.0)
        norms: dict[str, list[float]] = {}
        for start in range(0, len(images), 32):
            chunk = per_row(weights, images[start:start + 32], grad_outputs[start:start + 32])
            for name, value in chunk.items():
                norms.setdefault(name, []).extend(value.flatten(1).norm(dim=1).tolist())
        whole = [sum(norms[name][i] ** 2 for name in norms) ** 0.5 for i in range(len(images))]
        total_bound = sum(delta**2 for delta in bounds.values()) ** 0.5
        parameters = sum(weight.numel() for weight in weights.values())
        rows.append({"network": kind, "widths": list(widths), "input_norm_bound": x0, "parameters": parameters,
                     "steps": target, "loss_grad_clip": loss_grad_clip,
                     "tightness": {name: statistics.median(values) / bounds[name] for name, values in norms.items()},
                     "layers": {name: _layer_kind(probe, name) for name in norms},
                     "whole": statistics.median(whole) / total_bound, "total_bound": total_bound})
        logger.info("%s after %d steps: %s", kind, target, rows[-1]["tightness"])
    return rows


def _copy(model, kind: str, widths: tuple[int, ...], x0: float, images, labels):
    """A fresh network of the same kind with ``model``'s weights (the engine's hooks stay off the trained one)."""
    from lipdp.models import orthogonal_network

    probe = orthogonal_network(kind, tuple(images.shape[1:]), int(labels.max()) + 1, widths, input_norm_bound=x0)
    probe.load_state_dict(model.state_dict())
    return probe


def _layer_kind(model, name: str) -> str:
    """'conv 3x3 s1', 'conv 2x2 s2', 'dense' ... for the parameter ``name`` (its module's geometry)."""
    from torch import nn

    owner, _, attribute = name.rpartition(".")
    module = model.get_submodule(owner)
    if isinstance(module, nn.Conv2d):
        (kh, kw), (stride, _) = module.kernel_size, module.stride
        return f"conv {kh}x{kw} stride {stride} {attribute}"
    return f"dense {attribute}"


def render(rows: list[dict], samples: int) -> str:
    """The section: one row per (network, training steps), the median tightness of each parameter."""
    lines = []
    for row in rows:
        cells = ", ".join(f"{name} ({row['layers'][name]}): {value:.2f}" for name, value in row["tightness"].items())
        clip = row.get("loss_grad_clip")
        lines.append([f"{row['network']} {tuple(row['widths'])}, X0 = {row['input_norm_bound']:g}",
                      str(row["parameters"]), "none" if clip is None else f"{clip:g}", str(row["steps"]), cells,
                      f"{row['whole']:.2f}"])
    return "\n".join([
        f"Median over {samples} real Fashion-MNIST training images of each parameter's real per-sample gradient norm "
        "(torch.func) over its certified bound Delta; last column: median whole-gradient norm over sqrt(sum Delta^2). "
        f"Lipschitz cross-entropy at tau = {TEMPERATURE:g}; plain Adam (lr {LEARNING_RATE:g}, batch 256) before the "
        "later rows. With a logit clip C (the engine's `loss_grad_clip`, `lipdp train`'s Fashion-MNIST preset uses "
        f"{PRESET_LOSS_GRAD_CLIP:g}), each sample's logit gradient is clipped to C in both the bound and the real "
        "gradient. Regenerate: `python -m benchmarks.tightness`.",
        "",
        table(["network", "parameters", "logit clip", "plain steps", "median real / bound per parameter",
               "whole gradient"], lines),
    ])


def main(argv: list[str] | None = None) -> int:
    """Measure and rewrite the RESULTS.md section."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tightness", description=__doc__.split("\n")[0])
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
    parser.add_argument("--samples", type=int, default=256, help="real training images the medians are over")
    parser.add_argument("--steps", type=int, default=150, help="plain Adam steps before the second measurement")
    parser.add_argument("--loss-grad-clips", type=float, nargs="+", default=[0.0, PRESET_LOSS_GRAD_CLIP],
                        metavar="C", help="logit-gradient clips to measure under, 0 for none (default: none and "
                                          "the Fashion-MNIST preset's, %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose section is rewritten")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lipdp.datasets import load_dataset

    splits = load_dataset("fashion-mnist", seed=args.seed)
    train_images, train_labels = splits.train.tensors
    images, labels = train_images[:args.samples], train_labels[:args.samples]
    rows = []
    for kind in args.networks:
        for clip in dict.fromkeys(args.loss_grad_clips):
            preset = NETWORKS[kind]
            rows += measure(kind, tuple(preset["widths"]), input_norm_bound(preset), images, labels,
                            train_images, train_labels, args.steps, args.seed, clip or None)
    write_json(OUT_DIR / f"{SECTION}.json", rows)
    print(f"wrote {write_section(SECTION, render(rows, args.samples), args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
