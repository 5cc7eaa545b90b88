"""Settings presets of ``lipdp train`` and ``lipdp demo``, per data set (library data: the CLI, the recipes and the
benchmarks read them from here).

Chosen on a validation split of the training data, never on the test split (README, "Results and how the settings
were chosen"). On digits (1,437 training images) the orthogonal CNN stays near chance at epsilon = 3 (15% on a 20%
validation split), an orthogonal MLP on the pixels reaches 71%: digits trains the MLP.
"""

from __future__ import annotations

TRAIN_PRESETS: dict[str, dict] = {
    # The patch CNN (no patch-overlap factor in its bounds), one stage of 4 channels, inputs projected onto the ball
    # of radius X0 = 10 (the images' median norm is 12.2) and tau = 4: 83.50% / 83.17% validation (seeds 0 / 1) at
    # epsilon = 3, against 77.88% / 79.45% with X0 = 1, tau = 8 and 4 / 8 channels, the previous preset (README, "The
    # end-to-end network").
    "fashion-mnist": dict(model="patch", epochs=6, batch_size=2048, learning_rate=1e-2, widths=(4,),
                          temperature=4.0, loss_grad_clip=1.0, input_norm_bound=10.0),
    "digits": dict(model="mlp", epochs=30, batch_size=256, learning_rate=5e-2, widths=(64,), temperature=8.0),
    # Any other data set: the CNN for images, the MLP otherwise (model None: chosen from the data's shape).
    "default": dict(model=None, epochs=30, batch_size=256, learning_rate=2e-2, widths=(32, 64), temperature=8.0),
}

#: A data set's preset for a kind other than its own (chosen on its validation split): what ``--model KIND`` takes.
DATASET_KIND_PRESETS: dict[tuple[str, str], dict] = {
    ("fashion-mnist", "cnn"): dict(model="cnn", epochs=6, batch_size=2048, learning_rate=1e-2, widths=(16, 32, 64),
                                   temperature=8.0, loss_grad_clip=1.0),
}

#: A model kind's preset where the data set has none for it (else the "default" one). The patch CNN's: the
#: Fashion-MNIST preset's length and learning rate (on digits it reaches 35-44% validation against the MLP's 79%,
#: README).
KIND_PRESETS: dict[str, dict] = {
    "patch": dict(epochs=6, batch_size=2048, learning_rate=1e-2, widths=(32, 64), temperature=8.0),
}

#: ``lipdp demo``: pixels centred on their private mean -> InputNormClip -> Lipschitz linear head, min-energy noise
#: (the classification recipe's settings for its linear head, README), per data set the epochs and batch size.
DEMO_PRESET = dict(epsilon=3.0, delta=1e-5, learning_rate=0.1, temperature=1.0, loss_grad_clip=0.5,
                   noise_strategy="min_energy", centring_noise=10.0)
DEMO_LENGTH = {"fashion-mnist": dict(epochs=10, batch_size=4096), "digits": dict(epochs=30, batch_size=512)}


#: The preset keys that are ``lipdp.training.TrainConfig`` fields (``model`` and ``widths`` build the network); a
#: preset without ``loss_grad_clip`` keeps TrainConfig's default (no clip).
TRAINING_KEYS = ("epochs", "batch_size", "learning_rate", "temperature", "loss_grad_clip", "input_norm_bound")


def input_norm_bound(preset: dict) -> float:
    """The X0 a preset's network projects its inputs onto (``InputNormClip``): its own, else TrainConfig's 1."""
    return preset.get("input_norm_bound", 1.0)


def training_settings(preset: dict) -> dict:
    """The ``TrainConfig`` fields a preset sets: ``TrainConfig(**training_settings(preset), ...)``."""
    return {key: preset[key] for key in TRAINING_KEYS if key in preset}


def train_preset(dataset: str, model: str | None = None) -> dict:
    """``lipdp train``'s defaults for ``dataset``; with ``model`` ('cnn' / 'patch' / 'mlp') different from the data
    set's own choice, the data set's preset for that model (``DATASET_KIND_PRESETS``), else the generic one
    (``KIND_PRESETS``, else the default widths and learning rate)."""
    preset = TRAIN_PRESETS.get(dataset, TRAIN_PRESETS["default"])
    if model is not None and preset["model"] not in (None, model):
        if (dataset, model) in DATASET_KIND_PRESETS:
            return dict(DATASET_KIND_PRESETS[(dataset, model)])
        return {**TRAIN_PRESETS["default"], **KIND_PRESETS.get(model, {}), "model": model}
    return dict(preset)


def image_network_preset(dataset: str) -> dict:
    """The preset of ``dataset``'s end-to-end image network: its own where that is convolutional ('cnn' or
    'patch'), else the CNN's (``train_preset(dataset, 'cnn')``; digits trains an MLP)."""
    preset = train_preset(dataset)
    return preset if preset["model"] in ("cnn", "patch") else train_preset(dataset, "cnn")


def choose_model(dataset: str, input_shape: tuple[int, ...], requested: str | None = None) -> tuple[str, dict]:
    """The model kind ('cnn' / 'patch' / 'mlp') and its preset: ``requested``, else the data set's, else the CNN for
    images and the MLP otherwise. A convolutional kind on data that are not images is refused (one line with the
    fix)."""
    image = len(input_shape) == 3
    kind = requested or train_preset(dataset)["model"] or ("cnn" if image else "mlp")
    if kind != "mlp" and not image:
        raise ValueError(f"--model {kind} needs image data; {dataset} has samples of shape {tuple(input_shape)}. "
                         "Fix: use --model mlp")
    return kind, train_preset(dataset, kind)
