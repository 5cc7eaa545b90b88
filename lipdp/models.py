"""Model factories: orthogonal CNNs for images, orthogonal MLPs for tabular data.

Every model starts with ``InputNormClip`` (so X_0 holds for any input), uses orthogonium's orthogonal layers
(AOC convolutions with zero padding: about 2x faster than circular on CPU and still 1-Lipschitz), MaxMin
activations, L2-norm pooling and an orthogonal head. Convolutions have no bias by default: a conv bias is
shared by all P output positions, so its sensitivity sqrt(P) G is large and it would mostly add noise.
"""

from __future__ import annotations

import math
from typing import Sequence

from orthogonium.layers import AdaptiveOrthoConv2d, MaxMin, OrthoLinear
from torch import nn

from lipdp.layers import GlobalL2Pool2d, InputNormClip, L2NormPool2d, SampleCentring


def orthogonal_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
    input_norm_bound: float = 1.0,
    kernel_size: int = 3,
    conv_bias: bool = False,
) -> nn.Sequential:
    """Stages of [orthogonal conv 3x3 -> MaxMin -> 2x2 L2-norm pooling], then global L2 pooling and an
    orthogonal linear head. Works for any H, W (pooling stops once the map is 1x1)."""
    channels, height, width = input_shape
    layers: list[nn.Module] = [InputNormClip(input_norm_bound)]
    for out_channels in widths:
        layers += [
            AdaptiveOrthoConv2d(channels, out_channels, kernel_size, padding="same", padding_mode="zeros",
                                bias=conv_bias),
            MaxMin(),
        ]
        channels = out_channels
        if min(height, width) >= 2:
            layers.append(L2NormPool2d(2))
            height, width = height // 2, width // 2
    layers += [GlobalL2Pool2d(), OrthoLinear(channels, num_classes)]
    return nn.Sequential(*layers)


def orthogonal_patch_cnn(
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (32, 64),
    dense_width: int = 256,
    input_norm_bound: float = 1.0,
    patch_size: int = 2,
    depth: int = 1,
) -> nn.Sequential:
    """A network whose trainable layers have no patch-overlap factor in their gradient bounds (docs/design.md §2):
    each image centred on its own mean (``SampleCentring``: free, +0.95 to +1.29 points of Fashion-MNIST validation
    accuracy, README) and projected onto the ``input_norm_bound`` ball, then stages of [orthogonal patch convolution
    (kernel = stride = ``patch_size``: each input pixel is read once) -> MaxMin -> ``depth - 1`` x (orthogonal 1x1
    convolution -> MaxMin)], then the whole map flattened into an orthogonal dense layer (one position) -> MaxMin ->
    an orthogonal head. Spatial mixing happens only where patches merge, so
    each weight's certified bound sqrt(m) G X has m = 1."""
    channels, height, width = input_shape
    layers: list[nn.Module] = [SampleCentring(), InputNormClip(input_norm_bound)]
    for out_channels in widths:
        if min(height, width) < patch_size:
            break
        layers += [AdaptiveOrthoConv2d(channels, out_channels, patch_size, stride=patch_size, padding=0,
                                       padding_mode="zeros", bias=False), MaxMin()]
        for _ in range(depth - 1):
            layers += [AdaptiveOrthoConv2d(out_channels, out_channels, 1, padding=0, bias=False), MaxMin()]
        channels, height, width = out_channels, height // patch_size, width // patch_size
    layers += [nn.Flatten(), OrthoLinear(channels * height * width, dense_width), MaxMin(),
               OrthoLinear(dense_width, num_classes)]
    return nn.Sequential(*layers)


def orthogonal_mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (64, 64),
    input_norm_bound: float = 1.0,
    bias: bool = True,
) -> nn.Sequential:
    """InputNormClip -> [OrthoLinear -> MaxMin]* -> OrthoLinear, for flat (tabular) inputs."""
    layers: list[nn.Module] = [nn.Flatten(), InputNormClip(input_norm_bound)]
    width = in_features
    for size in hidden:
        layers += [OrthoLinear(width, size, bias=bias), MaxMin()]
        width = size
    layers.append(OrthoLinear(width, out_features, bias=bias))
    return nn.Sequential(*layers)


#: The kinds ``orthogonal_network`` builds; all but 'mlp' need images.
NETWORK_KINDS = ("cnn", "patch", "mlp")


def orthogonal_network(kind: str, input_shape: Sequence[int], num_classes: int, widths: Sequence[int],
                       input_norm_bound: float = 1.0) -> nn.Sequential:
    """``kind`` 'cnn' (``orthogonal_cnn`` on images, ``widths`` its stages), 'patch' (``orthogonal_patch_cnn``, the
    same) or 'mlp' (``orthogonal_mlp`` on the flattened input, ``widths`` its hidden layers): the networks
    ``lipdp train`` and the recipes build."""
    if kind == "cnn":
        return orthogonal_cnn(input_shape, num_classes, widths=tuple(widths), input_norm_bound=input_norm_bound)
    if kind == "patch":
        return orthogonal_patch_cnn(input_shape, num_classes, widths=tuple(widths), input_norm_bound=input_norm_bound)
    if kind == "mlp":
        return orthogonal_mlp(math.prod(input_shape), num_classes, hidden=tuple(widths),
                              input_norm_bound=input_norm_bound)
    raise ValueError(f"unknown network kind {kind!r}. Fix: 'cnn', 'patch' or 'mlp'")
