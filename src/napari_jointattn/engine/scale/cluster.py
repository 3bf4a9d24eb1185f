"""Batch segmentation on a dask.distributed cluster: one task per input file or Zarr block.

``segment_files(inputs, out, model, workers=N)`` starts a ``LocalCluster`` of
``N`` worker processes; ``scheduler="tcp://host:8786"`` uses a running cluster
(``dask-scheduler`` / ``dask-worker``, dask-jobqueue, Kubernetes...), whose
workers must see the same file system paths as this process. With neither, the
files are segmented here, one after the other, exactly as ``napari-jointattn
segment`` always did. Dask does the scheduling; this module only says what a
task is:

* The plan (:func:`~.batch.plan_segment`) is made here, before any work: which
  inputs are segmented, what each writes, which are skipped. A rerun skips
  the inputs whose labels exist, so it resumes where a stopped run left off.
* A task reads one input, segments it and writes its outputs, each
  atomically (temporary file, then rename), labels last.
* Each worker process loads the model once (a preset or file by name, cached
  per process; a :class:`~.models.Model` object is sent to every worker once).
* A worker that dies mid-task: the scheduler reruns its task on another worker
  (dask's ``allowed-failures``, 3 by default). A killed writer cannot remove its
  temporary file, so the temporary files of this run's outputs are removed at
  the end, when no task of the run is left running.
* A Zarr image is segmented block by block (:mod:`.zarrseg`): each block is a
  task, written into the output store as one chunk; a rerun resumes an
  incomplete store.
* An input that cannot be segmented (a broken file) fails its task alone: the
  others go on, and the failure is reported with the file's name.
* Runs may share a scheduler: each run's task keys hold a token of its own, so
  files of the same name in two runs at once are two tasks, each with its own result.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInputError
from .batch import Job, JobResult, Plan, plan_segment, run_job

#: per worker process: (model reference, file state) -> Model
_MODELS: dict = {}


@dataclass
class BatchReport:
    plan: Plan
    done: list[JobResult] = field(default_factory=list)
    #: (input, one-line reason) of every input whose task failed
    failed: list[tuple[Path, str]] = field(default_factory=list)
    #: stale temporary files of killed writers, removed at the end
    cleaned: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1


def _model_key(ref: str) -> tuple:
    try:
        st = os.stat(ref)
    except OSError:
        return (ref,)
    return (os.path.realpath(ref), st.st_mtime_ns, st.st_size)


def _worker_model(ref):
    """The model for a task: loaded once per worker process (per file version)."""
    from ..models.model import Model, load_model

    if isinstance(ref, Model):
        return ref
    key = _model_key(str(ref))
    model = _MODELS.get(key)
    if model is None:
        _MODELS.clear()
        model = _MODELS[key] = load_model(ref)
    return model


def _task(jobs: list[Job], model_ref, options: dict, threads: int | None) -> list:
    """Some inputs on a worker (or here), one after the other: a JobResult or an
    ``(input, reason)`` failure each (a bad input is a result, not a retry).

    An input whose labels already exist was finished by an earlier attempt of this
    task (its worker died before reporting): it is reported done, not written again.
    """
    from ..errors import one_line

    if threads:
        import torch

        torch.set_num_threads(threads)
    model = _worker_model(model_ref)
    out = []
    for job in jobs:
        if not options["overwrite"] and os.path.lexists(job.outputs[0]):
            out.append(JobResult(job.input, list(job.outputs), "already written by an earlier attempt",
                                 0.0, "-", [], []))
            continue
        try:
            out.append(run_job(job, model, **options))
        except BadInputError as exc:
            out.append((job.input, one_line(exc)))
    return out


def _model_ref(model: str | os.PathLike) -> str:
    """A preset name as it is; a model file as an absolute path (workers may run elsewhere)."""
    if isinstance(model, os.PathLike) or os.path.exists(model):
        return os.path.abspath(model)
    return model


def segment_files(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    model="nuclei",
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    device: str = "auto",
    tile: int = 512,
    axis: int | None = None,
    attention: bool = False,
    overwrite: bool = False,
    threads_per_worker: int | None = None,
    files_per_task: int = 1,
    on_result: Callable[[JobResult | tuple[Path, str]], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    tile_progress: Callable[[Path], Callable] | None = None,
) -> BatchReport:
    """Segment files (and folders of files) into ``out``; see the module's notes.

    ``workers``: start a local cluster of this many processes (each with
    ``threads_per_worker`` torch threads; default: the cores shared out).
    ``files_per_task``: inputs segmented by one cluster task (more per task: less
    scheduler work per file, coarser progress and retries; see docs/scale.md).
    ``scheduler``: the address of a running dask scheduler (or a
    ``distributed.Client``). ``on_result`` is called, in this process, with
    each :class:`JobResult` or ``(input, reason)`` failure as it arrives;
    ``on_plan`` with the plan before any work. ``tile_progress(input)``, without a
    cluster only: a :func:`~.inference.segment` callback for that input (closed
    afterwards if it has ``close``).
    """
    from ..devices import resolve_device
    from ..models.model import load_model

    if workers is not None and scheduler is not None:
        raise BadInputError("give either workers (a local cluster) or scheduler (a running one), not both")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise BadInputError(f"workers must be a positive integer, got {workers!r}")
    resolve_device(device)  # a bad device name fails here, before any cluster starts
    loaded = load_model(model)  # checked here (a missing file is one line), and for the map names
    from ..inference.segment import attention_map_keys

    maps = [key.name for key in attention_map_keys(loaded)] if attention else []
    plan = plan_segment(inputs, out, maps, overwrite=overwrite)
    if on_plan is not None:
        on_plan(plan)
    report = BatchReport(plan)
    if not plan.jobs:
        return report
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    options = {"device": device, "tile": tile, "axis": axis, "attention_modules": maps, "overwrite": overwrite}
    t0 = time.perf_counter()

    def record(item) -> None:
        if isinstance(item, JobResult):
            report.done.append(item)
        else:
            report.failed.append(item)
        if on_result is not None:
            on_result(item)

    try:
        if workers is None and scheduler is None:
            _run_here(plan, loaded, options, record, tile_progress)
        else:
            ref = _model_ref(model) if isinstance(model, (str, os.PathLike)) else loaded
            if not isinstance(files_per_task, int) or files_per_task < 1:
                raise BadInputError(f"files_per_task must be a positive integer, got {files_per_task!r}")
            report.workers = _run_on_cluster(plan, ref, loaded, options, record, workers, scheduler,
                                             threads_per_worker, files_per_task)
    finally:
        # no task of this run is running any more: what a killed writer left is garbage
        from ..io.files import remove_stale_temporaries

        report.cleaned = remove_stale_temporaries(t for job in plan.jobs for t in job.outputs)
        report.seconds = time.perf_counter() - t0
    return report


def _run_here(plan: Plan, model, options: dict, record, tile_progress) -> None:
    from ..errors import one_line

    for job in plan.jobs:
        callback = tile_progress(job.input) if tile_progress is not None else None
        try:
            result = run_job(job, model, callback=callback, **options)
        except BadInputError as exc:
            result = (job.input, one_line(exc))
        finally:
            getattr(callback, "close", lambda: None)()
        record(result)


def _run_on_cluster(plan: Plan, model_ref, loaded, options: dict, record, workers, scheduler,
                    threads_per_worker, files_per_task: int = 1) -> int:
    """File inputs are tasks; a Zarr input's blocks are tasks (:mod:`.zarrseg`)."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:
        raise BadInputError("batch segmentation on a cluster needs dask.distributed: "
                            "pip install 'napari-jointattn[distributed]'") from exc
    import logging

    from ..errors import one_line
    from .batch import run_zarr_job
    from .zarrseg import is_zarr

    cluster = None
    own_client = True
    if workers is not None:
        threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
    elif hasattr(scheduler, "submit"):
        client, own_client, threads = scheduler, False, threads_per_worker
    else:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise BadInputError(f"cannot reach the dask scheduler at {scheduler}: {one_line(exc)}") from exc
        threads = threads_per_worker
    try:
        from ..models.model import Model

        files = [job for job in plan.jobs if not is_zarr(job.input)]
        if files and isinstance(model_ref, Model):  # sent to every worker once, not with every task
            model_ref = client.scatter(model_ref, broadcast=True)
        groups = [files[i:i + files_per_task] for i in range(0, len(files), files_per_task)]
        # a scheduler hands a key already in use the existing task's result: another run's,
        # for files of the same name; so keys are this run's
        run = uuid.uuid4().hex
        futures = {client.submit(_task, group, model_ref, options, threads, pure=False,
                                 key=f"segment-{group[0].input.name}-{run}-{i}"): group
                   for i, group in enumerate(groups)}
        n_workers = len(client.scheduler_info().get("workers", {}))
        for future in as_completed(futures):
            try:
                for item in future.result():
                    record(item)
            except Exception as exc:  # KilledWorker after repeated deaths, MemoryError on a worker...
                for job in futures[future]:
                    record((job.input, f"{job.input}: {type(exc).__name__}: {one_line(exc)}"))
        for job in plan.jobs:
            if is_zarr(job.input):
                try:
                    record(run_zarr_job(job, loaded, device=options["device"], tile=options["tile"],
                                        overwrite=options["overwrite"], client=client, threads=threads))
                except BadInputError as exc:
                    record((job.input, one_line(exc)))
        return max(n_workers, 1)
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
