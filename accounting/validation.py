"""Argument checks shared by the accountant, calibration and the CLI.

Every check raises ``ValueError`` naming the argument, the valid range and the value received, and
returns the value converted to a plain Python ``float``/``int`` (so histories stay JSON-able and
hashable whatever numeric type the caller used).
"""

from __future__ import annotations

import math
import numbers


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_noise_multiplier(value: object, name: str = "noise_multiplier") -> float:
    """σ: finite and > 0 (σ = 0 means no privacy at all, which no accountant can bound)."""
    x = _real(name, value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def check_sample_rate(value: object, name: str = "sample_rate") -> float:
    """q: Poisson sampling probability in (0, 1]."""
    x = _real(name, value)
    if not (0 < x <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return x


def check_delta(value: object, name: str = "delta") -> float:
    """δ of (ε, δ)-DP: in the open interval (0, 1)."""
    x = _real(name, value)
    if not (0 < x < 1):
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return x


def check_epsilon(value: object, name: str = "epsilon") -> float:
    """ε of (ε, δ)-DP: finite and >= 0."""
    x = _real(name, value)
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return x


def check_positive(value: object, name: str) -> float:
    """A finite number > 0 (target ε, epochs, tolerances)."""
    x = _real(name, value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def check_steps(value: object, name: str = "steps", minimum: int = 0) -> int:
    """A whole number of steps >= ``minimum`` (integral floats such as 3516.0 are accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif math.isfinite(float(value)) and float(value).is_integer():
        n = int(float(value))
    else:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return n
