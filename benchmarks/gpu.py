"""GPU throughput of the default DenseUNet next to MONAI's AttentionUnet, in one run.

    python benchmarks/gpu.py [--device auto] [--size 512] [--batches 1 8 32 64]
                             [--seconds 1.5] [--no-compile] [--json OUT.json] [--write-docs]
    python benchmarks/gpu.py --from-json OUT.json --write-docs   # table from an earlier run

Measures, for each network, at ``--size``² with one input channel:

* inference throughput (images/s) per batch size, fp32 and bf16 autocast, channels_last;
* ``torch.compile`` (bf16, channels_last) at the largest batch only;
* one training step's throughput (forward + backward + AdamW, bf16 autocast);
* FLOPs per image (PyTorch's flop counter, forward, a multiply-add counts 2)
  and the fraction of the device's dense bf16 peak that the best inference
  throughput reaches.

Needs only torch and numpy (MONAI optional; without it the peer is skipped),
never napari. Runs on the CPU too (the smoke test does, on tiny inputs), where
bf16 autocast is CPU autocast and the peak is unknown. Whole run on one H100:
about 2-4 minutes, most of it ``torch.compile``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

# dense bf16 tensor-core peaks (FLOP/s), from the vendors' data sheets
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


def networks(num_classes: int = 2) -> dict:
    from napari_jointattn.model import DenseUNet

    torch.manual_seed(0)
    nets = {"DenseUNet (joint, default)": DenseUNet(num_classes=num_classes)}
    try:
        from monai.networks.nets import AttentionUnet

        nets["MONAI AttentionUnet (32..512)"] = AttentionUnet(
            spatial_dims=2, in_channels=1, out_channels=num_classes,
            channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2))
    except ImportError:
        print("MONAI not installed: AttentionUnet skipped", file=sys.stderr)
    return nets


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, seconds: float, min_iters: int = 3) -> float:
    """Seconds per call: 2 warm-up calls, then calls until ``seconds`` have passed."""
    for _ in range(2):
        fn()
    sync(dev)
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
        if n >= min_iters and dev.type == "cuda":
            sync(dev)
    sync(dev)
    return (time.perf_counter() - t0) / n


def autocast(dev: torch.device, bf16: bool):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def flops_per_image(net, size: int, dev: torch.device) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 1, size, size, device=dev)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(x)
        return float(counter.get_total_flops())
    except Exception as exc:  # noqa: BLE001 - a counter gap must not stop the benchmark
        print(f"flop counter failed: {exc}", file=sys.stderr)
        return None


def _shown(argv: list[str]) -> list[str]:
    """The arguments that change the figures (not where the JSON copy went)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--json":
            skip = True
        elif not a.startswith("--json="):
            out.append(a)
    return out


