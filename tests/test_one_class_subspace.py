"""The private subspace detector (issue 16): its certified Lipschitz constant against gradient ascent, the
sensitivity of its second release with the first one's mean, its accounting (and nothing spent on a refused call),
detection on data with a known subspace, the subspace coordinates OCSDF trains on (their certified constant), and
the recipe's subspace paths end to end."""

from __future__ import annotations

import math

import pytest
import torch

from accounting import calibrate_noise
from lipdp.engine import LipDPEngine
from lipdp.one_class import SubspaceCoordinates, SubspaceResidual, auroc, fit_private_subspace, fit_subspace
from lipdp.one_class.subspace import top_eigenvectors
from lipdp.statistics import ChannelBlock, channel_moments_query


def _orthonormal(features: int, rank: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(features, rank, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


def _ascended_ratio(detector: torch.nn.Module, features: int, seed: int, steps: int = 150) -> float:
    """max over pairs of ||f(x) - f(y)|| / ||x - y||, by Adam on a batch of pairs (a lower bound of Lip(f))."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(64, features, generator=generator, dtype=torch.float64).requires_grad_()
    y = (x.detach() + 0.1 * torch.randn(64, features, generator=generator, dtype=torch.float64)).requires_grad_()
    optimizer = torch.optim.Adam([x, y], lr=0.05)
    best = 0.0
    for _ in range(steps):
        ratio = (detector(x) - detector(y)).norm(dim=1) / (x - y).norm(dim=1).clamp_min(1e-9)
        best = max(best, ratio.max().item())
        optimizer.zero_grad()
        (-ratio.sum()).backward()
        optimizer.step()
    return best


@pytest.mark.parametrize("features,rank,basis_scale", [(6, 2, 1.0), (20, 5, 1.0), (8, 8, 1.0), (10, 0, 1.0),
                                                        (12, 3, 1.3), (12, 3, 0.5), (30, 29, 1.0)])
def test_certified_lipschitz_is_never_exceeded_by_gradient_ascent(features, rank, basis_scale):
    """Orthonormal bases (the detector's own), full rank (score 0), rank 0 (the distance to the mean), and scaled
    bases, whose projection is not orthogonal: observed <= claimed (up to float64 rounding of the scores, 1e-12:
    the constant is certified for exact arithmetic); for orthonormal ones the claim is 1, and reached."""
    torch.manual_seed(features + rank)
    basis = _orthonormal(features, rank, seed=rank) * basis_scale
    detector = SubspaceResidual(torch.randn(features), basis)
    claimed = detector.lipschitz()
    observed = _ascended_ratio(detector, features, seed=features)
    assert observed <= claimed + 1e-12
    if basis_scale == 1.0 and rank < features:
        assert claimed == pytest.approx(1.0, abs=1e-8) and observed > 0.99
    x = torch.randn(256, features, dtype=torch.float64, requires_grad=True)  # gradient norms at random points
    (grad,) = torch.autograd.grad(detector(x).sum(), x)
    assert grad.norm(dim=1).max().item() <= claimed + 1e-12


@pytest.mark.parametrize("features,rank,basis_scale", [(6, 2, 1.0), (20, 5, 1.0), (8, 8, 1.0), (10, 0, 1.0),
                                                        (12, 3, 1.3), (12, 3, 0.5), (12, 3, 0.8)])
def test_coordinates_certified_lipschitz_is_never_exceeded_by_gradient_ascent(features, rank, basis_scale):
    """The map to (P^T (x - mu), ||(I - P P^T)(x - mu)||): observed <= sqrt(max(1, 1 - s^2 + s^4)), 1 and reached
    for orthonormal bases; scaled bases (s = 1.3: 1.47; s = 0.5, 0.8: 1) are checked against the same formula, and
    the Jacobian's spectral norm at random points stays below it too."""
    torch.manual_seed(features + rank)
    basis = _orthonormal(features, rank, seed=rank) * basis_scale
    coordinates = SubspaceCoordinates(torch.randn(features), basis)
    claimed = coordinates.lipschitz()
    s2 = basis_scale**2 if rank else 0.0
    assert claimed == pytest.approx(max(1.0, 1 - s2 + s2**2) ** 0.5, rel=1e-8)
    observed = _ascended_ratio(coordinates, features, seed=features)
    assert observed <= claimed + 1e-12
    if basis_scale == 1.0:
        assert claimed == pytest.approx(1.0, abs=1e-8) and observed > 0.99
    for point in torch.randn(16, features, dtype=torch.float64):
        jacobian = torch.autograd.functional.jacobian(lambda v: coordinates(v[None])[0], point)
        assert torch.linalg.matrix_norm(jacobian, ord=2).item() <= claimed + 1e-12


def test_coordinates_are_the_subspace_coordinates_and_the_residual_distance():
    mean, basis = torch.tensor([1.0, 2.0, 3.0]), torch.eye(3, dtype=torch.float64)[:, :2]
    rows = torch.tensor([[1.0, 2.0, 3.0], [5.0, -1.0, 3.0], [1.0, 2.0, 7.0], [0.0, 0.0, 0.0]])
    expected = [[0.0, 0.0, 0.0], [4.0, -3.0, 0.0], [0.0, 0.0, 4.0], [-1.0, -2.0, 3.0]]
    assert SubspaceCoordinates(mean, basis)(rows).tolist() == expected
    assert (SubspaceCoordinates(mean, basis)(rows)[:, -1] == -SubspaceResidual(mean, basis)(rows)[:, 0]).all()


def test_the_score_is_minus_the_distance_to_the_affine_subspace():
    mean, basis = torch.tensor([1.0, 2.0, 3.0]), torch.eye(3, dtype=torch.float64)[:, :2]
    rows = torch.tensor([[1.0, 2.0, 3.0], [5.0, -1.0, 3.0], [1.0, 2.0, 7.0], [0.0, 0.0, 0.0]])
    assert SubspaceResidual(mean, basis)(rows)[:, 0].tolist() == pytest.approx([0.0, 0.0, -4.0, -3.0])


def test_top_eigenvectors_are_ordered_by_eigenvalue():
    moment = torch.diag(torch.tensor([1.0, 5.0, 3.0, -2.0], dtype=torch.float64))
    vectors = top_eigenvectors(moment, 2)
    assert vectors.abs().argmax(dim=0).tolist() == [1, 2]
    with pytest.raises(ValueError, match="rank"):
        top_eigenvectors(moment, 5)


def test_second_release_sensitivity_with_the_released_mean_holds_for_adversarial_records():
    """Once the mean is public, adding one record (of any norm) moves the moment query by <= R^2 (Frobenius)."""
    torch.manual_seed(0)
    rows, mean, bound = torch.randn(50, 7) * 3, torch.randn(7), 2.0
    block = [ChannelBlock(0, 7, 1)]
    (base,) = channel_moments_query(rows - mean, block, bound)
    for extra in (torch.randn(1, 7) * 100, mean[None] + 1e-3, torch.zeros(1, 7)):
        (moved,) = channel_moments_query(torch.cat([rows, extra]) - mean, block, bound)
        assert torch.linalg.matrix_norm(moved - base).item() <= bound**2 * (1 + 1e-12)


def test_fit_private_subspace_is_accounted_as_two_full_data_releases():
    torch.manual_seed(0)
    sigma = calibrate_noise(8.0, 1e-5, 1.0, steps=2, backend="rdp")
    engine = LipDPEngine(accountant="rdp", seed=0)
    fit_private_subspace(engine, torch.randn(100, 6), 2, 3.0, sigma, sigma)
    assert engine.accountant.total_steps == 2
    assert engine.get_epsilon(1e-5) == pytest.approx(8.0, rel=2e-2) and engine.get_epsilon(1e-5) <= 8.0


def test_a_refused_fit_spends_nothing():
    engine = LipDPEngine(accountant="rdp", seed=0)
    for rank, bound in ((7, 1.0), (-1, 1.0), (2, 0.0)):
        with pytest.raises(ValueError):
            fit_private_subspace(engine, torch.randn(20, 6), rank, bound, 1.0, 1.0)
    assert engine.accountant.total_steps == 0


def _planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normals near a 3-dimensional affine subspace of R^40; anomalies spread in every direction."""
    generator = torch.Generator().manual_seed(seed)
    basis = _orthonormal(40, 3, seed=99).float()
    normals = 0.5 + 3 * torch.randn(n, 3, generator=generator) @ basis.T + 0.05 * torch.randn(n, 40, generator=generator)
    anomalies = 0.5 + 0.5 * torch.randn(n, 40, generator=generator)
    return normals, anomalies


def test_detectors_find_a_planted_subspace():
    normals, anomalies = _planted(4000, seed=0)
    test_normals, test_anomalies = _planted(500, seed=1)
    exact = fit_subspace(normals, 3)
    assert auroc(exact(test_normals)[:, 0], exact(test_anomalies)[:, 0]) > 0.99
    sigma = calibrate_noise(8.0, 1e-5, 1.0, steps=2, backend="rdp")
    private = fit_private_subspace(LipDPEngine(accountant="rdp", seed=0), normals, 3, 8.0, sigma, sigma)
    assert auroc(private(test_normals)[:, 0], private(test_anomalies)[:, 0]) > 0.97
    # the released subspace is close to the planted one (principal angles' cosines near 1)
    overlap = torch.linalg.svdvals(private.basis.T @ exact.basis)
    assert overlap.min().item() > 0.95


def test_detector_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="basis"):
        SubspaceResidual(torch.zeros(4), torch.zeros(5, 2))


# ------------------------------------------------------------------------------------------------- recipe


def test_recipe_subspace_on_digits_images_certifies_in_pixel_space():
    """Default image detector: certified scattering rows of the digits, radii in the images' units, the PGD attack
    on the images through the scattering never below the certificate, the budget met."""
    from recipes import one_class

    (result,) = one_class.run(one_class.parse_args([
        "--dataset", "digits", "--normal-class", "3", "--epsilon", "3", "--nonprivate-reference", "--rank", "5",
        "--radii", "0", "0.25", "1", "--attack-steps", "5", "--attack-samples", "30", "--quiet",
    ]))
    assert result["raw_radius_factor"] == 16.0
    for method in ("private", "nonprivate"):
        run = result[method]
        assert run["lipschitz"] == pytest.approx(1.0, abs=1e-6)
        assert run["auroc"] > 0.8 and run["certified"]["0.0"] == run["auroc"] >= run["certified"]["1.0"]
        for r, attacked in run["attack_subset"]["attacked"].items():
            assert attacked >= run["attack_subset"]["certified"][r] - 1e-12
    assert result["private"]["epsilon"] <= 3.0 + 1e-6 and result["private"]["steps"] == 2


def test_recipe_ocsdf_on_scattering_coordinates_of_digits_certifies_in_pixel_space():
    """OCSDF on images by default trains on the subspace coordinates of the certified scattering rows: one
    accountant for the two releases and the training (2 + training steps, epsilon <= the target), the detector's
    constant is the coordinates' times the network's, and the PGD attack on the images never beats the
    certificate."""
    from recipes import one_class

    args = one_class.parse_args([
        "--dataset", "digits", "--detector", "ocsdf", "--normal-class", "3", "--epsilon", "3", "--rank", "5",
        "--epochs", "10", "--batch-size", "32", "--warm-start-steps", "5", "--nonprivate-reference", "--radii", "0", "0.25", "1",
        "--attack-steps", "5", "--attack-samples", "30", "--quiet",
    ])
    (result,) = one_class.run(args)
    assert args.features == "scattering" and args.lam == 0.0 and args.hidden == [128, 128]
    for method in ("private", "nonprivate"):
        run = result[method]
        assert 0.0 < run["lipschitz"] <= 1.0 + 1e-3
        assert run["certified"]["0.0"] == run["auroc"] >= run["certified"]["1.0"]
        for r, attacked in run["attack_subset"]["attacked"].items():
            assert attacked >= run["attack_subset"]["certified"][r] - 1e-12
    assert result["nonprivate"]["auroc"] > 0.75  # ~110 normals: at epsilon = 3 the private one is noise (README)
    private = result["private"]
    training_steps = 10 * round(result["n_train"] / 32)
    assert private["steps"] == 2 + training_steps
    assert 2.9 <= private["epsilon"] <= 3.0 + 1e-6


def test_recipe_subspace_on_a_table(capsys):
    from recipes import one_class

    (result,) = one_class.run(one_class.parse_args([
        "--dataset", "breast_cancer", "--detector", "subspace", "--rank", "3", "--epsilon", "8", "--quiet"]))
    assert 0.5 < result["private"]["auroc"] <= 1.0 and math.isfinite(result["private"]["lipschitz"])
    assert "subspace eps=8" in capsys.readouterr().out


def test_recipe_writes_its_summary_as_a_results_section(tmp_path, capsys):
    from recipes import one_class

    results = tmp_path / "RESULTS.md"
    results.write_text("# kept\n\n<!-- BEGIN other -->\nuntouched\n<!-- END other -->\n")
    argv = ["--dataset", "breast_cancer", "--detector", "subspace", "--rank", "3", "--epsilon", "8",
            "--isolation-forest", "--quiet", "--results", str(results)]
    assert one_class.main(argv) == 0
    text = results.read_text()
    printed = capsys.readouterr().out
    assert "untouched" in text and "<!-- BEGIN one_class-breast_cancer -->" in text
    assert "python -m recipes.one_class --dataset breast_cancer --detector subspace" in text
    summary_line = next(line for line in printed.splitlines() if "subspace eps=8" in line)
    assert summary_line in text  # the printed table, not a second rendering of it
    assert one_class.main(argv) == 0 and results.read_text().count("BEGIN one_class-breast_cancer") == 1


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "breast_cancer", "--features", "scattering", "--detector", "subspace"], "needs images"),
    (["--dataset", "breast_cancer", "--detector", "ocsdf", "--features", "scattering"], "needs images"),
    (["--dataset", "digits", "--detector", "ocsdf", "--epsilon", "3", "--release-fraction", "1"],
     "--release-fraction"),
    (["--dataset", "breast_cancer", "--detector", "subspace", "--rank", "500", "--epsilon", "3"], "exceeds"),
    (["--dataset", "breast_cancer", "--clip-fraction", "0"], "--clip-fraction"),
    (["--dataset", "breast_cancer", "--rank", "-2"], "--rank"),
    (["--dataset", "breast_cancer", "--results", "/nonexistent-folder/R.md"], "folder does not exist"),
])
def test_recipe_refuses_bad_subspace_settings_in_one_line(argv, message, capsys):
    from recipes import one_class

    assert one_class.main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
