"""An exponential moving average of the weights, the one validation scores and training keeps."""

from __future__ import annotations

import contextlib

import torch


class WeightAverage:
    """``decay`` per step, with the usual warm-up ``min(decay, (1 + t) / (10 + t))``.

    The warm-up lets the average follow the first steps closely instead of
    dragging the start weights along for hundreds of steps. Integer buffers
    (counters) are copied, not averaged. ``decay`` 0 turns it off: every
    method is then a no-op and :meth:`applied` scores the raw weights.
    """

    def __init__(self, net: torch.nn.Module, decay: float, state: dict | None = None) -> None:
        self.net = net
        self.decay = float(decay)
        self.avg: dict[str, torch.Tensor] = {}
        if self.decay > 0:
            current = net.state_dict()
            self.avg = {k: (state[k] if state and k in state else v).detach().clone().to(v.device)
                        for k, v in current.items()}

    def update(self, step: int) -> None:
        if not self.avg:
            return
        d = min(self.decay, (1 + step) / (10 + step))
        with torch.no_grad():
            floats_avg, floats_now = [], []
            for k, v in self.net.state_dict().items():
                if v.is_floating_point():
                    floats_avg.append(self.avg[k])
                    floats_now.append(v.detach())
                else:
                    self.avg[k].copy_(v)
            torch._foreach_lerp_(floats_avg, floats_now, 1.0 - d)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the network for the duration; the raw ones restored after."""
        if not self.avg:
            yield
            return
        raw = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.net.load_state_dict(self.avg)
        try:
            yield
        finally:
            self.net.load_state_dict(raw)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.avg)
