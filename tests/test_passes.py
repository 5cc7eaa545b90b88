"""One pass per sample per step: a sample whose gradient reaches the parameters twice is refused, not released.

A batch forwarded twice into one loss, or a loss back-propagated twice (``retain_graph=True``), sums two bounded
per-sample gradients: up to 2 Delta for a Delta the noise was calibrated to. The engine counts the backward passes
through the model's output and refuses such a step before anything is released (``lipdp.hooks``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lipdp import LipDPEngine
from lipdp.hooks import RepeatedPassError, public_data
from lipdp.layers import InputNormClip
from lipdp.losses import LipschitzCrossEntropy

CRITERION = LipschitzCrossEntropy(temperature=4.0)


def attach():
    torch.manual_seed(0)
    x = nn.functional.normalize(torch.randn(64, 8), dim=1)
    model = nn.Sequential(InputNormClip(1.0), nn.Linear(8, 3))
    engine = LipDPEngine(seed=1)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(TensorDataset(x, torch.arange(64) % 3), batch_size=16), criterion=CRITERION,
        noise_multiplier=1.0, input_norm_bound=1.0)
    return engine, model, optimizer, next(iter(loader))


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_refused(engine, model, optimizer, before):
    with pytest.raises(RepeatedPassError, match="Nothing was released"):
        optimizer.step()
    assert engine.accountant.total_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_batch_forwarded_twice_into_one_loss_is_refused():
    engine, model, optimizer, (x, y) = attach()
    before = snapshot(model)
    optimizer.zero_grad()
    (CRITERION(model(x), y) + CRITERION(model(x), y)).backward()
    assert_refused(engine, model, optimizer, before)


def test_a_loss_back_propagated_twice_is_refused():
    engine, model, optimizer, (x, y) = attach()
    before = snapshot(model)
    optimizer.zero_grad()
    loss = CRITERION(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    assert_refused(engine, model, optimizer, before)


def test_a_second_forward_for_logging_summed_into_the_loss_is_refused():
    engine, model, optimizer, (x, y) = attach()
    before = snapshot(model)
    optimizer.zero_grad()
    logits = model(x)
    logged = model(x).detach().mean() + 0 * model(x).sum()  # a "harmless" logging term that still back-propagates
    (CRITERION(logits, y) + logged).backward()
    assert_refused(engine, model, optimizer, before)


def test_one_pass_per_step_is_accepted_and_a_refused_step_can_be_redone():
    engine, model, optimizer, (x, y) = attach()
    optimizer.zero_grad()
    with torch.no_grad():
        model(x)  # evaluation forward: no gradient, not counted
    model(x)  # a forward with gradients that is never back-propagated: nothing reaches the parameters
    CRITERION(model(x), y).backward()
    optimizer.step()
    assert engine.accountant.total_steps == 1
    optimizer.zero_grad()
    loss = CRITERION(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.raises(RepeatedPassError):
        optimizer.step()
    optimizer.zero_grad()  # start the step again, correctly
    CRITERION(model(x), y).backward()
    optimizer.step()
    assert engine.accountant.total_steps == 2


def test_public_data_forwards_are_not_counted():
    engine, model, optimizer, (x, y) = attach()
    optimizer.zero_grad()
    public = torch.full((5, 8), 0.1)
    with public_data():
        extra = model(public).square().mean()
    (CRITERION(model(x), y) + extra).backward()
    optimizer.step()
    assert engine.accountant.total_steps == 1


def test_micro_batches_of_one_logical_batch_take_one_step():
    engine, model, optimizer, _ = attach()
    with engine.virtual_batches(max_physical_batch_size=4) as batches:
        for x, y in batches:
            optimizer.zero_grad()
            CRITERION(model(x), y).backward()
            optimizer.step()
    assert engine.accountant.total_steps == engine.data_loader.steps_per_epoch


def test_the_refusal_is_needed_a_doubled_sample_exceeds_its_certified_bound():
    """Ground truth on a batch of one sample (its summed gradient is its per-sample gradient): forwarded twice into
    one loss, the sample's weight gradient exceeds the certified Delta the noise is calibrated to."""
    engine, model, optimizer, _ = attach()
    bound = engine.current_bounds().sensitivities["1.weight"]
    x = nn.functional.normalize(torch.randn(1, 8), dim=1)
    worst = 0.0
    for label in range(3):
        optimizer.zero_grad()
        (CRITERION(model(x), torch.tensor([label])) + CRITERION(model(x), torch.tensor([label]))).backward()
        worst = max(worst, model[1].weight.grad.norm().item())
    assert worst > bound
