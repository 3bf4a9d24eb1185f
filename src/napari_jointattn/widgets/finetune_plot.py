"""The Fine-tune dock's live plot: training loss and validation Dice against epochs."""

from __future__ import annotations


class LossPlot:
    """A small matplotlib canvas (``canvas``, a Qt widget) redrawn from the run's history."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2, 2.0), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(fig)
        self.canvas.setMinimumHeight(160)
        self.axes = fig.add_subplot(111)

    def draw(self, curves) -> None:
        """``curves``: ((steps x, loss), (checks x, Dice)), as ``controllers.finetune.curves``
        gives them."""
        ax = self.axes
        ax.clear()
        (sx, loss), (cx, dice) = curves
        if sx:
            ax.plot(sx, loss, color="tab:blue", lw=1, label="training loss")
        if cx:
            ax.plot(cx, dice, "o-", color="tab:orange", ms=3, label="validation Dice")
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        if sx or cx:
            ax.legend(fontsize=7, loc="best")
        self.canvas.draw_idle()
