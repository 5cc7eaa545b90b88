"""Budget reports: ε spent after each epoch, as a text table, JSON and a matplotlib PNG.

All epochs are accounted with one backend set-up for the whole history
(:meth:`PrivacyAccountant.epsilon_curve`), so a report costs little more than one ε.
An epoch is ``steps_per_epoch`` steps (1/q for Poisson sampling, may be fractional); epoch e ends
after ``ceil(e · steps_per_epoch)`` steps. Long runs are thinned to at most ``MAX_ROWS`` rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from accounting.accountant import PrivacyAccountant
from accounting.validation import check_delta, check_epsilon, check_positive

MAX_ROWS = 100
_MIN_PLOT_POINTS = 10


@dataclass(frozen=True)
class EpochRow:
    """ε bounds after ``steps`` steps (``epoch`` epochs, fractional for a final partial epoch)."""

    epoch: float
    steps: int
    epsilon: float
    estimate: float
    lower: float | None


class BudgetReport:
    """Privacy spent by ``accountant``'s history at ``delta``, per epoch of ``steps_per_epoch`` steps."""

    def __init__(self, accountant: PrivacyAccountant, delta: float, steps_per_epoch: float,
                 target_epsilon: float | None = None):
        self.accountant = accountant
        self.delta = check_delta(delta)
        self.steps_per_epoch = check_positive(steps_per_epoch, "steps_per_epoch")
        self.target_epsilon = None if target_epsilon is None else check_epsilon(target_epsilon, "target_epsilon")
        self._rows: list[EpochRow] | None = None

    def _boundaries(self) -> list[tuple[float, int]]:
        """(epoch, steps) at the end of each (thinned) epoch, and at the last step if it ends a partial epoch."""
        total = self.accountant.total_steps
        epochs = math.floor(round(total / self.steps_per_epoch, 6))
        stride = max(1, math.ceil(epochs / MAX_ROWS))
        boundaries = [(e, math.ceil(round(e * self.steps_per_epoch, 6))) for e in range(stride, epochs + 1, stride)]
        if total > 0 and (not boundaries or boundaries[-1][1] < total):
            boundaries.append((round(total / self.steps_per_epoch, 4), total))
        return boundaries

    @property
    def rows(self) -> list[EpochRow]:
        """One row per epoch boundary (and the last step), computed once."""
        if self._rows is None:
            boundaries = self._boundaries()
            results = self.accountant.epsilon_curve(self.delta, [steps for _, steps in boundaries])
            self._rows = [EpochRow(epoch, steps, r.upper, r.estimate, r.lower)
                          for (epoch, steps), r in zip(boundaries, results, strict=True)]
        return self._rows

    @property
    def epsilon(self) -> float:
        """ε spent by the whole history (conservative)."""
        return self.rows[-1].epsilon if self.rows else 0.0

    def to_dict(self) -> dict:
        """The report as JSON-able data: backend, method, δ, target, total ε, the history and one dict per row."""
        result = self.accountant.epsilon_result(self.delta)
        return {
            "backend": self.accountant.backend_name,
            "method": result.method,
            "note": result.note,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.accountant.total_steps,
            "epsilon": self.epsilon,
            "history": [entry.to_list() for entry in self.accountant.history],
            "epochs": [asdict(row) for row in self.rows],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` serialised as JSON."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        """A plain-text table: one line per row (epoch, steps, ε bounds, and % of the target when one is set)."""
        result = self.accountant.epsilon_result(self.delta)
        target = "" if self.target_epsilon is None else f", target ε = {self.target_epsilon:g}"
        lines = [f"Privacy budget at δ = {self.delta:g}{target} ({self.accountant.backend_name}: {result.method})"]
        if result.note:
            lines.append(f"note: {result.note}")
        header = f"{'epoch':>9} {'steps':>9} {'ε (upper)':>11} {'estimate':>10} {'lower':>10}"
        if self.target_epsilon:
            header += f" {'% target':>9}"
        lines += [header, "-" * len(header)]
        for row in self.rows:
            lower = "-" if row.lower is None else f"{row.lower:.4f}"
            line = f"{row.epoch:>9g} {row.steps:>9d} {row.epsilon:>11.4f} {row.estimate:>10.4f} {lower:>10}"
            if self.target_epsilon:
                line += f" {100 * row.epsilon / self.target_epsilon:>8.1f}%"
            lines.append(line)
        if not self.rows:
            lines.append("(no steps taken: ε = 0)")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write a PNG of ε (upper, with the lower–upper band where the backend gives one) against steps."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        points = self._plot_points()
        figure = Figure(figsize=(6.4, 4.0), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        steps, lowers, uppers = zip(*points, strict=True)
        axes.plot(steps, uppers, marker=".", label=f"ε ({self.accountant.backend_name}, upper)")
        if all(lower is not None for lower in lowers):
            axes.fill_between(steps, lowers, uppers, alpha=0.25, label="lower – upper")
        if self.target_epsilon is not None:
            axes.axhline(self.target_epsilon, color="tab:red", linestyle="--",
                         label=f"target ε = {self.target_epsilon:g}")
        axes.set_xlabel("steps")
        axes.set_ylabel(f"ε at δ = {self.delta:g}")
        axes.set_title("Privacy budget spent")
        axes.set_xlim(left=0)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower right")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
        return path

    def _plot_points(self) -> list[tuple[int, float | None, float]]:
        """(steps, lower, upper) at step 0, at every row, and at evenly spaced steps if there are few rows."""
        total = self.accountant.total_steps
        points = {row.steps: (row.lower, row.epsilon) for row in self.rows}
        if len(self.rows) < _MIN_PLOT_POINTS:
            even = {round(total * i / _MIN_PLOT_POINTS) for i in range(1, _MIN_PLOT_POINTS)}
            extra = sorted(even - set(points) - {0})
            results = self.accountant.epsilon_curve(self.delta, extra)
            points.update({t: (r.lower, r.upper) for t, r in zip(extra, results, strict=True)})
        has_lower = all(lower is not None for lower, _ in points.values())
        points[0] = (0.0 if has_lower else None, 0.0)
        return [(t, lower, upper) for t, (lower, upper) in sorted(points.items())]
