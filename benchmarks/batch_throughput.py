"""Batch segmentation throughput: one process vs local dask clusters of 1 and 2 workers.

Writes FILES 512 x 512 inputs (the bundled DSB2018 nuclei sample, mirrored and
rotated so that no two are equal), then segments them with ``segment_files``:
in this process (no cluster), and on ``LocalCluster``s of 1 and 2 worker
processes, the cores shared out between the workers. Cluster start-up is
timed apart from the segmentation (``start_s``: starting the workers and
loading the model in each).

    python benchmarks/batch_throughput.py            # 24 files
    python benchmarks/batch_throughput.py --files 8

Prints the model's load time and file size, the scheduler's rate on trivial
tasks (its own cost per task), then one JSON line per configuration: files
per second, seconds per file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_inputs(folder: Path, n: int) -> None:
    import tifffile

    import napari_jointattn

    base = tifffile.imread(Path(napari_jointattn.__file__).with_name("samples") / "nuclei_dsb2018.tif")
    variants = [base, base[::-1], base[:, ::-1], base.T]
    for i in range(n):
        img = np.rot90(variants[i % 4], i // 4 % 4)
        tifffile.imwrite(folder / f"img{i:03d}.tif", np.ascontiguousarray(img))


def run(folder: Path, out: Path, workers: int | None, model: str) -> dict:
    from napari_jointattn.engine.scale.cluster import segment_files

    if workers is None:
        t0 = time.perf_counter()
        report = segment_files([folder], out, model)
        total = time.perf_counter() - t0
        start = 0.0
    else:
        import logging

        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        threads = max(1, (os.cpu_count() or 1) // workers)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            # start-up: the workers, then the model loaded once in each
            from napari_jointattn.engine.scale.cluster import _worker_model

            client.run(_worker_model, model)
            start = time.perf_counter() - t0
            t1 = time.perf_counter()
            report = segment_files([folder], out, model, scheduler=client, threads_per_worker=threads)
            total = time.perf_counter() - t1
    n = len(report.done)
    assert n and not report.failed, report.failed
    return {"workers": workers or "none (this process)", "files": n, "start_s": round(start, 1),
            "segment_s": round(total, 1), "files_per_s": round(n / total, 3),
            "s_per_file": round(total / n, 3), "cpu_count": os.cpu_count()}


def _noop(i: int) -> int:
    return i


def scheduler_rate(n: int, workers: int = 2) -> dict:
    """Trivial tasks through a local cluster: the scheduler's own cost per task, for the capacity plan."""
    import logging

    from distributed import Client, LocalCluster, wait

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        wait(client.map(_noop, range(100), pure=False))  # warm
        t0 = time.perf_counter()
        wait(client.map(_noop, range(n), pure=False))
        seconds = time.perf_counter() - t0
    return {"noop_tasks": n, "workers": workers, "seconds": round(seconds, 2),
            "tasks_per_s": round(n / seconds), "ms_per_task": round(seconds / n * 1e3, 3)}


def model_load() -> dict:
    """What each worker pays once: loading the model file (after the imports)."""
    from napari_jointattn.engine.models.metadata import preset_path
    from napari_jointattn.engine.models.model import load_model

    load_model("nuclei")  # imports
    t0 = time.perf_counter()
    load_model(str(preset_path("nuclei")))
    return {"model_load_s": round(time.perf_counter() - t0, 3),
            "model_file_mb": round(preset_path("nuclei").stat().st_size / 1e6, 2)}


def stages(size: int = 2048, model_name: str = "nuclei") -> dict:
    """One size x size image through the steps of a task, each timed (median of 3): read the
    TIFF, the network with MONAI's window blending, the post-processing (classes and the instance
    watershed), write the labels. The network part is what a GPU worker would do on the GPU."""
    import statistics

    import tifffile

    import napari_jointattn
    from napari_jointattn.engine.inference.segment import (
        band_classes,
        band_instances,
        predict_slice,
    )
    from napari_jointattn.engine.io.images import read_image, write_labels
    from napari_jointattn.engine.io.normalize import normalize
    from napari_jointattn.engine.models.model import load_model

    base = tifffile.imread(Path(napari_jointattn.__file__).with_name("samples") / "nuclei_dsb2018.tif")
    reps = size // base.shape[0] + 1
    img = np.tile(base, (reps, reps))[:size, :size]
    model = load_model(model_name)
    folder = Path(tempfile.mkdtemp(prefix="stages_"))
    times: dict[str, list[float]] = {"read": [], "network": [], "post": [], "write": []}
    try:
        tifffile.imwrite(folder / "in.tif", img)
        import torch

        for _ in range(4):
            t = time.perf_counter()
            data = read_image(folder / "in.tif").data
            times["read"].append(time.perf_counter() - t)
            x, _ = normalize(data[None], None, model.normalization.percentiles)
            t = time.perf_counter()
            probs = predict_slice(model, x, torch.device("cpu"))
            times["network"].append(time.perf_counter() - t)
            t = time.perf_counter()
            labels = band_instances(model, band_classes(model, probs[: model.num_classes].numpy(), None))
            times["post"].append(time.perf_counter() - t)
            t = time.perf_counter()
            write_labels(folder / "out_labels.tif", labels)
            times["write"].append(time.perf_counter() - t)
        size_in = (folder / "in.tif").stat().st_size
        size_out = (folder / "out_labels.tif").stat().st_size
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"stages_size": size, **{f"{k}_s": round(statistics.median(v[1:]), 3) for k, v in times.items()},
            "input_mb": round(size_in / 1e6, 2), "labels_mb": round(size_out / 1e6, 3),
            "objects": int(labels.max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=24)
    p.add_argument("--model", default="nuclei")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0: no cluster")
    p.add_argument("--noop", type=int, default=5000, help="trivial tasks for the scheduler's rate (0: skip)")
    args = p.parse_args()
    print(json.dumps(model_load()), flush=True)
    print(json.dumps(stages(2048, args.model)), flush=True)
    if args.noop:
        print(json.dumps(scheduler_rate(args.noop)), flush=True)
    folder = Path(tempfile.mkdtemp(prefix="batch_tp_"))
    try:
        (folder / "in").mkdir()
        write_inputs(folder / "in", args.files)
        for w in args.workers:
            print(json.dumps(run(folder / "in", folder / f"out{w}", w or None, args.model)), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
