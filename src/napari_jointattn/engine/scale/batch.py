"""Planning a folder run: which inputs to segment, what each writes, what is skipped.

Rules (the command line's ``segment``; API users can call :func:`plan_segment`):

* Inputs are listed before anything is written, so an output of this run is
  never read as an input of the same run.
* An input whose path is an output this run would write is skipped; so is a
  file found by expanding a folder that is also the output folder and whose
  name is an output name (``*_labels.tif``, ``*_labels.nii.gz``,
  ``*_attention_*.tif`` / ``.nii.gz``): it is the result of an earlier run, not an image.
* An existing file is never replaced unless ``overwrite`` is true: an input
  whose outputs exist is skipped, with the reason.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInputError
from ..io.images import SUPPORTED, file_format, output_stem

LABELS_SUFFIX = "_labels"
_OUTPUT_NAME = re.compile(r".+((_labels|_attention_[A-Za-z0-9-]+)\.(tif|nii\.gz)|_labels\.zarr)$", re.IGNORECASE)


def slug(name: str) -> str:
    """A module name as a file-name part: ``joint 1/8`` -> ``joint-1-8``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def output_paths(path: Path, out: Path, attention_modules: list[str] | None = None) -> list[Path]:
    """What segmenting ``path`` writes into ``out``: the labels, then any attention stacks.

    A Zarr image gives one Zarr labels store (no attention maps: see :mod:`.zarrseg`).
    """
    from .zarrseg import is_zarr

    stem = output_stem(path)
    if is_zarr(path):
        return [out / f"{stem}_labels.zarr"]
    suffix = ".nii.gz" if file_format(path) == "nifti" else ".tif"
    paths = [out / f"{stem}{LABELS_SUFFIX}{suffix}"]
    paths += [out / f"{stem}_attention_{slug(m)}{suffix}" for m in attention_modules or []]
    return paths


def is_output_name(name: str) -> bool:
    return bool(_OUTPUT_NAME.match(name))


