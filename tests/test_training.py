"""Private training end to end: ``lipdp.training``, ``lipdp train`` and the classify recipe (issues 4 and 5)."""

from __future__ import annotations

import json

import pytest
import torch

from lipdp.cli import main as lipdp_main
from lipdp.datasets import load_dataset
from lipdp.training import make_optimizer
from recipes import classify
from recipes.front_end import front_end_features


@pytest.mark.parametrize("name, kind", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_make_optimizer(name, kind):
    optimizer = make_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], 0.1)
    assert isinstance(optimizer, kind) and optimizer.param_groups[0]["lr"] == 0.1


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adam, sgd"):
        make_optimizer("lbfgs", [torch.nn.Parameter(torch.zeros(2))], 0.1)


@pytest.mark.slow
def test_classify_recipe_on_digits_reports_accuracy_and_certificates():
    result = classify.run("digits", epsilon=3.0, epochs=10, batch_size=256, progress=False)
    assert result["epsilon"] <= 3.0 and result["evaluated_on"] == "test"
    assert result["accuracy"] > 0.7  # chance: 0.1
    certified = [result["certified_accuracy"][str(r)] for r in classify.RADII]
    assert certified[0] == pytest.approx(result["accuracy"], abs=1e-6)  # radius 0 = plain accuracy (a float32 mean)
    assert certified == sorted(certified, reverse=True)  # certificates shrink with the radius


