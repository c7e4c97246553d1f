"""History of a fit(): events, loss curves, and a plot (matplotlib, optional extra 'plot')."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._install import extra_hint
from .results import TrainEvent, TrainSummary


@dataclass
class History:
    events: list[TrainEvent] = field(default_factory=list)

    def add(self, event: TrainEvent) -> None:
        self.events.append(event)

    @property
    def summary(self) -> TrainSummary | None:
        return self.events[-1].summary if self.events else None

    @property
    def epoch_losses(self) -> list[float]:
        return [e.epoch_loss for e in self.events if e.kind == "epoch_end"]

    @property
    def val_losses(self) -> list[float]:
        return [e.val_loss for e in self.events if e.kind == "epoch_end" and e.val_loss is not None]

    @property
    def batch_losses(self) -> list[tuple[int, float]]:
        return [(e.step, e.batch_loss) for e in self.events if e.kind == "progress"]

    def plot(self, path: str | None = None, *, title: str = "gradserve training") -> Any:
        """Draw the loss curves; save a PNG when path is given. Returns the matplotlib Figure."""
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError(f"history.plot() needs {extra_hint('plot', 'matplotlib')}") \
                from None
        fig, ax = plt.subplots(figsize=(7, 4))
        if self.batch_losses:
            steps, losses = zip(*self.batch_losses)
            ax.plot(steps, losses, alpha=0.4, label="batch loss")
        ends = [e for e in self.events if e.kind == "epoch_end"]
        if ends:
            ax.plot([e.step for e in ends], [e.epoch_loss for e in ends], "o-", label="epoch loss")
            vals = [(e.step, e.val_loss) for e in ends if e.val_loss is not None]
            if vals:
                ax.plot(*zip(*vals), "s--", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        if ax.lines and min(float(np.min(line.get_ydata())) for line in ax.lines) > 0:
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
            plt.close(fig)
        return fig
