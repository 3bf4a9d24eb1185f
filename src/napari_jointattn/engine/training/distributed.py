"""Data-parallel training over ``torch.distributed`` (``torchrun``), and its no-op single-process form.

``torchrun --nproc_per_node N -m napari_jointattn.train ...`` starts N
processes; :func:`process_group` initialises ``torch.distributed`` from the
environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``): backend ``nccl`` when training runs on CUDA
(process ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``), ``gloo`` on the CPU.

:class:`Parallel` is what :func:`~napari_jointattn.engine.training.train`
uses; with one process every method is the identity, so the loop reads the
same either way. With N processes:

* every process draws the same global batch from its identically seeded
  generator and keeps rows ``rank::N`` (:meth:`Parallel.shard`); channel
  dropout draws the global batch's mask and keeps the same rows
  (:meth:`Parallel.shard_dropout`), so N processes compute what one process
  with the same batch computes;
* the loss's batch sums are all-reduced with a differentiable all-reduce
  (:meth:`Parallel.reduce`), so every process has the global batch's loss;
  that all-reduce sums the gradients in its backward pass (a factor N) and
  ``DistributedDataParallel`` averages them (a factor 1/N): the update is the
  single-process one;
* decisions are taken once: the stop reason is all-reduced every step (any
  process stopping stops all, :meth:`Parallel.agree_stop`), validation,
  threshold calibration and the knock-out scores are computed by rank 0 and
  broadcast (:meth:`Parallel.from_main`), so the best-weights bookkeeping is
  identical everywhere; only rank 0 writes the checkpoint and the model file,
  and the others wait for it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ..devices import resolve_device
from ..errors import BadInputError

#: stop reasons, weakest first: the strongest any process has wins
STOP_REASONS = (None, "early stopping", "time budget", "stopped")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def training_device(device: torch.device) -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` for CUDA under several processes."""
    if world_size() <= 1:
        return device
    if device.type == "cuda":
        return torch.device("cuda", local_rank())
    if device.type != "cpu":
        raise BadInputError(f"data-parallel training runs on CUDA or the CPU, not {device.type!r} "
                            "(use --device cpu or cuda)")
    return device


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto"):
    """``torch.distributed`` initialised from torchrun's environment for the ``with`` block.

    Nothing happens when ``WORLD_SIZE`` is unset or 1 (plain single-process
    training) or when a group is already initialised (the caller's). The
    group is destroyed at the end.
    """
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1 or initialized():
        yield
        return
    dev = resolve_device(device)
    if dev.type not in ("cpu", "cuda"):
        raise BadInputError(f"data-parallel training runs on CUDA or the CPU, not {dev.type!r} "
                            "(use --device cpu or cuda)")
    if dev.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise BadInputError(f"LOCAL_RANK {local_rank()} but only {torch.cuda.device_count()} CUDA device(s) "
                                "on this node (start at most that many processes per node)")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend_for(dev))
    try:
        yield
    finally:
        dist.destroy_process_group()


class Parallel:
    """What one training process does with the others (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.world = world_size()
        self.rank = rank()
        self.active = self.world > 1
        self.backend = dist.get_backend() if self.active else None
        # NCCL moves CUDA tensors only; gloo (also) CPU ones
        self._comm = device if self.backend == "nccl" else torch.device("cpu")
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """For the model's provenance: how many processes trained it, and over which backend."""
        return {"processes": self.world, "distributed_backend": self.backend}

    def check_batch(self, batch_size: int) -> None:
        if batch_size < self.world:
            raise BadInputError(f"batch_size {batch_size} is smaller than the {self.world} training processes: "
                                "each process needs at least one crop of the global batch")

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """``net`` in ``DistributedDataParallel`` (which broadcasts rank 0's weights now)."""
        if not self.active:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids, output_device=ids[0] if ids else None)

    def shard(self, *tensors: torch.Tensor) -> tuple:
        """This process's rows ``rank::world`` of the global batch."""
        if not self.active:
            return tensors
        return tuple(t[self.rank::self.world] for t in tensors)

    def shard_dropout(self, dropouts, batch_size: int) -> None:
        """Channel dropout draws the global batch's mask and keeps this process's rows."""
        if not self.active:
            return
        rows = len(range(self.rank, batch_size, self.world))
        for d in dropouts:
            d.forward = functools.partial(_sharded_dropout, d, self.rank, self.world, batch_size, rows)

    def unshard_dropout(self, dropouts) -> None:
        for d in dropouts:
            d.__dict__.pop("forward", None)

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, differentiably (its backward sums the gradients over processes too)."""
        if not self.active:
            return tensor
        return _AllReduceSum.apply(tensor)

    @property
    def loss_reduce(self):
        """What ``masked_loss`` gets as ``reduce``: None with one process."""
        return self.reduce if self.active else None

    def agree_stop(self, reason: str | None) -> str | None:
        """The stop reason of all processes: the strongest any has (none stops alone)."""
        if not self.active:
            return reason
        code = STOP_REASONS.index(reason) if reason in STOP_REASONS else len(STOP_REASONS) - 1
        t = torch.tensor([code], dtype=torch.int64, device=self._comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return STOP_REASONS[int(t.item())]

    def agree_max(self, value: float) -> float:
        """The largest ``value`` over processes (e.g. elapsed time, which sets a time-budgeted schedule)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def from_main(self, fn):
        """``fn()`` computed on rank 0 and broadcast (pickled) to all; rank 0's exception is raised everywhere."""
        if not self.active:
            return fn()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as exc:  # every process fails with it, none waits forever
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0, device=self._comm)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def barrier(self) -> None:
        if self.active:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    @contextlib.contextmanager
    def main_file(self, path: str | os.PathLike | None):
        """Rank 0's file ``path`` on every process: a local path to its bytes, or None if rank 0 has none.

        Other processes (on other nodes, too) get a temporary copy, removed afterwards.
        """
        if path is None:
            yield None
            return
        if not self.active:
            yield path if os.path.exists(path) else None
            return
        data = self.from_main(lambda: Path(path).read_bytes() if os.path.exists(path) else None)
        if data is None:
            yield None
        elif self.is_main:
            yield path
        else:
            fd, tmp = tempfile.mkstemp(suffix=".safetensors", prefix="jointattn-ckpt-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                yield tmp
            finally:
                os.remove(tmp)


class _AllReduceSum(torch.autograd.Function):
    """A sum over processes whose backward pass sums the gradients over processes.

    As ``torch.distributed.nn.functional.all_reduce`` (deprecated in recent
    PyTorch): each process's loss is a function of the summed statistics
    ``S``, so ``d loss / d s_rank`` is the sum over processes of ``d loss_p / d S``.
    """

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def _sharded_dropout(d, rank: int, world: int, batch: int, rows: int, x: torch.Tensor) -> torch.Tensor:
    """``Dropout2d.forward`` on a shard: the global batch's channel mask, rows ``rank::world``."""
    if not d.training or d.p == 0:
        return x
    if x.shape[0] != rows:  # not a training shard: the plain behaviour
        return type(d).forward(d, x)
    keep = torch.empty((batch,) + tuple(x.shape[1:2]) + (1,) * (x.ndim - 2))  # on the CPU, as Dropout2d
    keep.bernoulli_(1 - d.p, generator=d.generator)
    return x * keep[rank::world].to(device=x.device, dtype=x.dtype) / (1 - d.p)
