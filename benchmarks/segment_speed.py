"""Segment time through the public API next to MONAI peers, and peak memory.

    python benchmarks/segment_speed.py [--model nuclei] [--sizes 256 512 1024 2048]
                                       [--scaling 1024 4096 8192] [--repeats 5] [--write-docs]

* Segment time for single-channel images of each ``--sizes`` through
  ``segment()`` (normalisation, tiling, post-processing included), median of
  ``--repeats`` runs after warm-up, next to the forward time of MONAI's
  AttentionUnet (channels 32..512, strides 2) and BasicUNet on the same input,
  measured in the same process, interleaved, with the same thread count.
* Scaling: for each ``--scaling`` size, a fresh process segments an image of
  nucleus-like blobs (instances included) and reports time per pixel and peak
  resident memory (the process's whole footprint: Python, torch, the image).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

MEMORY_CHILD = """
import json, sys, time, numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from napari_jointattn import load_model, new_model, segment
name, size = sys.argv[1], int(sys.argv[2])
try:
    model = load_model(name)
except Exception:
    model = new_model(name, seed=0)
sys.path.insert(0, sys.argv[4])
from _images import blobs
image = blobs(size)
def hwm():
    # this process's own peak (VmHWM); ru_maxrss would include the parent's peak before exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
segment(image[:256, :256], model, device="cpu")  # warm-up: first-call costs are not per-pixel costs
base = hwm()
t = time.perf_counter()
result = segment(image, model, device="cpu")
print(json.dumps({"peak_mib": hwm(),
                  "before_mib": base, "seconds": time.perf_counter() - t,
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


def time_segment(name, sizes=(512,), repeats=5, threads=2):
    """{size: {job: median seconds}}: our segment() and the peers' forward, interleaved per size."""
    from napari_jointattn import segment

    torch.set_num_threads(threads)
    model, state = load(name)
    nets = peers()
    out = {}
    for size in sizes:
        image = np.random.default_rng(0).normal(100, 20, (size, size)).astype(np.float32)
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
        out[size] = {k: statistics.median(v) for k, v in times.items()}
    return out


def peak_memory(name, size, threads=2):
    """Time and peak RSS of segmenting one size^2 image in a fresh process."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, name, str(size), str(threads),
                          str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed_table(times: dict, threads: int) -> str:
    sizes = list(times)
    jobs = list(times[sizes[0]])
    lines = [f"| median seconds ({threads} threads) | " + " | ".join(f"{s}²" for s in sizes) + " |",
             "| --- |" + " --- |" * len(sizes)]
    for job in jobs:
        lines.append(f"| {job} | " + " | ".join(f"{times[s][job]:.3f}" for s in sizes) + " |")
    ours = jobs[0]
    for job in jobs[1:]:
        lines.append(f"| ratio: ours / {job.removesuffix(' forward')} | "
                     + " | ".join(f"{times[s][ours] / times[s][job]:.2f}" for s in sizes) + " |")
    return "\n".join(lines)


def scaling_table(rows: list[dict]) -> str:
    base = rows[0]["seconds"] / rows[0]["size"] ** 2
    lines = ["| image | seconds | µs per pixel | per-pixel time vs first | peak RSS (MiB) | RSS before segmenting (MiB) | objects |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        per = r["seconds"] / r["size"] ** 2
        lines.append(f"| {r['size']}² | {r['seconds']:.1f} | {per * 1e6:.2f} | {per / base:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['before_mib']:.0f} | {r['objects']} |")
    return "\n".join(lines)


def main(argv=None):
    import datetime
    import platform

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="nuclei")
    p.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024, 2048],
                   help="sizes for the comparison with MONAI peers (none: skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scaling", type=int, nargs="*", default=[1024, 4096, 8192],
                   help="sizes for time per pixel and peak memory, each in a fresh process (none: skip)")
    p.add_argument("--write-docs", action="store_true", help="put the tables into docs/performance.md")
    args = p.parse_args(argv)
    times = time_segment(args.model, args.sizes, args.repeats, args.threads) if args.sizes else {}
    rows = [{"size": s, **peak_memory(args.model, s, args.threads)} for s in args.scaling]
    import monai

    stamp = (f"{datetime.date.today().isoformat()}; {platform.processor() or platform.machine()}, "
             f"{args.threads} threads; torch {torch.__version__}, MONAI {monai.__version__}, numpy {np.__version__}; "
             f"`python benchmarks/segment_speed.py {' '.join(argv)}`")
    sections = {}
    if times:
        sections["cpu speed"] = speed_table(times, args.threads) + "\n\n" + stamp
    if rows:
        sections["cpu scaling"] = scaling_table(rows) + "\n\n" + stamp
    print("\n\n".join(sections.values()))
    if args.write_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _report import update_section

        for key, text in sections.items():
            update_section(Path(__file__).resolve().parent.parent / "docs" / "performance.md", key, text)
    return times, rows


if __name__ == "__main__":
    main()