@pytest.mark.slow
def test_lipdp_train_on_digits_beats_chance_by_far_at_epsilon_3(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert lipdp_main(["train", "--dataset", "digits", "--epsilon", "3", "--json", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["epsilon"] <= 3.0 and record["test_accuracy"] > 0.5  # chance: 0.1
    assert record["model"] == {"kind": "mlp", "widths": [64]}  # the CNN stays near chance here (lipdp.presets)
    assert "model: orthogonal MLP (64,)" in capsys.readouterr().out


def test_lipdp_train_refuses_a_cnn_on_tabular_data(capsys):
    assert lipdp_main(["train", "--dataset", "breast_cancer", "--model", "cnn", "--epochs", "1"]) == 2
    assert "(fix: use --model mlp)" in capsys.readouterr().err


@pytest.mark.slow
def test_lipdp_train_command_writes_json_and_plot(tmp_path, capsys):
    out, plot = tmp_path / "run.json", tmp_path / "budget.png"
    assert lipdp_main(["train", "--dataset", "digits", "--epsilon", "2", "--epochs", "2", "--optimizer", "sgd",
                       "--lr", "0.5", "--json", str(out), "--plot", str(plot), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["epsilon"] <= 2.0 and record["config"]["optimizer"] == "sgd"
    assert plot.stat().st_size > 0 and "test accuracy" in capsys.readouterr().out


def test_presets_carry_their_logit_clip_into_the_training_config():
    from lipdp.presets import TRAIN_PRESETS, training_settings
    from lipdp.training import TrainConfig

    settings = training_settings(TRAIN_PRESETS["fashion-mnist"])
    assert TrainConfig(**settings).loss_grad_clip == TRAIN_PRESETS["fashion-mnist"]["loss_grad_clip"] is not None
    assert "widths" not in settings and "model" not in settings  # those build the network
    assert "loss_grad_clip" not in training_settings(TRAIN_PRESETS["digits"])  # TrainConfig's default (none) stays


def test_presets_carry_their_input_bound_into_the_config_and_the_network(tmp_path):
    """The Fashion-MNIST preset's X0 reaches TrainConfig; ``--input-norm-bound`` sets both the config's X0 and the
    network's input projection (the engine refuses a sample above the bound it is told, so a wider projection
    would stop the run)."""
    from lipdp.presets import TRAIN_PRESETS, training_settings
    from lipdp.training import TrainConfig

    assert TrainConfig(**training_settings(TRAIN_PRESETS["fashion-mnist"])).input_norm_bound == 10.0
    assert "input_norm_bound" not in training_settings(TRAIN_PRESETS["digits"])  # TrainConfig's X0 = 1 stays
    out = tmp_path / "run.json"
    assert lipdp_main(["train", "--dataset", "digits", "--epochs", "1", "--input-norm-bound", "4",
                       "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["config"]["input_norm_bound"] == 4.0


@pytest.mark.parametrize("flag, expected", [("0", None), ("0.5", 0.5)])
def test_lipdp_train_logit_clip_flag_zero_turns_the_clip_off(tmp_path, flag, expected):
    out = tmp_path / "run.json"
    assert lipdp_main(["train", "--dataset", "digits", "--epochs", "1", "--loss-grad-clip", flag,
                       "--json", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["config"]["loss_grad_clip"] == expected


@pytest.mark.parametrize("head", ["cnn", "patch"])
def test_classify_network_heads_take_the_end_to_end_defaults_not_the_linear_heads(head):
    from lipdp.presets import TRAIN_PRESETS, train_preset

    assert classify.NETWORK_PRESETS["patch"] == TRAIN_PRESETS["fashion-mnist"]  # lipdp train's network
    result = classify.run("digits", head=head, epochs=1, batch_size=256, progress=False)
    config, preset = result["config"], classify.NETWORK_PRESETS[head]
    assert preset == train_preset("fashion-mnist", head) and result["widths"] == list(preset["widths"])
    assert result["front_end"] == "pixels" and result["head"] == head
    assert (config["temperature"], config["learning_rate"]) == (preset["temperature"], preset["learning_rate"])
    assert config["loss_grad_clip"] == preset["loss_grad_clip"] and config["noise_strategy"] == "global"
    assert classify.HEAD_DEFAULTS["linear"]["temperature"] != preset["temperature"]  # the two heads differ
    unclipped = classify.run("digits", head=head, epochs=1, batch_size=256, progress=False, loss_grad_clip=0)
    assert unclipped["config"]["loss_grad_clip"] is None


def test_classify_refuses_a_cnn_head_on_several_front_end_parts():
    with pytest.raises(ValueError, match="front_end='pixels' or one scattering part"):
        classify.run("digits", front_end="scattering+pixels", head="cnn", epochs=1, progress=False)


def test_classify_cnn_head_convolves_the_preprocessed_scattering_rows_as_feature_maps():
    """The maps are the linear head's preprocessed rows (same releases), viewed as (81, h, w); the differentiable
    path from the images gives the same logits; the run certifies in pixel space with the lipschitz normalisation."""
    maps = classify.private_features("digits", "scattering", "cnn", validation=True, whitening_noise=0)
    rows = classify.private_features("digits", "scattering", "linear", validation=True, whitening_noise=0)
    assert maps.input_shape == (81, 2, 2) and maps.train.tensors[0].shape[1:] == (81, 2, 2)
    assert torch.equal(maps.train.tensors[0].flatten(1), rows.train.tensors[0])
    assert torch.equal(maps.evaluation.tensors[0].flatten(1), rows.evaluation.tensors[0])
    head = classify.build_model("cnn", maps.input_shape, 10, widths=(8,))
    images = load_dataset("digits").test.tensors[0][:5]
    logits = classify.logits_of_pixels(head, "scattering", classify.DEFAULTS["groups"], (1, 8, 8), maps.input_shape,
                                       maps.preprocessing)
    features, _ = front_end_features("scattering", images, classify.DEFAULTS["groups"])
    assert torch.allclose(logits(images), head(maps.preprocessing(features).view(5, 81, 2, 2)), atol=1e-5)
    result = classify.run("digits", front_end="scattering", head="cnn", widths=(8,), epochs=2, batch_size=256,
                          validation=True, progress=False, normalisation="lipschitz", radius=2.0)
    assert result["widths"] == [8] and result["certified_space"] == "pixels"
    assert result["epsilon"] <= 3.0  # (2 epochs on digits: the plumbing, not the accuracy, which stays near chance)
    certified = [result["certified_accuracy"][str(r)] for r in classify.RADII]
    assert certified == sorted(certified, reverse=True) and certified[0] == pytest.approx(result["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_scattering_plus_pixels_features_have_norm_one_and_train_on_digits():
    prepared = classify.prepare_data("digits", "scattering+pixels", 27, validation=False, seed=0)
    train, shape = prepared.train, prepared.input_shape
    assert shape == (81 * 2 * 2 + 64,)  # J=2 scattering of 8x8 images (81 x 2 x 2), then the 64 pixels
    norms = train.tensors[0].norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    result = classify.run("digits", epsilon=3.0, front_end="scattering+pixels", epochs=10, batch_size=256,
                          progress=False)
    assert result["epsilon"] <= 3.0 and result["accuracy"] > 0.7


@pytest.mark.slow
def test_saliency_maps_of_the_private_model_on_digits(tmp_path):
    path = tmp_path / "saliency.png"
    classify.run("digits", epsilon=3.0, epochs=3, batch_size=256, progress=False, saliency=path)
    assert path.stat().st_size > 10_000


def test_classify_centring_and_whitening_are_paid_from_the_same_budget():
    """The private mean and channel moments are two more Gaussian mechanisms: training gets more noise with each
    and the total stays within ε."""
    both = classify.run("digits", epsilon=3.0, epochs=1, batch_size=256, progress=False)
    centred = classify.run("digits", epsilon=3.0, epochs=1, batch_size=256, progress=False, whitening_noise=0)
    plain = classify.run("digits", epsilon=3.0, epochs=1, batch_size=256, progress=False, centring_noise=0,
                         whitening_noise=0)
    assert both["centring_noise"] == classify.DEFAULTS["centring_noise"]
    assert both["whitening_noise"] == classify.DEFAULTS["whitening_noise"]
    assert centred["whitening_noise"] is None and plain["centring_noise"] is None
    assert both["noise_multiplier"] > centred["noise_multiplier"] > plain["noise_multiplier"]
    for result in (both, centred, plain):
        assert 3.0 - 0.05 < result["epsilon"] <= 3.0  # each spends (nearly) the whole budget
