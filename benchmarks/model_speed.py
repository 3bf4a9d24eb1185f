"""Forward time of each attention variant of the default DenseUNet on CPU.

    python benchmarks/model_speed.py [--sizes 256 512 1024] [--repeats 5] [--threads 2]

Prints a markdown table: parameters and median forward time (after warm-up)
per variant and input size, all measured in one process, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from napari_jointattn.model import DenseUNet, count_parameters

VARIANTS = [("none", "mix"), ("pointwise", "mix"), ("self", "mix"), ("joint", "mix"), ("joint", "gated")]


def measure(sizes, repeats, threads):
    torch.set_num_threads(threads)
    nets = {}
    for attention, form in VARIANTS:
        torch.manual_seed(0)
        nets[(attention, form)] = DenseUNet(attention=attention, joint_form=form).eval()
    times = {(k, s): [] for k in nets for s in sizes}
    with torch.inference_mode():
        for s in sizes:
            x = torch.randn(1, 1, s, s)
            for net in nets.values():
                net(x)  # warm-up
            for _ in range(repeats):
                for key, net in nets.items():  # interleaved: drift hits all variants alike
                    t = time.perf_counter()
                    net(x)
                    times[(key, s)].append(time.perf_counter() - t)
    rows = []
    for key, net in nets.items():
        name = key[0] if key[0] != "joint" else f"joint ({key[1]})"
        rows.append((name, count_parameters(net), [statistics.median(times[(key, s)]) for s in sizes]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    rows = measure(args.sizes, args.repeats, args.threads)
    header = "| variant | parameters | " + " | ".join(f"{s}² (ms)" for s in args.sizes) + " |"
    print(header)
    print("|" + " --- |" * (2 + len(args.sizes)))
    for name, params, ts in rows:
        print(f"| {name} | {params:,} | " + " | ".join(f"{t * 1000:.0f}" for t in ts) + " |")
    return rows


if __name__ == "__main__":
    main()
