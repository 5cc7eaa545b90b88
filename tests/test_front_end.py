"""The classification recipe's front end and its private preprocessing (recipes.front_end): layout, centring,
whitening, the differentiable path used for saliency maps, and the lipschitz normalisation's certified constant."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lipdp import LipDPEngine
from lipdp.datasets import load_dataset
from lipdp.statistics import ChannelBlock, channel_moments_query
from recipes import classify
from recipes.front_end import (
    PART_WEIGHTS, PrivatePreprocessing, centre_and_rescale, channel_whitener, differentiable_scatter,
    front_end_features, parse_front_end, path_weights, release_preprocessing, unit_pixels,
)

FRONT_END = "scattering+fine-scattering+pixels"
DIGITS_FEATURES = 81 * 2 * 2 + 9 * 4 * 4 + 64  # J=2 (81 x 2 x 2) and J=1 (9 x 4 x 4) of 8x8 images, 64 pixels


def _digits_images(n: int = 6) -> torch.Tensor:
    return load_dataset("digits").test.tensors[0][:n]


def test_unit_pixels_are_centred_unit_vectors():
    pixels = unit_pixels(torch.rand(5, 1, 8, 8) * 3)
    assert pixels.shape == (5, 64)
    assert torch.allclose(pixels.norm(dim=1), torch.ones(5), atol=1e-6)
    assert torch.allclose(pixels.mean(dim=1), torch.zeros(5), atol=1e-6)


@pytest.mark.parametrize("bad", ["scattering+wavelets", "pixels+pixels", ""])
def test_unknown_or_repeated_parts_are_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="fine-scattering"):
        parse_front_end(bad)


def test_front_end_rows_have_norm_one_and_blocks_point_at_the_weighted_scattering_parts():
    images = _digits_images()
    rows, blocks = front_end_features(FRONT_END, images, groups=27)
    assert rows.shape == (6, DIGITS_FEATURES)
    assert torch.allclose(rows.norm(dim=1), torch.ones(6), atol=1e-3)  # eps of the standardisation
    assert blocks == [ChannelBlock(0, 81, 4), ChannelBlock(324, 9, 16)]
    total_weight = sum(w**2 for w in PART_WEIGHTS.values()) ** 0.5
    pixels = rows[:, blocks[1].stop:]
    assert torch.allclose(pixels, unit_pixels(images) * PART_WEIGHTS["pixels"] / total_weight, atol=1e-6)
    # each scattering block is its part, standardised per sample: norm = its weight over the total weight
    for block, name in zip(blocks, ("scattering", "fine-scattering")):
        norms = block.view(rows).flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.full((6,), PART_WEIGHTS[name] / total_weight), atol=1e-3)


def test_centre_and_rescale_gives_unit_vectors_along_the_centred_features():
    features = torch.rand(7, 2, 3) + 1.0
    mean = features.mean(dim=0)
    out = centre_and_rescale(features.clone(), mean)
    assert out.shape == features.shape
    flat, centred = out.flatten(1), (features - mean).flatten(1)
    assert torch.allclose(flat.norm(dim=1), torch.ones(7), atol=1e-6)
    assert torch.allclose(flat * centred.norm(dim=1, keepdim=True), centred, atol=1e-6)


def _correlated_channels(n=4000, channels=6, positions=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=g) * torch.logspace(0, -2, channels)
    return torch.einsum("cd,ndp->ncp", mixing, torch.randn(n, channels, positions, generator=g))


def test_whitener_with_exact_moments_flattens_the_spectrum_and_keeps_the_energy():
    x = _correlated_channels()
    block = ChannelBlock(0, 6, 5)
    (moment,) = channel_moments_query(x.flatten(1), [block], norm_bound=1e9)
    matrix = channel_whitener(moment, floor=1e-6).double()
    whitened = matrix @ moment @ matrix.T
    before, after = torch.linalg.eigvalsh(moment), torch.linalg.eigvalsh(whitened)
    assert before.max() / before.min() > 1e3
    assert after.max() / after.min() < 1.05  # a floor near 0: full whitening (float32 matrix)
    assert whitened.trace().item() == pytest.approx(moment.trace().item(), rel=1e-6)  # energy kept
    assert torch.allclose(matrix, matrix.T)


def test_whitener_floor_limits_the_amplification_and_a_huge_floor_is_the_identity():
    (moment,) = channel_moments_query(_correlated_channels().flatten(1), [ChannelBlock(0, 6, 5)], norm_bound=1e9)
    gains = torch.linalg.eigvalsh(channel_whitener(moment, floor=0.5).double())
    assert gains.max() / gains.min() <= (1 + 1 / 0.5) ** 0.5 * 6**0.5  # at most sqrt((λmax + λ0) / λ0)
    assert torch.allclose(channel_whitener(moment, floor=1e9), torch.eye(6), atol=1e-4)
    with pytest.raises(ValueError, match="floor"):
        channel_whitener(moment, floor=0.0)


def test_whitener_floor_never_goes_below_the_noise_level():
    """With noise of std s per entry, eigen-directions below ~2 s sqrt(C) may be noise: they are not amplified."""
    (moment,) = channel_moments_query(_correlated_channels().flatten(1), [ChannelBlock(0, 6, 5)], norm_bound=1e9)
    noise_std = moment.trace().item()  # a noise level far above every eigenvalue
    assert torch.allclose(channel_whitener(moment, floor=1e-6, noise_std=noise_std),
                          channel_whitener(moment, floor=2 * 6**0.5 * noise_std * 6 / moment.trace().item()),
                          atol=1e-5)


def test_preprocessing_in_place_on_data_sets_equals_the_differentiable_path():
    rows, blocks = front_end_features(FRONT_END, _digits_images(40), groups=27)
    engine = LipDPEngine(seed=0)
    preprocessing, train_rows = release_preprocessing(engine, rows.clone(), blocks, centring_noise=10.0,
                                                      whitening_noise=10.0, whitening_floor=0.1)
    assert [entry.to_list() for entry in engine.accountant.history] == [[10.0, 1.0, 2]]  # two releases at q = 1
    assert len(preprocessing.whiteners) == 2
    differentiable = preprocessing(rows.clone().requires_grad_(True))
    assert torch.allclose(train_rows, differentiable.detach(), atol=1e-5)
    assert torch.allclose(train_rows.norm(dim=1), torch.ones(40), atol=1e-5)
    assert not torch.allclose(train_rows, preprocessing.centre(rows.clone()), atol=1e-3)  # whitening did act


def test_preprocessing_skips_what_has_no_noise_multiplier():
    rows, blocks = front_end_features(FRONT_END, _digits_images(10), groups=27)
    engine = LipDPEngine(seed=0)
    preprocessing, out = release_preprocessing(engine, rows.clone(), blocks, None, 0.0, 0.1)
    assert preprocessing.mean is None and preprocessing.whiteners == [] and engine.accountant.history == []
    assert torch.equal(out, rows)
    assert torch.equal(PrivatePreprocessing()(rows.clone()), rows)


def test_pixel_logits_match_the_preprocessed_cached_features():
    # The differentiable front end used for saliency is the one the head was trained on, preprocessing included.
    images = _digits_images()
    head = classify.build_model("linear", (DIGITS_FEATURES,), 10)
    cached, blocks = classify._features(TensorDataset(images, torch.zeros(6)), FRONT_END, 27)
    assert blocks
    preprocessing, _ = release_preprocessing(LipDPEngine(seed=1), cached.tensors[0].clone(), blocks, 10.0, 10.0, 0.1)
    plain = classify.logits_of_pixels(head, FRONT_END, 27, (1, 8, 8), (DIGITS_FEATURES,))
    assert torch.allclose(plain(images), head(cached.tensors[0]), atol=1e-5)
    preprocessed = classify.logits_of_pixels(head, FRONT_END, 27, (1, 8, 8), (DIGITS_FEATURES,),
                                             preprocessing=preprocessing)
    assert torch.allclose(preprocessed(images), head(preprocessing(cached.tensors[0].clone())), atol=1e-5)


def _lipschitz_pipeline(train_images: torch.Tensor, radius: float = 10.0):
    """The lipschitz front end and its released preprocessing, as a differentiable map of the images."""
    rows, blocks = front_end_features(FRONT_END, train_images, 27, normalisation="lipschitz")
    # low noise: 40 images (the noise of multiplier 10 would dominate their mean and moments)
    preprocessing, train_rows = release_preprocessing(LipDPEngine(seed=0), rows.clone(), blocks, 0.1, 0.1, 0.1,
                                                      radius=radius)
    scatter = differentiable_scatter((8, 8))

    def pipeline(images: torch.Tensor) -> torch.Tensor:
        features, _ = front_end_features(FRONT_END, images, 27, scatter, normalisation="lipschitz")
        return preprocessing(features)

    return pipeline, preprocessing, rows, train_rows


@pytest.mark.usefixtures("one_thread")
def test_lipschitz_pipeline_in_place_equals_the_differentiable_path_and_lands_in_the_unit_ball():
    images = _digits_images(40)
    pipeline, preprocessing, rows, train_rows = _lipschitz_pipeline(images)
    assert preprocessing.mean is not None and len(preprocessing.whiteners) == 2
    assert torch.allclose(pipeline(images.requires_grad_(True)).detach(), train_rows, atol=1e-5)
    assert train_rows.norm(dim=1).max() <= 1 + 1e-5
    assert train_rows.norm(dim=1).min() < 0.999  # a projection, not a rescaling: short rows stay short
    gains = [torch.linalg.matrix_norm(m.double(), ord=2).item() for _, m in preprocessing.whiteners]
    assert preprocessing.lipschitz() == pytest.approx(max(1, *gains) / 10.0, rel=1e-6)
    assert PrivatePreprocessing().lipschitz() == float("inf")  # standardise: rescalings are not Lipschitz


@pytest.fixture
def one_thread():
    """Many tiny FFTs: one thread (on shared cores, two threads oversubscribe and run ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_lipschitz_pipeline_never_expands_pixel_distances_beyond_its_certified_constant():
    """Images -> preprocessed rows (front end, centring, whitening, projection): random pairs and pairs pushed
    apart by gradient ascent on ||g(x) - g(y)|| / ||x - y||, starting from digits, never beat
    preprocessing.lipschitz()."""
    images = _digits_images(40)
    pipeline, preprocessing, _, _ = _lipschitz_pipeline(images, radius=20.0)  # few rows reach the projection
    bound = preprocessing.lipschitz()
    generator = torch.Generator().manual_seed(0)
    x = images[:16].clone().requires_grad_(True)
    step = (0.01 * torch.randn(x.shape, generator=generator)).requires_grad_(True)
    optimizer = torch.optim.Adam([x, step], lr=0.01)
    best = 0.0
    for _ in range(15):
        ratio = (pipeline(x + step) - pipeline(x)).norm(dim=1) / step.flatten(1).norm(dim=1)
        best = max(best, ratio.max().item())
        optimizer.zero_grad()
        (-ratio.log().sum()).backward()
        optimizer.step()
    assert best <= bound
    assert best >= 0.1 * bound  # not vacuous


@pytest.mark.usefixtures("one_thread")
def test_lipschitz_front_end_is_1_lipschitz_on_random_pairs_and_path_weights_follow_kymatio_s_order():
    assert path_weights(2, (1.0, 2.0, 3.0)).tolist() == [1.0] + [2.0] * 16 + [3.0] * 64
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(32, 1, 8, 8, generator=generator)
    y = x + 0.1 * torch.randn(x.shape, generator=generator)
    scatter = differentiable_scatter((8, 8))
    fx, fy = (front_end_features(FRONT_END, images, 27, scatter, normalisation="lipschitz",
                                 order_weights=(1.0, 3.0, 10.0))[0] for images in (x, y))
    assert ((fx - fy).norm(dim=1) / (x - y).flatten(1).norm(dim=1)).max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="lipschitz"):
        front_end_features(FRONT_END, x, 27, scatter, normalisation="none")


@pytest.mark.slow
def test_classify_with_the_lipschitz_normalisation_certifies_in_pixel_space():
    result = classify.run("digits", epochs=1, batch_size=256, validation=True, progress=False,
                          normalisation="lipschitz", radius=2.0)
    assert result["certified_space"] == "pixels" and result["normalisation"] == "lipschitz"
    assert result["pixel_lipschitz"] > result["lipschitz"] / 2.0  # head x (1 / radius) x whitening gain >= 1
    certified = [result["certified_accuracy"][str(r)] for r in classify.RADII]
    assert certified == sorted(certified, reverse=True) and certified[0] == pytest.approx(result["accuracy"], abs=1e-6)
    standard = classify.run("digits", epochs=1, batch_size=256, validation=True, progress=False)
    assert standard["certified_space"] == "features" and standard["pixel_lipschitz"] is None
