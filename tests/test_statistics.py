"""Private statistics released before training (lipdp.statistics, LipDPEngine.private_mean and
private_channel_moments) and their accounting."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accounting import PrivacyAccountant, calibrate_noise
from lipdp import LipDPEngine
from lipdp.layers import InputNormClip
from lipdp.losses import LipschitzCrossEntropy
from lipdp.statistics import (
    ChannelBlock, channel_moments_query, channel_moments_sensitivity, mean_query, mean_query_sensitivity,
    private_channel_moments, private_mean,
)

DELTA = 1e-5


def test_mean_query_sensitivity_holds_for_adversarial_records():
    """Adding one record moves (sum, count) by <= sqrt(X0^2 + 1), whatever the record: huge, tiny, at the bound."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50, 6, generator=g)
    for bound in (0.5, 1.0, 3.0):
        total, count = mean_query(data, bound)
        claimed = mean_query_sensitivity(bound)
        records = [torch.randn(6, generator=g) * scale for scale in (1e-6, 0.1, 1.0, 1e6)]
        records.append(torch.ones(6) * bound / 6**0.5)  # exactly at the bound: the change equals the claim
        for record in records:
            bigger, bigger_count = mean_query(torch.cat([data, record[None]]), bound)
            change = torch.cat([bigger - total, torch.tensor([float(bigger_count - count)], dtype=total.dtype)])
            assert change.norm().item() <= claimed * (1 + 1e-12)
        assert change.norm().item() == pytest.approx(claimed, rel=1e-6)


def test_private_mean_noise_has_the_calibrated_std():
    """The released sum carries N(0, (sigma sqrt(X0^2 + 1))^2) per coordinate: measured over many draws."""
    data = torch.zeros(10, 2000)  # zero sum: the noisy sum over the noisy count is noise / count
    generator = torch.Generator().manual_seed(1)
    sigma, bound = 0.7, 2.0
    draws = torch.stack([private_mean(data, bound, sigma, generator) for _ in range(20)])
    expected_std = sigma * mean_query_sensitivity(bound) / 10  # divided by the (nearly exact) count of 10
    assert draws.std().item() == pytest.approx(expected_std, rel=0.1)


def test_private_mean_is_accurate_on_a_large_data_set():
    g = torch.Generator().manual_seed(2)
    data = torch.randn(20000, 50, generator=g) * 0.05 + 0.1
    exact = data.mean(0)
    released = private_mean(data, 1.0, 10.0, torch.Generator().manual_seed(3))
    # noise per coordinate: 10 * sqrt(2) / 20000 = 7e-4; over 50 coordinates ||error|| ~ 5e-3
    assert (released - exact).norm().item() < 0.02


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(0, 3), "non-empty"),
    (torch.zeros(3), "non-empty"),
    (torch.tensor([[1.0, float("nan")]]), "NaN"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or infinite"),
])
def test_private_mean_refuses_bad_data(bad, message):
    with pytest.raises(ValueError, match=message):
        private_mean(bad, 1.0, 1.0)


def test_private_mean_refuses_bad_parameters():
    with pytest.raises(ValueError, match="norm_bound"):
        private_mean(torch.ones(3, 2), 0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_mean(torch.ones(3, 2), 1.0, -1.0)


def test_calibrate_noise_leaves_room_for_what_was_spent():
    q, steps, spent = 0.05, 200, [(8.0, 1.0, 1)]
    alone = calibrate_noise(2.0, DELTA, q, steps=steps)
    sigma = calibrate_noise(2.0, DELTA, q, steps=steps, spent=spent)
    assert sigma > alone
    assert PrivacyAccountant("prv", history=[*spent, (sigma, q, steps)]).epsilon(DELTA) <= 2.0
    assert PrivacyAccountant("prv", history=[*spent, (sigma / 1.01, q, steps)]).epsilon(DELTA) > 2.0


def test_calibrate_noise_refuses_when_the_spent_part_alone_exceeds_the_target():
    with pytest.raises(ValueError, match="already spent"):
        calibrate_noise(0.5, DELTA, 0.05, steps=10, spent=[(1.0, 1.0, 1)])


def _engine_with_mean(seed=0, noise_multiplier=5.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 8, generator=g)
    x = x / x.norm(dim=1, keepdim=True)
    dataset = TensorDataset(x, torch.randint(0, 3, (400,), generator=g))
    engine = LipDPEngine(accountant="prv", seed=seed)
    mean = engine.private_mean(x, noise_multiplier=noise_multiplier, norm_bound=1.0)
    return engine, dataset, mean


def test_engine_private_mean_is_accounted_and_training_budget_makes_room_for_it():
    engine, dataset, mean = _engine_with_mean()
    assert mean.shape == (8,)
    assert [entry.to_list() for entry in engine.accountant.history] == [[5.0, 1.0, 1]]
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=100), criterion=LipschitzCrossEntropy(),
        target_epsilon=3.0, target_delta=DELTA, epochs=2, input_norm_bound=1.0, max_epsilon=3.0)
    without_mean = calibrate_noise(3.0, DELTA, 0.25, steps=8)
    assert engine.noise_multiplier > without_mean
    criterion = LipschitzCrossEntropy()
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    assert engine.accountant.total_steps == 1 + 8
    assert engine.get_epsilon(DELTA) <= 3.0


def test_engine_private_mean_is_reproducible_and_uses_its_own_noise_stream():
    _, _, first = _engine_with_mean(seed=4)
    _, _, again = _engine_with_mean(seed=4)
    _, _, other = _engine_with_mean(seed=5)
    assert torch.equal(first, again) and not torch.equal(first, other)
    engine = LipDPEngine(seed=4)
    noise_before = engine.noise_generator.get_state()
    engine.private_mean(torch.ones(10, 3), noise_multiplier=1.0, norm_bound=1.0)
    assert torch.equal(engine.noise_generator.get_state(), noise_before)  # training noise is never re-used


