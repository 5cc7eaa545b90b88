"""``lipdp demo`` (``make demo``): the main job in minutes, a preset built on library pieces (``lipdp.presets``).

Fashion-MNIST (digits if it is not installed) at (3, 1e-5)-DP: the pixels centred on their private mean
(``LipDPEngine.private_mean``, accounted in the same budget) and rescaled to norm 1 (``lipdp.statistics``), then
``InputNormClip`` and a Lipschitz linear head (``lipdp.training.train_private``, min-energy noise). The most
accurate variant, a scattering front end, is ``python -m recipes.classify`` (its features take minutes once).
"""

from __future__ import annotations

import argparse

HELP = "the main job: private training on Fashion-MNIST (or digits) at eps=3"
DESCRIPTION = ("Private training at (3, 1e-5)-DP on Fashion-MNIST if installed, else digits; prints test accuracy, "
               "certified accuracy and the privacy spent.")
RADII = (0.05, 0.1, 0.25, 0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` flags."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    """Train the preset and print accuracy, certified accuracy at ``RADII`` and the budget spent."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from lipdp.certify import certified_accuracy
    from lipdp.datasets import DatasetNotFoundError, load_dataset
    from lipdp.engine import LipDPEngine
    from lipdp.layers import InputNormClip
    from lipdp.presets import DEMO_LENGTH, DEMO_PRESET
    from lipdp.statistics import centre_and_rescale
    from lipdp.training import TrainConfig, train_private

    try:
        splits = load_dataset("fashion-mnist")
    except DatasetNotFoundError as missing:
        print(f"Fashion-MNIST not found ({missing}); the demo uses scikit-learn's digits instead.")
        splits = load_dataset("digits")
    preset = {**DEMO_PRESET, **DEMO_LENGTH[splits.name]}
    centring_noise = preset.pop("centring_noise")
    print(f"lipdp demo: private training on {splits.name} at (epsilon={preset['epsilon']:g}, delta="
          f"{preset['delta']:g}), linear Lipschitz head on pixels centred on their private mean, {preset['epochs']} "
          f"epochs, expected batch {preset['batch_size']}")
    (x_train, y_train), (x_test, y_test) = splits.train.tensors, splits.test.tensors
    engine = LipDPEngine(seed=0)
    mean = engine.private_mean(x_train.flatten(1), noise_multiplier=centring_noise, norm_bound=1.0)
    train = TensorDataset(centre_and_rescale(x_train.flatten(1), mean), y_train)
    test = TensorDataset(centre_and_rescale(x_test.flatten(1), mean), y_test)
    torch.manual_seed(0)  # the head's initial weights, like the engine's seed: the demo prints the same numbers
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(train.tensors[0].shape[1], splits.num_classes))
    config = TrainConfig(**preset, optimizer="adam")
    result, engine = train_private(model, train, test, config, progress=not args.no_progress, engine=engine)
    lipschitz = engine.lipschitz_constant()
    certified = ", ".join(f"r={r}: {certified_accuracy(model, test, r, lipschitz):.3f}" for r in RADII)
    print(f"\ntest accuracy {result.test_accuracy:.4f} at (epsilon = {result.epsilon:.3f}, delta = {config.delta:g}), "
          f"noise multiplier {result.noise_multiplier:.3f}, {result.steps} steps, {result.seconds:.0f} s of training "
          f"(the mean's release included in epsilon).\ncertified accuracy (correct with a certified L2 radius above "
          f"r, in the centred features' space): {certified}")
    return 0
