"""CPU runtimes for ``segment()``: PyTorch eager, torch.compile, ONNX Runtime, OpenVINO, in one run.

Each runtime replaces only the network inside ``segment()`` (normalisation,
MONAI's sliding window, post-processing and instances are the same code): the
ONNX graph is the one ``napari-jointattn export --format onnx`` writes
(softmax probabilities; the window predictor's softmax of their logarithm
gives them back unchanged), OpenVINO compiles that same ONNX file for the CPU.
Times are medians of ``--repeats`` runs after one warm-up run, interleaved
(runtime A, B, C, D, then again), with the same thread count for all. MONAI's
AttentionUnet (channels 32..512) forward on the same 512² input is timed in
the same loop, for the ratio the CPU targets are stated in.

    NAPARI_JOINTATTN_CPU_RUNTIME=torch python benchmarks/cpu_runtime.py    # 512 and 2048, nuclei preset
    python benchmarks/cpu_runtime.py --sizes 512 --repeats 3

Prints one JSON line per size and runtime: median seconds, the first (warm-up)
call's seconds (compilation included), speed-up over eager,
labels identical to eager (and the fraction of equal pixels), and the ratio to
AttentionUnet's forward at 512².
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class _ProbabilityNet:
    """A runtime that returns softmax probabilities, as the window predictor's "logits"."""

    def __init__(self, run) -> None:
        self.run = run

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        probs = torch.from_numpy(np.asarray(self.run(batch.float().numpy())))
        return torch.log(probs.clamp_min(1e-30))


def runtimes(model, onnx_path: Path, threads: int, which: list[str]) -> dict:
    from napari_jointattn.engine.models.export import export_net

    nets = {}
    if "eager" in which:
        nets["eager"] = None  # segment()'s own network
    if "compile" in which:
        exported = export_net(model)
        exported.upsample = 1
        compiled = torch.compile(exported, dynamic=False)  # windows have one shape per run
        nets["compile"] = _ProbabilityNet(lambda x: compiled(torch.from_numpy(x)).numpy())
    if "onnxruntime" in which:  # the network segment() runs with NAPARI_JOINTATTN_CPU_RUNTIME=onnxruntime
        from napari_jointattn.engine.inference.runtime import OrtNetwork
        from napari_jointattn.engine.models.export import onnx_session

        nets["onnxruntime"] = OrtNetwork(onnx_session(onnx_path), "benchmark")
    if "openvino" in which:
        try:
            import openvino as ov
        except ImportError:
            print(json.dumps({"runtime": "openvino", "skipped": "not installed (pip install openvino)"}))
        else:
            core = ov.Core()
            compiled_ov = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                             {"INFERENCE_NUM_THREADS": threads})
            nets["openvino"] = _ProbabilityNet(lambda x: compiled_ov(x)[0])
    return nets


def segment_with(image, model, net):
    """``segment()`` with its network replaced by ``net`` (None: its own)."""
    from napari_jointattn.engine.inference import segment as inference

    if net is None:
        return inference.segment(image, model, device="cpu")
    real = inference.Placement.on
    inference.Placement.on = classmethod(lambda cls, m, d: cls(d, net))
    try:
        return inference.segment(image, model, device="cpu")
    finally:
        inference.Placement.on = real


def main() -> None:
    import os

    if os.environ.get("NAPARI_JOINTATTN_CPU_RUNTIME", "auto") != "torch":
        raise SystemExit("run with NAPARI_JOINTATTN_CPU_RUNTIME=torch: 'eager' must be segment()'s PyTorch path")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nuclei")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--runtimes", nargs="+", default=["eager", "compile", "onnxruntime", "openvino"])
    args = p.parse_args()
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _images import blobs
    from monai.networks.nets import AttentionUnet

    from napari_jointattn.engine.models.export import export_model
    from napari_jointattn.engine.models.model import load_model

    threads = torch.get_num_threads()
    model = load_model(args.model)
    if model.normalization.upsample != 1:
        raise SystemExit("this benchmark swaps the network at upsample 1 only")
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = Path(folder) / "model.onnx"
        t0 = time.perf_counter()
        export_model(model, "onnx", onnx_path)
        print(json.dumps({"onnx_export_s": round(time.perf_counter() - t0, 1), "threads": threads,
                          "torch": torch.__version__}), flush=True)
        nets = runtimes(model, onnx_path, threads, args.runtimes)
        peer = AttentionUnet(spatial_dims=2, in_channels=1, out_channels=2, channels=(32, 64, 128, 256, 512),
                             strides=(2, 2, 2, 2)).eval()
        for size in args.sizes:
            image = blobs(size)
            times: dict[str, list[float]] = {name: [] for name in nets}
            times["AttentionUnet forward"] = []
            labels = {}
            first: dict[str, float] = {}
            for rep in range(args.repeats + 1):  # the first round warms up (compilation, allocators)
                for name, net in list(nets.items()):
                    t0 = time.perf_counter()
                    try:
                        result = segment_with(image, model, net)
                    except Exception as exc:  # noqa: BLE001 - a runtime that fails is reported, not fatal
                        print(json.dumps({"size": size, "runtime": name, "failed": f"{type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0] if str(exc) else ''}"}), flush=True)
                        del nets[name], times[name]
                        continue
                    if rep:
                        times[name].append(time.perf_counter() - t0)
                    else:
                        first[name] = time.perf_counter() - t0
                    labels[name] = result.labels
                x = torch.from_numpy(image.astype(np.float32))[None, None]
                t0 = time.perf_counter()
                with torch.inference_mode():
                    peer(x)
                if rep:
                    times["AttentionUnet forward"].append(time.perf_counter() - t0)
            peer_s = statistics.median(times["AttentionUnet forward"])
            eager_s = statistics.median(times["eager"]) if "eager" in times else None
            for name in nets:
                s = statistics.median(times[name])
                ref = labels.get("eager")
                same = None if ref is None else (ref > 0) == (labels[name] > 0)
                print(json.dumps({
                    "size": size, "runtime": name, "median_s": round(s, 4), "first_call_s": round(first[name], 2),
                    "speedup_vs_eager": round(eager_s / s, 3) if eager_s else None,
                    "labels_identical": None if ref is None else bool(np.array_equal(ref, labels[name])),
                    "foreground_agreement": None if same is None else round(float(same.mean()), 6),
                    "objects": int(labels[name].max()), "ratio_to_AttentionUnet_forward": round(s / peer_s, 3),
                }), flush=True)
            print(json.dumps({"size": size, "runtime": "MONAI AttentionUnet forward (32..512)",
                              "median_s": round(peer_s, 4)}), flush=True)


if __name__ == "__main__":
    main()
