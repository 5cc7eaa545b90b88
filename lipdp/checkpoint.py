"""Checkpoint files: written atomically (``lipdp.atomic``), loaded without running code (docs/design.md §3).

``torch.load(weights_only=False)`` unpickles arbitrary objects: a tampered checkpoint could run code while it is
loaded. lipdp's checkpoints hold only plain data (tensors, numbers, strings, lists, dicts: model and optimizer
state dicts, the accountant's history, generator states), so they are loaded with ``weights_only=True``, torch's
restricted unpickler, whose allow-list admits exactly those types. Anything else, a file that is not a lipdp
checkpoint, or a truncated file, raises ``CheckpointError`` before any state is touched.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from lipdp.atomic import atomic_write

FORMAT = "lipdp-checkpoint-1"
REQUIRED_KEYS = ("model", "optimizer", "accountant", "sampling_generator", "noise_generator", "seed",
                 "noise_multiplier", "sample_rate")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read: nothing was loaded from it."""


def save_state(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (plain data only) to ``path`` atomically, tagged with the checkpoint format."""
    return atomic_write(path, lambda file: torch.save({"format": FORMAT, **state}, file))


def load_state(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by ``save_state`` with torch's restricted unpickler (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}. Fix: give the path save_checkpoint wrote")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, TypeError,
            ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CheckpointError(
            f"{path} is not a loadable lipdp checkpoint (it holds more than plain data, or is damaged: {reason}); "
            "nothing was loaded. Fix: resume from a checkpoint written by LipDPEngine.save_checkpoint, and never "
            "from a file of unknown origin") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a lipdp checkpoint (no '{FORMAT}' tag); nothing was loaded. Fix: give "
                              "a file written by LipDPEngine.save_checkpoint")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; nothing was loaded. Fix: give a whole checkpoint "
                              "written by LipDPEngine.save_checkpoint")
    return state
