"""Batch segmentation on dask.distributed: a killed worker, reruns, stale temporary files."""

import os
import signal

import numpy as np
import pytest
import tifffile

from napari_jointattn.engine.scale.batch import JobResult
from napari_jointattn.engine.scale.cluster import segment_files

distributed = pytest.importorskip("distributed")


def _disks(seed: int, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(20, 5, (size, size))
    for cy, cx in rng.integers(20, size - 20, (12, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(40, 120)] += 180
    return img.astype(np.float32)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(6):
        tifffile.imwrite(d / f"img{i}.tif", _disks(i))
    return d


def _outputs(out):
    return {p.name: tifffile.imread(p) for p in sorted(out.glob("*_labels.tif"))}


def test_killed_worker_task_is_rerun_and_outputs_match_one_process(folder, tmp_path):
    reference = segment_files([folder], tmp_path / "one", "nuclei")
    assert len(reference.done) == 6 and not reference.failed
    expected = _outputs(tmp_path / "one")
    assert len(expected) == 6 and all(a.max() > 0 for a in expected.values())

    out = tmp_path / "two"
    out.mkdir()
    # what a writer killed by an earlier run left behind, and a file that is not ours
    (out / ".img3_labels.abcd1234.part.tif").write_bytes(b"half")
    (out / "notes.part.tif").write_bytes(b"mine")
    killed = []
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        def on_result(item):
            if killed:
                return
            busy = [w for w, keys in client.processing().items() if keys]
            if busy:  # kill a worker while it has a task: its tasks must run elsewhere
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(busy[0])

        # two files per task: a rerun task finds its first file already written and keeps it
        report = segment_files([folder], out, "nuclei", scheduler=client, threads_per_worker=1,
                               files_per_task=2, on_result=on_result)
    assert killed, "no worker was busy when the first result came back"
    assert not report.failed
    assert sorted(r.input.name for r in report.done) == [f"img{i}.tif" for i in range(6)]
    got = _outputs(out)
    assert set(got) == set(expected)
    for name, labels in expected.items():
        np.testing.assert_array_equal(got[name], labels, err_msg=name)
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert leftovers == [], leftovers
    assert (out / "notes.part.tif").read_bytes() == b"mine"
    assert [p.name for p in report.cleaned] == [".img3_labels.abcd1234.part.tif"]

    # a rerun skips every finished input and writes nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = segment_files([folder], out, "nuclei", workers=1)
    assert not again.plan.jobs and len(again.plan.skipped) == 6
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_broken_input_fails_alone(folder, tmp_path):
    (folder / "img9.tif").write_bytes(b"II*\x00 not a tiff")
    seen = []
    report = segment_files([folder / "img0.tif", folder / "img9.tif", folder / "img1.tif"],
                           tmp_path / "out", "nuclei", on_result=seen.append)
    assert [r.input.name for r in report.done] == ["img0.tif", "img1.tif"]
    assert [p.name for p, _ in report.failed] == ["img9.tif"]
    assert "img9.tif" in report.failed[0][1]
    assert [type(x) for x in seen] == [JobResult, tuple, JobResult]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0_labels.tif", "img1_labels.tif"]


def test_partial_outputs_of_an_interrupted_run_are_named(folder, tmp_path, saved_model):
    from napari_jointattn.engine.scale.batch import plan_segment

    out = tmp_path / "out"
    out.mkdir()
    (out / "img0_attention_joint-1-8.tif").write_bytes(b"x")
    plan = plan_segment([folder / "img0.tif"], out, ["joint 1/8"])
    assert not plan.jobs
    assert "img0_labels.tif does not" in plan.skipped[0][1]


def test_cli_workers_and_scheduler_are_exclusive(folder, tmp_path, capsys):
    from napari_jointattn.cli import main

    assert main(["segment", str(folder), "--out", str(tmp_path / "o"), "--workers", "2",
                 "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "not allowed with" in capsys.readouterr().err
    assert main(["segment", str(folder), "--out", str(tmp_path / "o"), "--workers", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err


def test_two_runs_on_one_scheduler_get_their_own_results(tmp_path):
    """Files of the same names in two folders, segmented at the same time on one scheduler."""
    import threading

    folders = {}
    for run, seeds in (("a", (10, 11)), ("b", (20, 21))):
        folders[run] = tmp_path / run
        folders[run].mkdir()
        for i, seed in enumerate(seeds):
            tifffile.imwrite(folders[run] / f"img{i}.tif", _disks(seed, 96))
    expected = {}
    for run, folder in folders.items():
        segment_files([folder], tmp_path / f"reference-{run}", "nuclei")
        expected[run] = _outputs(tmp_path / f"reference-{run}")
    for name in expected["a"]:
        assert not np.array_equal(expected["a"][name], expected["b"][name]), name

    # each run waits at its first result for the other's: so both runs' tasks are on the
    # scheduler at once, whichever submits first
    met = threading.Barrier(2, timeout=120)
    reports, errors = {}, []

    def run(name, client):
        first = []

        def on_result(item):
            if not first:
                first.append(item)
                met.wait()

        try:
            reports[name] = segment_files([folders[name]], tmp_path / f"out-{name}", "nuclei",
                                          scheduler=client, on_result=on_result)
        except Exception as exc:  # noqa: BLE001 - reported below, with the other run's outcome
            errors.append(exc)

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        threads = [threading.Thread(target=run, args=(name, client)) for name in folders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for name, folder in folders.items():
        report = reports[name]
        assert not report.failed, report.failed
        assert sorted(r.input for r in report.done) == sorted(folder.glob("*.tif"))
        got = _outputs(tmp_path / f"out-{name}")
        assert set(got) == set(expected[name])
        for file, labels in expected[name].items():
            np.testing.assert_array_equal(got[file], labels, err_msg=f"{name}/{file}")
