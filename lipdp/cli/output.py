"""Writing results: the one JSON writer of the command line, the recipes and the benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` (parent folders created; values JSON cannot hold, such as paths
    and tuples of dataclasses, written as their ``str``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