@dataclass
class Job:
    input: Path
    outputs: list[Path]


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    #: (input, reason) for every input that will not be segmented
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _same(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _expand(paths) -> list[tuple[Path, Path | None]]:
    """(file, folder it was found in, or None when named directly)."""
    out: list[tuple[Path, Path | None]] = []
    from .zarrseg import is_zarr

    for p in map(Path, paths):
        if p.is_dir() and is_zarr(p):
            out.append((p, None))
        elif p.is_dir():
            found = sorted(q for q in p.iterdir() if (q.is_file() and file_format(q))
                           or (q.is_dir() and q.name.lower().endswith(".zarr")))
            if not found:
                raise BadInputError(f"{p} contains no supported images ({', '.join(SUPPORTED)})")
            out.extend((q, p) for q in found)
        elif os.path.lexists(p):
            out.append((p, None))
        else:
            raise BadInputError(f"{p}: no such file or directory")
    return out


def plan_segment(inputs, out: str | os.PathLike, attention_modules: list[str] | None = None,
                 overwrite: bool = False) -> Plan:
    """Decide, before any work, what a ``segment`` run over ``inputs`` reads and writes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a folder")
    found = _expand(inputs)
    plan = Plan()
    # the outputs of every input: none of them may be read as an input
    targets = {os.path.normcase(os.path.realpath(t))
               for path, _ in found for t in output_paths(path, out, attention_modules)}
    candidates: list[Path] = []
    seen: set[str] = set()
    for path, folder in found:
        real = os.path.normcase(os.path.realpath(path))
        if real in seen:
            continue
        seen.add(real)
        if real in targets:
            plan.skipped.append((path, "it is an output of this run"))
        elif folder is not None and is_output_name(path.name) and out.exists() and _same(folder, out):
            plan.skipped.append((path, "its name is an output name in the output folder "
                                       "(the result of an earlier run)"))
        else:
            candidates.append(path)
    stems: dict[str, Path] = {}
    for path in candidates:
        stem = output_stem(path)
        if stem in stems:
            raise BadInputError(f"{path} and {stems[stem]} would write the same output name {stem!r}")
        stems[stem] = path
    for path in candidates:
        outputs = output_paths(path, out, attention_modules)
        if outputs[0].name.endswith(".zarr"):
            reason = _zarr_output_state(outputs[0], overwrite)
            if reason:
                plan.skipped.append((path, reason))
            else:
                plan.jobs.append(Job(path, outputs))
            continue
        folders = [t for t in outputs if t.is_dir()]
        existing = [t for t in outputs if os.path.lexists(t)]
        if folders:
            plan.skipped.append((path, f"{folders[0]} is a folder"))
        elif existing and not overwrite:
            if os.path.lexists(outputs[0]):
                reason = f"{outputs[0]} exists (--overwrite / overwrite=True replaces it)"
            else:  # labels are written last: an interrupted run, or files of someone else's
                reason = (f"{existing[0]} exists but {outputs[0].name} does not (an interrupted earlier run?); "
                          "--overwrite / overwrite=True replaces it")
            plan.skipped.append((path, reason))
        else:
            plan.jobs.append(Job(path, outputs))
    return plan


def _zarr_output_state(target: Path, overwrite: bool) -> str | None:
    """Why a Zarr labels store is not (re)made, or None: absent, incomplete (resumed) or overwritten."""
    from .zarrseg import store_state

    if not os.path.lexists(target) or overwrite:
        return None
    state = store_state(target)
    if state is None:
        return f"{target} exists and is not a labels store of this program (--overwrite replaces it)"
    if state.get("complete"):
        return f"{target} exists and is complete (--overwrite / overwrite=True replaces it)"
    return None  # incomplete: the run resumes it


@dataclass
class JobResult:
    """What segmenting one input wrote, and what a user should be told about it."""

    input: Path
    written: list[Path]
    #: what was found: "12 objects" / "2 foreground classes" (describe_found)
    found: str
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)
    #: ways the image differs from the model's training data (one line each)
    fit_warnings: list[str] = field(default_factory=list)


def describe_found(labels, instances: bool) -> str:
    """"12 objects", "1 object", "2 foreground classes", "1 foreground class" (never background)."""
    import numpy as np

    if instances:
        n = int(np.count_nonzero(np.unique(labels)))
        return f"{n} object{'s' if n != 1 else ''}"
    n = int(np.count_nonzero(np.bincount(labels.ravel().astype(np.int64))[1:]))
    return f"{n} foreground class{'es' if n != 1 else ''}"


def run_job(job: Job, model, *, device="auto", tile: int = 512, axis: int | None = None,
            attention_modules: list[str] | None = None, overwrite: bool = False,
            callback=None) -> JobResult:
    """Read one input, segment it, write its outputs (each atomically): the unit of a batch run.

    ``attention_modules``: the map names whose files ``job.outputs[1:]`` are.
    Outputs are written attention maps first and labels last, so an input
    whose labels file exists has all of its outputs.
    """
    import numpy as np

    from .zarrseg import is_zarr

    if is_zarr(job.input):
        return run_zarr_job(job, model, device=device, tile=tile, overwrite=overwrite)
    from ..inference.segment import segment
    from ..io.images import read_image, write_attention, write_labels
    from ..models.fit import fit_warnings

    img = read_image(job.input)
    warnings_ = fit_warnings(model, img, job.input)
    maps = list(attention_modules or [])
    result = segment(img, model, device=device, tile=tile, axis=axis, attention=bool(maps),
                     callback=callback)
    written = []
    if maps:
        written += write_attention({name: result.attention[name] for name in maps}, job.outputs[1:],
                                   like=img, overwrite=overwrite)
    written.insert(0, write_labels(job.outputs[0], result.labels, like=img, overwrite=overwrite))
    found = describe_found(result.labels, result.instances)
    notes = list(result.notes)
    if result.attention_changed is not None:
        from ..evaluation.knockout import describe_share

        notes.append(describe_share(result.attention_changed))
    return JobResult(job.input, written, found, result.seconds, result.device, notes, warnings_)


def run_zarr_job(job: Job, model, *, device="auto", tile: int = 512, overwrite: bool = False,
                 client=None, threads: int | None = None, on_block=None) -> JobResult:
    """A Zarr image, block by block, into its Zarr labels store (resumed if incomplete)."""
    from .zarrseg import describe, segment_zarr

    report = segment_zarr(job.input, job.outputs[0], model, device=device, tile=tile, overwrite=overwrite,
                          client=client, threads=threads, on_block=on_block)
    if report.failed:
        number, reason = report.failed[0]
        raise BadInputError(f"{job.input}: {len(report.failed)} block(s) failed (block {number}: {reason}); "
                            f"{job.outputs[0]} is incomplete, a rerun resumes it")
    if not report.complete:
        from ..errors import Cancelled

        raise Cancelled(f"{job.outputs[0]} is incomplete ({describe(report)})")
    from ..devices import describe_device, resolve_device

    return JobResult(job.input, [job.outputs[0]], describe(report), report.seconds,
                     describe_device(resolve_device(device)), [], [])
