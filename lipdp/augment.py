"""Per-sample random augmentations for views (augmentation multiplicity, De et al. 2022; docs/design.md §3).

Each augmentation maps a batch of images (N, C, H, W) to one random view of each, drawn independently per sample
from a generator, and never increases a sample's L2 norm, so a view of an input within the norm bound X0 stays
within it: a zero-padded shift keeps or drops pixels, a flip permutes them. (Reflect padding would add pixels,
and norm; it is deliberately absent.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class RandomShift:
    """Shift each image by (dy, dx), uniform in [-max_shift, max_shift]^2, filling with zeros (norm <= the input's)."""

    def __init__(self, max_shift: int) -> None:
        if not (isinstance(max_shift, int) and max_shift >= 0):
            raise ValueError(f"max_shift must be an integer >= 0, got {max_shift!r}")
        self.max_shift = max_shift

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One shifted view of each image."""
        if images.dim() != 4 or self.max_shift == 0 or len(images) == 0:
            return images if images.dim() == 4 else _needs_images(images)
        n, _, height, width = images.shape
        s = self.max_shift
        padded = torch.nn.functional.pad(images, (s, s, s, s))
        offsets = torch.randint(0, 2 * s + 1, (2, n), generator=generator).to(images.device)
        rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (N, H)
        cols = offsets[1, :, None] + torch.arange(width, device=images.device)  # (N, W)
        batch = torch.arange(n, device=images.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return f"RandomShift({self.max_shift})"


class RandomFlip:
    """Flip each image left-right with probability 1/2 (a permutation of its pixels: norm unchanged)."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One (maybe) flipped view of each image."""
        if images.dim() != 4:
            return _needs_images(images)
        flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device).view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(-1), images)

    def __repr__(self) -> str:
        return "RandomFlip()"


class Compose:
    """Apply ``augmentations`` one after the other (each norm non-increasing, so is the composition)."""

    def __init__(self, augmentations: Sequence[Augmentation]) -> None:
        self.augmentations = list(augmentations)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One view of each image through every augmentation."""
        for augmentation in self.augmentations:
            images = augmentation(images, generator)
        return images

    def __repr__(self) -> str:
        return f"Compose({self.augmentations})"


def _needs_images(tensor: torch.Tensor) -> torch.Tensor:
    raise ValueError(f"image augmentations take (N, C, H, W) batches, got shape {tuple(tensor.shape)}. Fix: pass "
                     "image data, or train without a shift or flip augmentation")


def make_views(batch: Sequence[torch.Tensor], views: int, augment: Augmentation | None,
               generator: torch.Generator) -> list[torch.Tensor]:
    """``views`` random views of each record, view-major: inputs ``[a_1(x); ...; a_K(x)]`` (K N rows), every other
    tensor of the batch (labels...) repeated K times in the same order."""
    inputs, *rest = batch
    augment = augment or (lambda x, _: x)
    return [torch.cat([augment(inputs, generator) for _ in range(views)]), *(t.repeat(views, *([1] * (t.dim() - 1)))
                                                                              for t in rest)]
