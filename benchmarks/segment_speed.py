"""Segment time through the public API next to MONAI peers, and peak memory.

    python benchmarks/segment_speed.py [--model nuclei] [--repeats 5] [--memory-size 4096]

* Segment time for a 512^2 single-channel image through ``segment()``
  (normalisation, tiling, post-processing included), median of ``--repeats``
  runs after warm-up, next to the forward time of MONAI's AttentionUnet
  (channels 32..512, strides 2) and BasicUNet on the same input, measured in
  the same process, interleaved, with the same thread count.
* Peak resident memory of a fresh process segmenting a ``--memory-size``^2
  image (post-processing included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

MEMORY_CHILD = """
import json, resource, sys, time, numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from napari_jointattn import load_model, new_model, segment
name, size = sys.argv[1], int(sys.argv[2])
try:
    model = load_model(name)
except Exception:
    model = new_model(name, seed=0)
rng = np.random.default_rng(0)
# blobs of nucleus size on a noisy background, built in row bands (no full-size temporaries)
image = np.empty((size, size), np.float32)
xx = np.arange(size, dtype=np.float32)
for r in range(0, size, 512):
    yy = np.arange(r, min(size, r + 512), dtype=np.float32)[:, None]
    band = ((np.sin(yy / 9.0) * np.cos(xx / 11.0)) > 0.6).astype(np.float32) * 200
    image[r:r + len(yy)] = band + rng.normal(20, 5, band.shape).astype(np.float32)
segment(image[:256, :256], model, device="cpu")  # warm-up: first-call costs are not per-pixel costs
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
result = segment(image, model, device="cpu")
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "before_mib": base / 1024, "seconds": time.perf_counter() - t,
                  "objects": int(result.labels.max())}))
"""


def peers():
    from monai.networks.nets import AttentionUnet, BasicUNet

    return {
        "MONAI AttentionUnet (32..512)": AttentionUnet(
            spatial_dims=2, in_channels=1, out_channels=2, channels=(32, 64, 128, 256, 512),
            strides=(2, 2, 2, 2),
        ).eval(),
        "MONAI BasicUNet": BasicUNet(spatial_dims=2, in_channels=1, out_channels=2).eval(),
    }


def load(name):
    from napari_jointattn import load_model, new_model

    try:
        return load_model(name), "trained"
    except Exception:
        return new_model(name, seed=0), "random init (no bundled weights)"


def time_segment(name, size=512, repeats=5, threads=2):
    from napari_jointattn import segment

    torch.set_num_threads(threads)
    model, state = load(name)
    image = np.random.default_rng(0).normal(100, 20, (size, size)).astype(np.float32)
    nets = peers()
    x = torch.randn(1, 1, size, size)
    jobs = {f"napari-jointattn segment() [{name}, {state}]": lambda: segment(image, model, device="cpu")}
    for label, net in nets.items():
        jobs[f"{label} forward"] = lambda net=net: net(x)
    times = {k: [] for k in jobs}
    with torch.inference_mode():
        for job in jobs.values():
            job()
        for _ in range(repeats):
            for k, job in jobs.items():
                t = time.perf_counter()
                job()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(name, size, threads=2):
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, name, str(size), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nuclei")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-size", type=int, default=4096)
    args = p.parse_args(argv)
    times = time_segment(args.model, args.size, args.repeats, args.threads)
    ours = next(v for k, v in times.items() if k.startswith("napari-jointattn"))
    print(f"| {args.size}² image, {args.threads} threads | median (s) | ratio to ours |")
    print("| --- | --- | --- |")
    for k, v in times.items():
        print(f"| {k} | {v:.3f} | {v / ours:.2f} |")
    mem = None
    if args.memory_size:
        mem = peak_memory(args.model, args.memory_size, args.threads)
        print(f"\npeak resident memory segmenting {args.memory_size}²: {mem['peak_mib']:.0f} MiB "
              f"(process before segmenting: {mem['before_mib']:.0f} MiB), {mem['seconds']:.1f} s, "
              f"{mem['objects']} objects")
    return times, mem


if __name__ == "__main__":
    main()
