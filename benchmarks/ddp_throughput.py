"""Training steps per second: one process vs data-parallel processes (gloo, CPU).

    python benchmarks/ddp_throughput.py [--steps 12] [--warmup 3] [--batch 8] [--crop 128]
                                        [--configs 1x1 1x2 2x1]

Each configuration ``PxT`` trains the nuclei architecture from scratch on a
synthetic 256 x 256 image of disks for ``warmup + steps`` steps of the same
global batch, with ``P`` processes of ``T`` threads each (P > 1: processes
started with torch.multiprocessing, ``torch.distributed`` over gloo on
127.0.0.1, as torchrun would); the step times after the warm-up give steps
per second. Prints a markdown table (and returns its rows).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

import numpy as np


def _image(side: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    for i in range(1, 25):
        cy, cx = rng.integers(12, side - 12, 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(40, 120)] = i
    image = (labels > 0) * 200.0 + rng.normal(20, 10, (side, side))
    return image.astype(np.float32), labels


def _run(rank: int, world: int, threads: int, port: int, opts: dict, out: str) -> None:
    import torch

    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from napari_jointattn.engine.models.model import new_model
    from napari_jointattn.engine.training import distributed, train

    image, labels = _image()
    stamps: list[float] = []

    def on_step(info):
        if info["val_dice"] is None:
            stamps.append(time.perf_counter())

    with distributed.process_group("cpu"):
        train(new_model("nuclei", seed=0), [image], [labels], epochs=1,
              steps_per_epoch=opts["warmup"] + opts["steps"], batch_size=opts["batch"], crop=opts["crop"],
              val_every=10**6, calibrate_threshold=False, device="cpu", seed=0, callback=on_step)
    if rank == 0:
        timed = stamps[opts["warmup"] - 1:]
        with open(out, "w") as fh:
            fh.write(str((len(timed) - 1) / (timed[-1] - timed[0])))


def measure(world: int, threads: int, opts: dict) -> float:
    """Steps per second with ``world`` processes of ``threads`` threads each."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate")
        if world == 1:
            # in a fresh process too, so every configuration starts alike
            mp.start_processes(_run, args=(1, threads, port, opts, out), nprocs=1, start_method="spawn")
        else:
            mp.start_processes(_run, args=(world, threads, port, opts, out), nprocs=world, start_method="spawn")
        with open(out) as fh:
            return float(fh.read())


def main(argv: list[str] | None = None) -> list[tuple]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (default 3)")
    p.add_argument("--batch", type=int, default=8, help="global batch size (default 8)")
    p.add_argument("--crop", type=int, default=128, help="crop side in pixels (default 128)")
    p.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"],
                   help="PROCESSESxTHREADS configurations (default 1x1 1x2 2x1)")
    a = p.parse_args(argv)
    opts = {"steps": a.steps, "warmup": max(1, a.warmup), "batch": a.batch, "crop": a.crop}
    rows = []
    for cfg in a.configs:
        world, threads = (int(v) for v in cfg.lower().split("x"))
        rate = measure(world, threads, opts)
        rows.append((world, threads, rate, rate * a.batch))
    base = rows[0][2]
    print(f"global batch {a.batch} crops of {a.crop}², {a.steps} timed steps after {opts['warmup']}, "
          f"{os.cpu_count()} CPU cores\n")
    print("| processes | threads each | steps/s | crops/s | vs first row |")
    print("|---|---|---|---|---|")
    for world, threads, rate, crops in rows:
        print(f"| {world} | {threads} | {rate:.2f} | {crops:.1f} | {rate / base:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
