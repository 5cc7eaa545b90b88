"""The Opacus baseline, the lipdp-vs-Opacus comparison and the benchmark plumbing (issue 5)."""

from __future__ import annotations

import argparse

import json

import pytest
import torch
from torch import nn

from accounting import PrivacyAccountant, calibrate_noise
from benchmarks import batch_size, harness, norm_certificate, report, step_time
from benchmarks.measure import Configuration, Measurement, measure, run_isolated
from lipdp.datasets import load_dataset
from lipdp.engine import LipDPEngine
from recipes import classify, compare
from recipes.front_end import release_preprocessing
from recipes.opacus_baseline import OpacusConfig, groupnorm_cnn, train_opacus
from tests.test_cli import assert_one_line_user_error, run_in_process


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_groupnorm_cnn_fits_every_image_size(shape):
    model = groupnorm_cnn(shape, 10)
    assert model(torch.rand(5, *shape)).shape == (5, 10)
    assert any(isinstance(m, nn.GroupNorm) for m in model)
    assert 15_000 < sum(p.numel() for p in model.parameters()) < 40_000  # comparable to the orthogonal CNN


def test_opacus_baseline_spends_the_target_budget_on_digits():
    splits = load_dataset("digits")
    config = OpacusConfig(epsilon=3.0, epochs=1, batch_size=256, learning_rate=2.0, accountant="rdp")
    result = train_opacus(groupnorm_cnn(splits.input_shape, 10), splits.train, splits.test, config, progress=False)
    assert result.steps == -(-len(splits.train) // 256)  # Opacus: len(loader) steps per epoch
    assert result.sample_rate == pytest.approx(1 / result.steps)
    assert 2.9 < result.epsilon <= 3.0  # calibrated with lipdp's accountant, reported by it
    assert 0.0 <= result.test_accuracy <= 1.0 and len(result.epoch_log) == 1


def test_step_timer_times_training_steps_only():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with harness.StepTimer() as timer:
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.rand(6, 4)).sum().backward()
            optimizer.step()
            with torch.no_grad():
                model(torch.rand(6, 4))  # evaluation: not a step
        optimizer.step()  # a step with no forward before it: ignored
    model(torch.rand(6, 4))
    optimizer.step()  # after the timer closed: ignored
    assert len(timer.seconds) == 3 and timer.median() > 0


def _fake_side(accuracy: float, step: float) -> dict:
    return {"model": "m", "test_accuracy": accuracy, "epsilon": 2.99, "noise_multiplier": 1.1, "steps": 10,
            "batch_size": 64, "train_seconds": 3.0, "process_seconds": 9.0, "median_step_seconds": step,
            "timed_steps": 10, "peak_rss_bytes": 500 * 2**20, "torch_threads": 2,
            "epoch_log": [{"epoch": 1, "test_accuracy": accuracy, "epsilon": 2.99, "seconds": 3.0}]}


def test_compare_report_and_plot(tmp_path):
    settings = compare.CompareSettings(dataset="digits", epochs=1)
    results = {"lipdp": _fake_side(0.8, 0.01), "opacus-cnn": _fake_side(0.7, 0.02),
               "opacus-classify-linear": _fake_side(0.75, 0.005)}
    text = compare.markdown_report(settings, results, harness.machine_description())
    for expected in ("test accuracy", "80.00%", "median step time", "20.0 ms", "peak memory", "500 MiB",
                     "process wall time", "epsilon spent", "2.990", "|  | lipdp | Opacus cnn (ghost) | "
                     "Opacus classify-linear (ghost) |", "75.00%"):
        assert expected in text
    assert compare.plot(settings, results, tmp_path / "c.png").stat().st_size > 0
    validation = compare.markdown_report(compare.CompareSettings(validation=True), results,
                                         harness.machine_description())
    assert "| validation accuracy |" in validation and "(validation split)" in validation


def test_compare_command_line_matches_settings():
    args = compare.build_parser().parse_args(["--dataset", "digits", "--epochs", "2", "--opacus-lr", "3"])
    assert (args.dataset, args.epochs, args.opacus_learning_rate, args.side) == ("digits", 2, 3.0, None)
    assert set(compare.CompareSettings.__dataclass_fields__) - set(vars(args)) == {"progress"}
    assert args.opacus_model == ["cnn"] and not args.validation