def test_engine_private_mean_after_make_private_is_refused():
    engine, dataset, _ = _engine_with_mean()
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        data_loader=DataLoader(dataset, batch_size=100), criterion=LipschitzCrossEntropy(),
                        noise_multiplier=1.0, input_norm_bound=1.0)
    with pytest.raises(RuntimeError, match="before make_private"):
        engine.private_mean(dataset.tensors[0], noise_multiplier=5.0, norm_bound=1.0)


BLOCKS = [ChannelBlock(0, 3, 4), ChannelBlock(14, 2, 3)]  # 12 + 2 unblocked + 6 features: rows of 20


def _moments_change(data: torch.Tensor, record: torch.Tensor, bound: float) -> float:
    """L2 norm of the change of the released quantity (every block's upper triangle) when ``record`` is added."""
    before = channel_moments_query(data, BLOCKS, bound)
    after = channel_moments_query(torch.cat([data, record[None]]), BLOCKS, bound)
    rows, cols = zip(*(torch.triu_indices(b.channels, b.channels) for b in BLOCKS))
    return torch.cat([(a - b)[r, c] for a, b, r, c in zip(after, before, rows, cols)]).norm().item()


def test_channel_moments_sensitivity_holds_for_adversarial_records():
    """Adding one record moves every block's upper triangle, together, by <= X0^2: records huge, tiny, spread,
    all in one block, all at one position (where the bound is attained)."""
    g = torch.Generator().manual_seed(0)
    data = torch.randn(40, 20, generator=g)
    for bound in (0.5, 1.0, 3.0):
        claimed = channel_moments_sensitivity(bound)
        records = [torch.randn(20, generator=g) * scale for scale in (1e-6, 0.1, 1.0, 1e6)]
        in_one_block = torch.zeros(20)
        in_one_block[:12] = torch.randn(12, generator=g)
        records.append(in_one_block * 1e3)
        at_one_position = torch.zeros(20)
        at_one_position[[0, 4, 8]] = torch.tensor([1.0, 2.0, -1.0])  # channels 0..2 at position 0 of block 0
        records.append(at_one_position)
        for record in records:
            assert _moments_change(data, record, bound) <= claimed * (1 + 1e-9)
        # x x^T at one position: its Frobenius norm is ||x||^2 = X0^2; the triangle keeps the diagonal and half
        # of the rest, so the released change lies between X0^2 / sqrt(2) and X0^2
        assert _moments_change(data, at_one_position * 1e3, bound) >= claimed / 2**0.5 * (1 - 1e-9)


def test_channel_moments_query_is_the_tied_second_moment():
    x = torch.randn(30, 20, generator=torch.Generator().manual_seed(1)) * 0.1  # norms below the bound: no clip
    moments = channel_moments_query(x, BLOCKS, norm_bound=10.0)
    for moment, block in zip(moments, BLOCKS):
        view = x[:, block.start:block.stop].reshape(30, block.channels, block.positions).double()
        expected = sum(view[:, :, p].T @ view[:, :, p] for p in range(block.positions))
        assert torch.allclose(moment, expected)


def test_private_channel_moments_noise_is_symmetric_with_the_calibrated_std():
    generator = torch.Generator().manual_seed(2)
    sigma, bound = 0.7, 2.0
    blocks = [ChannelBlock(0, 40, 1)]
    draws = torch.stack([private_channel_moments(torch.zeros(5, 40), blocks, bound, sigma, generator)[0]
                         for _ in range(20)])
    assert torch.equal(draws, draws.transpose(1, 2))
    expected = sigma * channel_moments_sensitivity(bound)
    upper = draws[:, *torch.triu_indices(40, 40)]
    assert upper.std().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("blocks, message", [
    ([], "at least one"),
    ([ChannelBlock(0, 3, 4), ChannelBlock(10, 2, 3)], "overlap"),
    ([ChannelBlock(15, 2, 3)], "do not fit"),
    ([ChannelBlock(0, 0, 3)], "do not fit"),
])
def test_channel_moments_refuse_bad_blocks(blocks, message):
    with pytest.raises(ValueError, match=message):
        channel_moments_query(torch.ones(4, 20), blocks, 1.0)


def test_channel_moments_refuse_bad_data():
    with pytest.raises(ValueError, match="NaN"):
        channel_moments_query(torch.full((4, 20), float("nan")), BLOCKS, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        private_channel_moments(torch.ones(4, 20), BLOCKS, 1.0, 0.0)


def test_engine_private_channel_moments_are_accounted_after_the_mean():
    engine, dataset, _ = _engine_with_mean(noise_multiplier=5.0)
    moments = engine.private_channel_moments(dataset.tensors[0], [ChannelBlock(0, 4, 2)], noise_multiplier=8.0,
                                             norm_bound=1.0)
    assert len(moments) == 1 and moments[0].shape == (4, 4)
    assert [entry.to_list() for entry in engine.accountant.history] == [[5.0, 1.0, 1], [8.0, 1.0, 1]]
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        data_loader=DataLoader(dataset, batch_size=100), criterion=LipschitzCrossEntropy(),
                        noise_multiplier=1.0, input_norm_bound=1.0)
    with pytest.raises(RuntimeError, match="before make_private"):
        engine.private_channel_moments(dataset.tensors[0], [ChannelBlock(0, 4, 2)], 8.0, 1.0)
