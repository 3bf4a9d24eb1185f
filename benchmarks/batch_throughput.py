"""Batch segmentation throughput: one process vs local dask clusters of 1 and 2 workers.

Writes FILES 512 x 512 inputs (the bundled DSB2018 nuclei sample, mirrored and
rotated so that no two are equal), then segments them with ``segment_files``:
in this process (no cluster), and on ``LocalCluster``s of 1 and 2 worker
processes, the cores shared out between the workers. Cluster start-up is
timed apart from the segmentation (``start_s``: starting the workers and
loading the model in each).

    python benchmarks/batch_throughput.py            # 24 files
    python benchmarks/batch_throughput.py --files 8

Prints one JSON line per configuration: files per second, seconds per file.
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
    from napari_jointattn.engine.cluster import segment_files

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
            from napari_jointattn.engine.cluster import _worker_model

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=24)
    p.add_argument("--model", default="nuclei")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="0: no cluster")
    args = p.parse_args()
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