def test_each_opacus_model_has_its_own_hyper_parameters():
    for name, model in compare.OPACUS_MODELS.items():
        settings = compare.CompareSettings(opacus_model=name)
        assert (settings.opacus_batch_size, settings.opacus_learning_rate, settings.opacus_max_grad_norm) == (
            model.batch_size, model.learning_rate, model.max_grad_norm)
    assert compare.CompareSettings(opacus_model="classify-linear", opacus_learning_rate=0.5).opacus_learning_rate == 0.5
    assert compare.CompareSettings().opacus_model == "cnn"  # the benchmarks' Opacus side unless asked
    with pytest.raises(ValueError, match="classify-linear"):
        compare.CompareSettings(opacus_model="resnet")


def test_an_unknown_opacus_model_is_one_line():
    result = run_in_process("recipes.compare", "--opacus-model", "resnet")
    assert_one_line_user_error(result, "python -m recipes.compare", "--opacus-model", "resnet", "classify-linear")


def test_private_features_are_the_front_end_rows_preprocessed_with_releases():
    """The inputs run() trains on: the front end's rows, centred and whitened with statistics released by a fresh
    engine seeded with the run's seed (as run() computed them before private_features existed)."""
    features = classify.private_features("digits", validation=True, seed=3)
    prepared = classify.prepare_data("digits", classify.DEFAULT_FRONT_END, classify.DEFAULTS["groups"], True, 3)
    engine = LipDPEngine(seed=3)
    preprocessing, rows = release_preprocessing(engine, prepared.train.tensors[0], prepared.blocks, 10.0, 10.0, 0.1)
    assert torch.equal(features.train.tensors[0], rows)
    assert torch.equal(features.evaluation.tensors[0], preprocessing(prepared.evaluation.tensors[0]))
    assert torch.equal(features.evaluation.tensors[1], prepared.evaluation.tensors[1])
    assert features.engine.accountant.history == engine.accountant.history
    assert features.engine.accountant.total_steps == 2  # the mean and the channel moments
    assert features.input_shape == (features.train.tensors[0].shape[1],) and features.num_classes == 10
    pixels = classify.private_features("digits", front_end="pixels", centring_noise=0)
    assert pixels.train.tensors[0].shape[1:] == (64,) and not pixels.blocks and not pixels.engine.accountant.history


def test_run_spends_the_same_budget_as_before_private_features():
    """Pinned from run() before the refactoring (digits, 1 epoch, B = 256): the same releases and training steps.
    Re-pinned when the PRV grid's truncation bound moved to ``accounting.guess.safe_half_width`` (σ moved by 2e-7
    relative, ε by 3e-7: a different grid, well inside the accountant's eps_error)."""
    result = classify.run("digits", epochs=1, batch_size=256, progress=False)
    assert result["noise_multiplier"] == pytest.approx(1.1495578952206444, rel=1e-9)
    assert result["epsilon"] == pytest.approx(2.999994349310583, rel=1e-9)
    assert result["steps"] == 8 and (result["centring_noise"], result["whitening_noise"]) == (10.0, 10.0)


def test_compare_sides_hold_out_the_classify_recipe_s_validation_split():
    settings = compare.CompareSettings(dataset="digits", validation=True)
    _, train, evaluation = compare._splits(settings)
    features = classify.private_features("digits", validation=True, seed=0)
    assert len(train) == len(features.train) and len(evaluation) == len(features.evaluation) == 144
    assert torch.equal(evaluation.tensors[1], features.evaluation.tensors[1])


