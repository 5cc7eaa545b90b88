"""Views (augmentation multiplicity): K random views per record, each record's gradient the mean of its views'.

(1/K) sum_k g_k has norm <= max_k ||g_k|| <= Delta when each view's gradient is within the bound (triangle
inequality), so K views cost no privacy. Checked against torch.func per-view gradients, inputs at the norm bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lipdp import LipDPEngine
from lipdp.augment import Compose, RandomFlip, RandomShift, make_views
from lipdp.layers import InputNormClip, L2NormPool2d
from lipdp.losses import LipschitzCrossEntropy

CRITERION = LipschitzCrossEntropy(temperature=8.0)


def images(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # every image at the norm bound 1


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(InputNormClip(1.0), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), L2NormPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def attach(views: int, augment=None, n: int = 32, batch_size: int = 8, model: nn.Module | None = None):
    model = model or small_cnn()
    engine = LipDPEngine(seed=2)
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(images(n), torch.arange(n) % 3), batch_size=batch_size),
        criterion=CRITERION, noise_multiplier=1.0, input_norm_bound=1.0, views=views, augment=augment)
    return engine, model, optimizer, loader


def test_augmentations_are_per_sample_random_and_never_raise_the_norm():
    x = images(64)
    generator = torch.Generator().manual_seed(0)
    for augment in (RandomShift(2), RandomFlip(), Compose([RandomShift(1), RandomFlip()])):
        view = augment(x, generator)
        assert view.shape == x.shape
        assert (view.flatten(1).norm(dim=1) <= x.flatten(1).norm(dim=1) + 1e-6).all()
        changed = (view != x).flatten(1).any(dim=1)
        assert 0 < changed.sum() < len(x) or isinstance(augment, RandomShift)  # independent per sample
    shifted = RandomShift(1)(torch.ones(1, 1, 3, 3), torch.Generator().manual_seed(3))
    assert shifted.sum() in (4.0, 6.0, 9.0)  # zero-filled, never wrapped around


def test_make_views_is_view_major_with_repeated_labels():
    x, y = images(3), torch.tensor([0, 1, 2])
    views, labels = make_views([x, y], 4, RandomShift(1), torch.Generator().manual_seed(0))
    assert views.shape == (12, 1, 8, 8) and labels.tolist() == [0, 1, 2] * 4


def test_a_record_s_gradient_is_the_mean_of_its_views_and_stays_within_the_bound():
    """torch.func ground truth: per-view gradients of the same model without the engine's hooks."""
    K = 6
    engine, model, optimizer, _ = attach(K, Compose([RandomShift(2), RandomFlip()]))
    plain = small_cnn()
    plain.load_state_dict(model.state_dict())
    params = {name: p.detach() for name, p in plain.named_parameters()}
    bounds = engine.current_bounds().sensitivities
    x = images(1, seed=5)
    generator = torch.Generator().manual_seed(1)
    worst = {name: 0.0 for name in params}
    for label in range(3):
        views, labels = make_views([x, torch.tensor([label])], K, Compose([RandomShift(2), RandomFlip()]), generator)
        optimizer.zero_grad()
        CRITERION(model(views), labels).backward()  # one record: the summed gradient is its gradient

        def loss(weights, sample, target):
            return CRITERION(functional_call(plain, weights, (sample[None],)), target[None])

        per_view = vmap(grad(loss), in_dims=(None, 0, 0))(params, views, labels)
        for name, parameter in model.named_parameters():
            expected = per_view[name].mean(dim=0)
            torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=1e-6)
            worst[name] = max(worst[name], parameter.grad.norm().item())
    for name, observed in worst.items():
        assert observed <= bounds[name] * (1 + 1e-5), (name, observed, bounds[name])


def test_views_cost_no_privacy_and_take_the_same_steps():
    results = {}
    for views in (1, 4):
        engine, model, optimizer, loader = attach(views, RandomShift(1))
        rows = []
        for x, y in loader:
            rows.append(len(x))
            optimizer.zero_grad()
            CRITERION(model(x), y).backward()
            optimizer.step()
        results[views] = (engine.accountant.total_steps, engine.get_epsilon(1e-5), engine.noise_multiplier, rows)
    assert results[1][:3] == results[4][:3]  # same steps, same epsilon, same noise multiplier
    assert all(rows % 4 == 0 for rows in results[4][3])


def test_a_batch_that_is_not_whole_views_is_refused():
    engine, model, optimizer, _ = attach(4)
    with pytest.raises(ValueError, match="not 4 views of each record"):
        model(images(6))


def test_virtual_batches_keep_a_record_s_views_together():
    engine, model, optimizer, loader = attach(3, RandomShift(1), n=48, batch_size=16)
    reference = copy.deepcopy(loader.view_generator.get_state())
    with engine.virtual_batches(max_physical_batch_size=7) as batches:  # 2 records (6 rows) per micro-batch
        for x, y in batches:
            assert len(x) % 3 == 0 and len(x) <= 7
            records = len(x) // 3
            assert y[:records].tolist() * 3 == y.tolist()  # the same records in each view block
            optimizer.zero_grad()
            CRITERION(model(x), y).backward()
            optimizer.step()
    assert engine.accountant.total_steps == loader.steps_per_epoch
    assert not torch.equal(torch.as_tensor(reference), loader.view_generator.get_state())
