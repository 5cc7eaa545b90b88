"""Validation: modules lipdp cannot bound are refused with an error naming the module path and a fix, and
configurations that would silently break a bound (shared parameters, subclasses that change forward,
shape-dependent rules on modules reused at several shapes, side effects of the analysis) are refused too."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import lipdp
from lipdp import ModelValidationError, UnsupportedModuleError
from lipdp.bounds import record_shapes
from lipdp.layers import ConvexResidual, InputNormClip


class Square(nn.Module):
    def forward(self, x):
        return x**2


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.scale * x


def _bad_model() -> nn.Sequential:
    features = nn.Sequential(OrderedDict([
        ("clip", InputNormClip(1.0)),
        ("conv", nn.Conv2d(1, 4, 3, padding=1)),
        ("bn", nn.BatchNorm2d(4)),
        ("gelu", nn.GELU()),
    ]))
    head = nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("drop", nn.Dropout(0.5)),
        ("fc", nn.Linear(4 * 6 * 6, 8)),
        ("softplus", nn.Softplus()),
        ("custom", Unknown()),
        ("square", Square()),
        ("out", nn.Linear(8, 3)),
    ]))
    return nn.Sequential(OrderedDict([("features", features), ("head", head)])).train()


EXPECTED_PATHS = {
    "features.bn": "BatchNorm2d",
    "features.gelu": "GELU",
    "head.drop": "Dropout",
    "head.softplus": "Softplus",
    "head.custom": "Unknown",
    "head.square": "Square",
}


def test_validate_lists_every_unsupported_module_with_path_and_fix() -> None:
    errors = lipdp.validate(_bad_model())
    assert all(isinstance(error, UnsupportedModuleError) for error in errors)
    found = {error.path: error for error in errors}
    assert set(found) == set(EXPECTED_PATHS), [str(e) for e in errors]
    for path, type_name in EXPECTED_PATHS.items():
        message = str(found[path])
        assert message.startswith(f"{path} ({type_name})"), message
        assert "Fix:" in message and found[path].fix, message
    assert "mixes the samples" in found["features.bn"].reason
    assert "training mode" in found["head.drop"].reason


def test_check_model_and_analyze_raise() -> None:
    with pytest.raises(ModelValidationError) as info:
        lipdp.check_model(_bad_model())
    for path in EXPECTED_PATHS:
        assert path in str(info.value)
    with pytest.raises(ModelValidationError):
        lipdp.analyze(_bad_model(), 1.0, 1.0, (1, 6, 6))


def test_dropout_in_eval_mode_is_the_identity_and_accepted() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)).eval()
    assert lipdp.validate(model) == []
    model.train()
    assert [error.path for error in lipdp.validate(model)] == ["1"]
    assert lipdp.validate(nn.Sequential(nn.Dropout(0.0)).train()) == []


def test_reflect_padding_and_maxpool_indices_are_refused() -> None:
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")
    pool = nn.MaxPool2d(2, return_indices=True)
    paths = {error.path: str(error) for error in lipdp.validate(nn.Sequential(conv, pool))}
    assert set(paths) == {"0", "1"} and all("Fix:" in message for message in paths.values())


def test_subclass_that_redefines_forward_is_refused() -> None:
    """An nn.Sequential subclass adding a skip connection computes x + f(x): Lip 1 + Lip(f), not Lip(f)."""

    class SkipSequential(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 10 * super().forward(x)

    class PlainSubclass(nn.Linear):  # keeps Linear's computation: keeps its rule
        pass

    model = nn.Sequential(SkipSequential(nn.Linear(3, 3)), ScaledLinear(3, 3), PlainSubclass(3, 3))
    errors = {error.path: str(error) for error in lipdp.validate(model)}
    assert set(errors) == {"0", "1"}
    assert "redefines forward" in errors["0"] and "Fix:" in errors["0"]
    assert lipdp.validate(nn.Sequential(PlainSubclass(3, 3))) == []


def test_tied_and_reused_parameters_are_refused() -> None:
    """One sample's gradient of a shared tensor sums over its uses; each use alone is bounded."""
    shared = nn.Linear(4, 4)
    reused = nn.Sequential(shared, nn.ReLU(), shared)
    assert {error.path for error in lipdp.validate(reused)} == {"2"}  # one error per shared tensor
    with pytest.raises(ModelValidationError, match="also used as"):
        lipdp.analyze(reused, 1.0, 1.0, (4,))
    first, second = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    assert len(lipdp.validate(nn.Sequential(first, second))) == 1
    # A parameter-free module may be reused.
    relu = nn.ReLU()
    assert lipdp.validate(nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu)) == []
    # Frozen tied weights carry no gradient (one tensor: frozen for both uses).
    second.weight.requires_grad_(False)
    assert lipdp.validate(nn.Sequential(first, second)) == []


def test_shape_dependent_module_reused_at_two_shapes_is_refused() -> None:
    pool = nn.MaxPool2d(3, 2, ceil_mode=True)
    model = nn.Sequential(pool, nn.Flatten(), nn.Unflatten(1, (1, 4, 4)), pool)
    with pytest.raises(ValueError, match="different shapes"):
        lipdp.lipschitz_constant(model, (1, 9, 9))


def test_analysis_restores_every_train_eval_flag() -> None:
    """record_shapes runs in eval mode; it must not reset a submodule the user put in eval mode (a Dropout
    that passed validation in eval mode must not come back in training mode)."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2)).train()
    model[1].eval()
    lipdp.analyze(model, 1.0, 1.0, (3,))
    assert [m.training for m in model] == [True, False, True]
    record_shapes(model, (3,))
    assert [m.training for m in model] == [True, False, True]


def test_biased_linear_needs_the_input_shape() -> None:
    """nn.Linear acts on the last axis; its bias gradient sums over the other axes (sqrt(P) factor)."""
    with pytest.raises(ValueError, match="input_shape"):
        lipdp.analyze(nn.Sequential(nn.Linear(3, 2)), 1.0, 1.0)
    assert lipdp.analyze(nn.Sequential(nn.Linear(3, 2, bias=False)), 1.0, 1.0).sensitivities == {"0.weight": 1.0}
    report = lipdp.analyze(nn.Sequential(nn.Linear(3, 2)), 1.0, 1.0, (5, 3))
    assert report.sensitivities["0.bias"] == pytest.approx(5**0.5)


def test_unbounded_trainable_parameter_is_an_error() -> None:
    class Scaled(nn.Module):  # implements the protocol but forgets its parameter
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x

        def lipschitz(self, ctx=None):
            return 1.0

        def output_bound(self, x_bound, ctx=None):
            return x_bound

        def param_sensitivities(self, x_bound, grad_bound, ctx=None):
            return {}

    with pytest.raises(ValueError, match="without a sensitivity bound"):
        lipdp.analyze(nn.Sequential(Scaled()), 1.0, 1.0, (3,))
    frozen = nn.Sequential(Scaled())
    frozen[0].s.requires_grad_(False)
    assert lipdp.analyze(frozen, 1.0, 1.0, (3,)).sensitivities == {}


def test_residual_block_children_are_validated() -> None:
    model = nn.Sequential(ConvexResidual(nn.Sequential(nn.Linear(3, 3), nn.GELU())))
    assert [error.path for error in lipdp.validate(model)] == ["0.block.1"]