def test_train_opacus_pays_for_what_was_spent_before():
    features = classify.private_features("digits", seed=0)
    spent = features.engine.accountant.history
    config = OpacusConfig(epsilon=3.0, epochs=1, batch_size=256, learning_rate=2.0, max_grad_norm=0.1)
    result = train_opacus(classify.build_model("linear", features.input_shape, 10), features.train,
                          features.evaluation, config, progress=False, spent=spent)
    training_steps = -(-len(features.train) // 256)
    assert result.steps == training_steps + 2  # the accountant's count: the two releases and the steps
    assert 2.9 < result.epsilon <= 3.0
    training_only = PrivacyAccountant("prv", history=[(result.noise_multiplier, result.sample_rate, training_steps)])
    assert training_only.epsilon(1e-5) < result.epsilon  # the releases are in the reported epsilon
    assert result.noise_multiplier > calibrate_noise(3.0, 1e-5, result.sample_rate, steps=training_steps)


def test_compare_runs_opacus_on_the_classify_features_in_process():
    settings = compare.CompareSettings(dataset="digits", epochs=1, opacus_model="classify-linear",
                                       opacus_batch_size=256, progress=False)
    result = compare.run_side("opacus", settings)
    assert result["epsilon"] <= 3.0 and result["timed_steps"] == result["steps"] - 2 > 0  # releases: not steps
    for words in ("scattering+fine-scattering+pixels front end", "centred on a private mean (noise multiplier 10)",
                  "whitened by private channel moments (noise multiplier 10)", "InputNormClip(1), Linear",
                  "cross-entropy", "Opacus ghost", f"C={settings.opacus_max_grad_norm}"):
        assert words in result["model"]
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["batch_size"] == 256


@pytest.mark.parametrize("method", ["plain-orthogonal", "lipdp", "plain-cnn", "opacus-ghost", "opacus-hooks"])
def test_measure_runs_each_method_in_process(method):
    result = measure(Configuration(method, batch_size=8, steps=1, warmup=0))
    assert result.status == "ok" and len(result.step_seconds) == 1
    assert result.peak_rss_bytes >= result.setup_rss_bytes > 0
    assert Measurement.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def _measurement(method: str, batch: int, seconds: float, peak_mib: int, status: str = "ok") -> Measurement:
    ok = status == "ok"
    return Measurement(Configuration(method, batch), status, [seconds] if ok else [], seconds if ok else None,
                       peak_mib * 2**20, 400 * 2**20, 2 if ok else None)


def test_batch_size_tables_and_largest_batch():
    limit = 1000 * 2**20
    measurements = [_measurement("lipdp", 64, 0.1, 500), _measurement("opacus-ghost", 64, 0.2, 600),
                    _measurement("lipdp", 128, 0.15, 520), _measurement("opacus-ghost", 128, 0.0, 0, "oom")]
    text = batch_size.markdown(measurements, ["lipdp", "opacus-ghost"], limit, 5, 2, [0.0, 0.0, 0.0])
    assert "| 128 | 150.0 | oom |" in text
    assert "| 64 | 500 (+100) | 600 (+200) |" in text
    assert "| lipdp | orthogonal CNN, Adam, LipDPEngine | ≥ 128 |" in text
    assert "| opacus-ghost | GroupNorm CNN, SGD, Opacus ghost clipping | 64 |" in text
    assert "| 64 | 0.50 |" in text  # lipdp / fastest Opacus time


def test_step_time_cases_and_table():
    assert step_time.parse_case("mlp-compiled:700") == ("mlp", True, 700)
    with pytest.raises(argparse.ArgumentTypeError):
        step_time.parse_case("resnet:64")
    rows = [{"case": "mlp:64", "plain_seconds": 0.001, "noise_floor_seconds": 0.00102, "lipdp_seconds": 0.00115,
             "noise_floor_ratio": 1.02, "time_ratio": 1.15, "threads": 2},
            {"case": "cnn:256", "plain_seconds": 0.1, "noise_floor_seconds": 0.1, "lipdp_seconds": 0.103,
             "noise_floor_ratio": 1.0, "time_ratio": 1.03, "threads": 2}]
    text = step_time.markdown(rows, 40, 5, [0.0, 0.0, 0.0])
    assert "| mlp:64 | 1.000 | 1.020 | 1.150 | 1.020 | 1.150 (misses ≤ 1.05) |" in text and "1.030 (meets ≤ 1.05)" in text


def test_step_time_measures_every_side_in_one_process():
    row = step_time.measure_case("mlp", False, 8, rounds=2, warmup=1, threads=1)
    assert row["plain_seconds"] > 0 and row["noise_floor_seconds"] > 0 and row["lipdp_seconds"] > 0
    assert all(len(row["times"][side]) == 2 for side in step_time.SIDES)


def test_results_sections_are_replaced_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    report.write_section("a", "first", path)
    report.write_section("b", "second", path)
    report.write_section("a", "third", path)
    text = path.read_text()
    assert text.startswith(report.HEADER) and "first" not in text
    assert text.index("third") < text.index("second")


@pytest.mark.slow
def test_isolated_measurement_reports_out_of_memory():
    tight = run_isolated(Configuration("plain-orthogonal", batch_size=8192, steps=1, warmup=0),
                         memory_limit_bytes=10**9)
    assert tight.status == "oom" and not tight.fits(10**9)
    roomy = run_isolated(Configuration("plain-cnn", batch_size=16, steps=1, warmup=0), memory_limit_bytes=4 * 10**9)
    assert roomy.fits(4 * 10**9) and roomy.median_step_seconds > 0


@pytest.mark.slow
def test_compare_end_to_end_on_digits(tmp_path):
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    assert compare.main(["--dataset", "digits", "--epochs", "1", "--lipdp-recipe", "cnn", "--lipdp-batch-size", "256",
                         "--opacus-batch-size", "256", "--opacus-lr", "2", "--no-progress", "--out-dir", str(out),
                         "--opacus-model", "cnn", "classify-linear", "--results", str(results)]) == 0
    outcome = json.loads((out / "compare.json").read_text())
    assert list(outcome["results"]) == ["lipdp", "opacus-cnn", "opacus-classify-linear"]
    for key, result in outcome["results"].items():
        releases = 2 if key == "opacus-classify-linear" else 0
        assert result["epsilon"] <= 3.0 and result["timed_steps"] == result["steps"] - releases
        assert result["peak_rss_bytes"] > 0 and result["process_seconds"] > result["train_seconds"]
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.json", "compare.png"}
    assert "<!-- BEGIN compare -->" in results.read_text() and "## lipdp vs Opacus" in results.read_text()


@pytest.mark.slow
def test_accuracy_table_on_digits(tmp_path):
    from benchmarks import accuracy

    results, raw = tmp_path / "R.md", tmp_path / "a.json"
    common = ["--datasets", "digits", "--epsilons", "3", "--epochs", "2", "--results", str(results),
              "--json", str(raw), "--no-progress"]
    assert accuracy.main(common + ["--rows", "lipdp"]) == 0
    assert accuracy.main(common + ["--rows", "opacus", "lipdp-cnn", "--append"]) == 0  # keeps the lipdp run
    records = json.loads(raw.read_text())["records"]
    assert [r["side"] for r in records] == list(compare.SIDES)  # no end-to-end CNN row: digits trains an MLP
    for record in records:
        assert record["epsilon"] <= 3.0 and record["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    text = results.read_text()
    assert "<!-- BEGIN accuracy -->" in text and "ε = 3" in text


def test_accuracy_table_runs_the_end_to_end_cnn_row_at_its_own_preset():
    from benchmarks import accuracy
    from lipdp.presets import TRAIN_PRESETS

    cnn = accuracy.row_settings("lipdp-cnn", "fashion-mnist")
    assert cnn.lipdp_recipe == "cnn" and cnn.epochs == TRAIN_PRESETS["fashion-mnist"]["epochs"]
    assert accuracy.row_settings("lipdp", "fashion-mnist").epochs == accuracy.DATASET_SETTINGS["fashion-mnist"].epochs
    assert accuracy.row_settings("lipdp-cnn", "digits") is None  # lipdp train's digits preset is the MLP


def test_norm_certificate_benchmark_times_both_paths():
    row = norm_certificate.measure("conv", (32, 16, 3, 3), (14, 14), repeats=1)
    assert row["warm"] and row["cold_seconds"] > 0 and row["warm_seconds"] > 0
    assert 1.0 <= row["margin"] <= (1 + 1e-3) ** 0.5 * (1 + 1e-9)