def measure(args) -> dict:
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if dev.type == "cpu":
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s = args.size
    results = {"device": name, "size": s, "date": datetime.date.today().isoformat(),
               "torch": torch.__version__, "python": platform.python_version(),
               "command": " ".join(["python benchmarks/gpu.py", *_shown(args.argv)]), "networks": {}}
    try:
        import monai

        results["monai"] = monai.__version__
    except ImportError:
        results["monai"] = None
    peak = peak_flops(name) if dev.type == "cuda" else None
    results["peak_bf16_flops"] = peak
    for label, net in networks().items():
        t_net = time.perf_counter()
        net = net.to(dev).to(memory_format=torch.channels_last).eval()
        row = {"params": sum(p.numel() for p in net.parameters()), "infer": {}, "compile": None,
               "train": None}
        row["flops"] = flops_per_image(net, s, dev)
        for precision in ("fp32", "bf16"):
            for b in args.batches:
                x = torch.randn(b, 1, s, s, device=dev).to(memory_format=torch.channels_last)

                def run():
                    with torch.inference_mode(), autocast(dev, precision == "bf16"):
                        net(x)

                try:
                    row["infer"][f"{precision} b{b}"] = b / timed(run, dev, args.seconds)
                except RuntimeError as exc:
                    if not is_oom(exc):
                        raise
                    row["infer"][f"{precision} b{b}"] = None
                    torch.cuda.empty_cache()
                print(f"{label}: {precision} batch {b}: {row['infer'][f'{precision} b{b}']} images/s", flush=True)
                del x
        if args.compile:
            b = max(args.batches)
            x = torch.randn(b, 1, s, s, device=dev).to(memory_format=torch.channels_last)
            try:
                t0 = time.perf_counter()
                compiled = torch.compile(net)
                with torch.inference_mode(), autocast(dev, True):
                    compiled(x)
                sync(dev)
                compile_s = time.perf_counter() - t0

                def run_c():
                    with torch.inference_mode(), autocast(dev, True):
                        compiled(x)

                row["compile"] = {"batch": b, "images_per_s": b / timed(run_c, dev, args.seconds),
                                  "compile_seconds": compile_s}
            except Exception as exc:  # noqa: BLE001 - report, keep the other figures
                row["compile"] = {"batch": b, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            print(f"{label}: compiled: {row['compile']}", flush=True)
            del x
        # one training step: forward + loss + backward + AdamW
        b = args.train_batch
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        x = torch.randn(b, 1, s, s, device=dev).to(memory_format=torch.channels_last)
        t = torch.randint(0, 2, (b, s, s), device=dev)

        def step():
            with autocast(dev, dev.type == "cuda"):
                loss = torch.nn.functional.cross_entropy(net(x).float(), t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        try:
            row["train"] = {"batch": b, "images_per_s": b / timed(step, dev, args.seconds)}
        except RuntimeError as exc:
            if not is_oom(exc):
                raise
            row["train"] = {"batch": b, "error": "out of memory"}
        print(f"{label}: train step: {row['train']}", flush=True)
        net.eval()
        best = [v for k, v in row["infer"].items() if v] + ([row["compile"]["images_per_s"]]
                                                           if row["compile"] and "images_per_s" in row["compile"] else [])
        row["best_images_per_s"] = max(best) if best else None
        row["peak_fraction"] = (row["flops"] * row["best_images_per_s"] / peak
                                if peak and row["flops"] and row["best_images_per_s"] else None)
        row["seconds"] = time.perf_counter() - t_net
        results["networks"][label] = row
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return results


def fmt(v, spec: str = ".0f") -> str:
    return "—" if v is None else format(v, spec)


def table(results: dict) -> str:
    nets = results["networks"]
    keys = list(next(iter(nets.values()))["infer"]) if nets else []
    lines = [f"Device: **{results['device']}**, {results['size']}² input, 1 channel; "
             f"{results['date']}; torch {results['torch']}, MONAI {results.get('monai') or '—'}; "
             f"`{results['command']}`", ""]
    lines.append("| images/s | " + " | ".join(nets) + " |")
    lines.append("| --- |" + " --- |" * len(nets))
    for k in keys:
        lines.append(f"| inference {k} | " + " | ".join(fmt(r["infer"].get(k)) for r in nets.values()) + " |")

    def sub(r, part, field="images_per_s"):
        v = r.get(part)
        if not v:
            return "—"
        if "error" in v:
            return f"failed ({v['error'][:40]})"
        return f"{v[field]:.0f} (b{v['batch']})"

    lines.append("| torch.compile bf16 | " + " | ".join(sub(r, "compile") for r in nets.values()) + " |")
    lines.append("| training step bf16 | " + " | ".join(sub(r, "train") for r in nets.values()) + " |")
    lines.append("| parameters | " + " | ".join(f"{r['params']:,}" for r in nets.values()) + " |")
    lines.append("| GFLOPs / image (forward) | " + " | ".join(fmt(r["flops"] and r["flops"] / 1e9, ".1f") for r in nets.values()) + " |")
    lines.append("| fraction of bf16 peak (best inference) | " + " | ".join(
        fmt(r["peak_fraction"] and 100 * r["peak_fraction"], ".1f") + ("%" if r["peak_fraction"] else "")
        for r in nets.values()) + " |")
    names = list(nets)
    if len(names) == 2 and nets[names[0]]["best_images_per_s"] and nets[names[1]]["best_images_per_s"]:
        bf = [max(v for k, v in nets[n]["infer"].items() if k.startswith("bf16") and v) for n in names]
        lines += ["", f"Best bf16 eager inference: {bf[0]:.0f} vs {bf[1]:.0f} images/s "
                      f"(ratio {bf[0] / bf[1]:.2f}); best overall: {nets[names[0]]['best_images_per_s']:.0f} vs "
                      f"{nets[names[1]]['best_images_per_s']:.0f} images/s "
                      f"(ratio {nets[names[0]]['best_images_per_s'] / nets[names[1]]['best_images_per_s']:.2f})."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=1.5, help="timing window per configuration")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    p.add_argument("--from-json", type=Path, help="print (and write) the table of an earlier run")
    p.add_argument("--write-docs", action="store_true", help="put the table into docs/performance.md")
    args = p.parse_args(argv)
    args.argv = argv
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        results = measure(args)
    text = table(results)
    print(text)
    if args.json:
        from napari_jointattn.engine.io.files import write_bytes_atomic

        write_bytes_atomic(args.json, json.dumps(results, indent=2).encode())
    if args.write_docs:
        from _report import update_section

        update_section(ROOT / "docs" / "performance.md", f"gpu {results['device']}", text)
    return results


if __name__ == "__main__":
    main()
