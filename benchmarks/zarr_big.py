"""Bigger than memory: segment a large OME-Zarr image block by block; peak memory and time per pixel.

Writes its own input: a SIZE x SIZE uint16 OME-Zarr image (2 levels) tiled from
the bundled DSB2018 nuclei sample (mirrored, so that every block holds
nuclei), then segments it with ``segment_zarr`` into an OME-Zarr labels store,
in a fresh process so that its peak RSS is its own. The reference, in the same
invocation and also in a fresh process: the same model on a REFERENCE x
REFERENCE image (default 4096) held in memory, segmented by ``segment()`` as
the dock and CLI do for ordinary files. Their ratio of seconds per pixel is
what working from Zarr costs per pixel.

    python benchmarks/zarr_big.py                      # 32768 from Zarr, 4096 in memory
    python benchmarks/zarr_big.py --size 8192          # a shorter run

Prints one JSON line per run and the ratio (seconds per pixel, Zarr / in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_input(path: Path, size: int, chunk: int = 1024) -> None:
    import tifffile
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    import napari_jointattn

    tile = tifffile.imread(Path(napari_jointattn.__file__).with_name("samples") / "nuclei_dsb2018.tif")
    tile = tile.astype(np.uint16)
    mosaic = np.block([[tile, tile[:, ::-1]], [tile[::-1], tile[::-1, ::-1]]])  # seamless 2x2 mirror
    m = mosaic.shape[0]
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    level0 = group.create_array("0", shape=(size, size), chunks=(chunk, chunk), dtype=np.uint16)
    level1 = group.create_array("1", shape=(size // 8, size // 8), chunks=(chunk, chunk), dtype=np.uint16)
    reps = chunk // m + 2
    big = np.tile(mosaic, (reps, reps))
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            oy, ox = y % m, x % m
            level0[y:y + chunk, x:x + chunk] = big[oy:oy + chunk, ox:ox + chunk]
    for y in range(0, size // 8, chunk):
        rows = np.asarray(level0[y * 8:(y + chunk) * 8:8, ::8])
        level1[y:y + rows.shape[0], :] = rows
    write_multiscales_metadata(group, [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [8, 8]}]}],
        fmt=FormatV04(), axes=["y", "x"])


def run_reference(size: int, model: str) -> dict:
    """In this process: ``segment()`` on a size x size array in memory, made like the Zarr input."""
    import zarr

    from napari_jointattn.engine.inference.segment import segment

    folder = Path(tempfile.mkdtemp(prefix="zarr_ref_"))
    try:
        write_input(folder / "ref.zarr", size)
        image = np.asarray(zarr.open_array(str(folder / "ref.zarr" / "0"), mode="r")[:])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    result = segment(image, model)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"reference": "segment() in memory", "size": size, "segment_s": round(seconds, 1),
            "us_per_pixel": round(seconds / size**2 * 1e6, 3), "peak_rss_mb": round(rss),
            "objects_in_first_2048": int(len(np.unique(result.labels[:2048, :2048])) - 1),
            "threads": __import__("torch").get_num_threads()}


def run_one(size: int, block: int, folder: Path, model: str) -> dict:
    """In this process: write the input, segment it, report time and peak RSS."""
    from napari_jointattn.engine.scale.zarrseg import segment_zarr

    src, dst = folder / f"in{size}.zarr", folder / f"out{size}.zarr"
    t0 = time.perf_counter()
    write_input(src, size)
    written = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = segment_zarr(src, dst, model, block=block)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import zarr

    labels = zarr.open_array(str(dst / "0"), mode="r")
    sample = np.asarray(labels[:2048, :2048])
    return {"size": size, "block": block, "blocks": report.blocks, "complete": report.complete,
            "segment_s": round(report.seconds, 1), "us_per_pixel": round(report.seconds / size**2 * 1e6, 3),
            "peak_rss_mb": round(rss), "peak_rss_while_writing_input_mb": round(rss_before),
            "objects_joined": report.joined, "objects_in_first_2048": int(len(np.unique(sample)) - 1),
            "input_written_s": round(written, 1), "threads": __import__("torch").get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32768, help="the Zarr image's side")
    p.add_argument("--reference", type=int, default=4096, help="the in-memory image's side (0: none)")
    p.add_argument("--block", type=int, default=1920)
    p.add_argument("--model", default="nuclei")
    p.add_argument("--folder", default=None, help="where inputs and outputs go (default: a temporary folder)")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ref", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ref is not None:
        print(json.dumps(run_reference(args.ref, args.model)), flush=True)
        return
    folder = Path(args.folder or tempfile.mkdtemp(prefix="zarr_big_"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.block, folder, args.model)), flush=True)
        return
    results = {}

    def child(*flags: str) -> dict:
        out = subprocess.run([sys.executable, __file__, *flags, "--model", args.model], check=True,
                             capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        return json.loads(line)

    try:
        if args.reference:
            results["memory"] = child("--ref", str(args.reference))
        results["zarr"] = child("--one", str(args.size), "--block", str(args.block), "--folder", str(folder))
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    if "memory" in results:
        print(json.dumps({"time_per_pixel_ratio": round(results["zarr"]["us_per_pixel"]
                                                        / results["memory"]["us_per_pixel"], 3),
                          "zarr": args.size, "memory": args.reference, "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
