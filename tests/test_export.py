"""Model export (engine/models/export.py, ``napari-jointattn export``, docs/export.md).

A tiny network (as in test_robustness.py) keeps the default run short; the ``nuclei`` preset
is checked under ``-m slow``. The snippets of docs/export.md are extracted and run here.
"""

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import napari_jointattn
from napari_jointattn import segment
from napari_jointattn.cli import main
from napari_jointattn.engine.errors import BadInputError
from napari_jointattn.engine.inference.postprocess import split_instances
from napari_jointattn.engine.inference.segment import predict_slice
from napari_jointattn.engine.io.normalize import normalize
from napari_jointattn.engine.models import export as ex
from napari_jointattn.engine.models.model import new_model, save_model
from napari_jointattn.model import DenseUNetConfig

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TINY = DenseUNetConfig(stem_channels=8, growth=4, block_layers=(1, 1), decoder_channels=(8, 8, 8),
                       head_channels=4, attention_dim=8, attention_levels=(1,))
DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"
SAMPLE = Path(napari_jointattn.__file__).resolve().parent / "samples" / "nuclei_dsb2018.tif"
SIZES = [(256, 256), (384, 320)]
#: the export's own checks, test tensors and cover use this crop of the sample (small: fast)
SMALL = (slice(200, 264), slice(180, 260))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks: one thread is faster than two fighting other jobs for the same cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _global_state() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.random.get_rng_state(),
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def _changed(before: dict, now: dict) -> list[str]:
    (_, keys, *rest), (_, keys_now, *rest_now) = before["numpy"], now["numpy"]
    same = {"random": before["random"] == now["random"],
            "numpy": np.array_equal(keys, keys_now) and rest == rest_now,
            "torch": torch.equal(before["torch"], now["torch"]),
            "deterministic": before["deterministic"] == now["deterministic"]}
    return [name for name, ok in same.items() if not ok]


@contextlib.contextmanager
def kept_global_state():
    """The Python, NumPy and PyTorch generators and PyTorch's deterministic switch are put back."""
    state, warn_only = _global_state(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        random.setstate(state["random"])
        np.random.set_state(state["numpy"])
        torch.random.set_rng_state(state["torch"])
        torch.use_deterministic_algorithms(state["deterministic"], warn_only=warn_only)


@contextlib.contextmanager
def watched_global_state():
    """Yields a list that gets the name of every process-wide state of :func:`kept_global_state`
    another thread sees change while the block runs, or that differs after it. The block starts
    from distinctive states (deterministic algorithms on, warnings only), restored afterwards."""
    with kept_global_state():
        random.seed(11)
        np.random.seed(12)
        torch.manual_seed(13)
        torch.use_deterministic_algorithms(True, warn_only=True)
        start = _global_state()
        changed: list[str] = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                changed.extend(c for c in _changed(start, _global_state()) if c not in changed)
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield changed
        finally:
            done.set()
            watcher.join()
            changed.extend(c for c in _changed(start, _global_state()) if c not in changed)


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.fixture(scope="module")
def tiny():
    return new_model(config=TINY, classes=["background", "nucleus"], name="tiny", seed=0,
                     postprocess={"instances": True, "min_size": 15, "min_distance": 3})


@pytest.fixture(scope="module")
def raw():
    return tifffile.imread(SAMPLE).astype(np.float32)


@pytest.fixture(scope="module")
def onnx_file(tiny, raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return ex.export_model(tiny, "onnx", out, sample=raw[SMALL])


def reference(model, image):
    """What segment() computes for one tile: predict_slice on the normalised image."""
    x, _ = normalize(image[None], None, model.normalization.percentiles)
    return predict_slice(model, x, torch.device("cpu")).numpy()


def test_onnx_matches_pytorch_at_two_sizes(tiny, raw, onnx_file):
    import onnx

    path = onnx_file.path
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ex.onnx_session(path)
    for h, w in [*SIZES, (131, 97)]:  # and a size that is no multiple of the network's
        image = raw[:h, :w]
        x, _ = normalize(image[None], None, tiny.normalization.percentiles)
        got = session.run(["output"], {"input": x[None]})[0][0]
        want = reference(tiny, image)
        assert got.shape == want.shape == (2, h, w)
        assert np.abs(got - want).max() < 1e-4, (h, w)
        assert np.allclose(got.sum(axis=0), 1, atol=1e-5)  # probabilities, not logits
    # what the export wrote down
    info = json.loads(ex.sidecar_path(path).read_text())
    assert info["classes"] == ["background", "nucleus"]
    assert info["normalization"]["percentiles"] == [1.0, 99.8] and info["normalization"]["per"] == "image"
    assert info["normalization"]["upsample"] == 1
    assert info["postprocess"] == {"instances": True, "min_size": 15, "min_distance": 3}
    assert info["input"]["layout"] == "BCYX" and info["input"]["min_size"] == 2 * TINY.multiple
    assert "softmax" in info["output"]["values"] and len(info["labels_from_output"]) == 5
    assert max(info["verification"]["max_abs_difference"]) < 1e-4
    embedded = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(embedded["napari_jointattn"])["classes"] == info["classes"]


def test_onnx_doc_snippet_reproduces_segment_labels(tiny, raw, onnx_file):
    namespace: dict = {}
    exec(doc_blocks()[0], namespace)
    image = raw[:256, :256]
    probs, ids = namespace["segment_onnx"](image, str(onnx_file.path))
    assert np.abs(probs - reference(tiny, image)).max() < 1e-4
    info = json.loads(ex.sidecar_path(onnx_file.path).read_text())
    labels = split_instances(ids > 0, info["postprocess"]["min_distance"], info["postprocess"]["min_size"])
    np.testing.assert_array_equal(labels, segment(image, tiny, device="cpu").labels)


def test_upsample_and_threshold_are_carried(raw, tmp_path):
    """upsample is inside the graph; a calibrated threshold is written down."""
    model = new_model(config=TINY, classes=["background", "vessel"], name="thin", seed=1,
                      normalization={"percentiles": [2.0, 99.0], "per": "image", "upsample": 2},
                      postprocess={"instances": False, "threshold": 0.3})
    result = ex.export_model(model, "torchscript", tmp_path / "thin.pt", sample=raw[:96, :80])
    net = torch.jit.load(str(result.path))
    image = raw[100:150, 40:110]
    x, _ = normalize(image[None], None, (2.0, 99.0))
    with torch.no_grad():
        got = net(torch.from_numpy(x)[None])[0].numpy()
    assert np.abs(got - reference(model, image)).max() < 1e-4  # predict_slice enlarges 2x too
    info = json.loads(ex.sidecar_path(result.path).read_text())
    assert info["normalization"]["upsample"] == 2 and info["normalization"]["upsample_in_graph"]
    assert info["input"]["min_size"] == TINY.multiple
    assert "probability[1] > 0.3" in info["labels_from_output"][3]


def test_torchscript_runs_in_a_fresh_process_without_the_package(tiny, raw, tmp_path):
    result = ex.export_model(tiny, "torchscript", tmp_path / "tiny.pt", sample=raw[SMALL])
    assert result.files == [result.path, ex.sidecar_path(result.path)]
    h, w = 96, 72
    np.save(tmp_path / "image.npy", raw[:h, :w])
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "sys.modules['napari_jointattn'] = None  # importing it would now fail\n"
        + doc_blocks()[1]
        + "\nprobs, info = probabilities_torchscript(np.load('image.npy'), 'tiny.pt')\n"
        "np.save('probs.npy', probs)\n"
        "assert info['classes'] == ['background', 'nucleus']\n"
        "print(sorted(m for m, v in sys.modules.items() if m.startswith('napari') and v is not None))\n"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    for name in ("tiny.pt", "image.npy", "run.py"):
        shutil.move(str(tmp_path / name), work / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-I", "run.py"], cwd=work, capture_output=True, text=True, check=False,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    got = np.load(work / "probs.npy")
    assert np.abs(got - reference(tiny, raw[:h, :w])).max() < 1e-4


@pytest.fixture(scope="module")
def package_export(tiny, raw, tmp_path_factory):
    """The bioimage.io export, and the global states seen changing while it ran."""
    pytest.importorskip("bioimageio.core")
    out = tmp_path_factory.mktemp("bioimageio") / "tiny.zip"
    with watched_global_state() as changed:
        result = ex.export_model(tiny, "bioimageio", out, sample=raw[SMALL])
    return result, changed


@pytest.fixture(scope="module")
def package(package_export):
    return package_export[0]


def test_exports_leave_global_state_alone(tiny, raw, tmp_path, package_export):
    """Segment and live training run in other threads during an export: no export (nor the
    bioimage.io test run inside one) seeds or draws from the global generators or flips
    PyTorch's deterministic switch, not even for a moment."""
    with watched_global_state() as changed:
        ex.export_model(tiny, "torchscript", tmp_path / "tiny.pt", sample=raw[SMALL])
    assert changed == []
    assert package_export[1] == []


def test_bioimageio_package_is_validated_and_test_run(package, tiny):
    import yaml

    # the export itself ran bioimageio.core's validation and test run and refuses to write otherwise
    assert package.checks["bioimageio"] == "passed"
    with zipfile.ZipFile(package.path) as zf:
        names = set(zf.namelist())
        assert {"rdf.yaml", "weights_torchscript.pt", "weights.onnx", "test_input.npy", "test_output.npy",
                "cover.png", "README.md"} <= names
        rdf = yaml.safe_load(zf.read("rdf.yaml"))
        cover = zf.read("cover.png")
        readme = zf.read("README.md").decode()
    assert cover[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(rdf["weights"]) == {"torchscript", "onnx"}  # no pickled state dict
    pre = [p for p in rdf["inputs"][0]["preprocessing"] if p["id"] != "ensure_dtype"]
    assert pre[0]["id"] == "scale_range"
    assert (pre[0]["kwargs"]["min_percentile"], pre[0]["kwargs"]["max_percentile"]) == (1.0, 99.8)
    assert pre[0]["kwargs"]["axes"] == ["channel", "y", "x"]
    assert pre[1] == {"id": "clip", "kwargs": {"min": -10.0, "max": 10.0}}
    assert rdf["cite"][0]["doi"] == "10.1109/ISBI52829.2022.9761624" and rdf["license"] == "BSD-3-Clause"
    assert rdf["authors"]
    carried = rdf["config"]["napari_jointattn"]
    assert carried["classes"] == tiny.classes and carried["postprocess"]["instances"] is True
    assert "split_instances" in readme and "softmax" in readme


def test_a_wrong_bioimageio_package_fails_its_test_run(package, tmp_path):
    """Normalisation percentiles that differ from the model's: valid format, but the test run
    no longer reproduces the test output, so bioimageio.core reports a failure."""
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(package.path) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "rdf.yaml":
                data = data.replace(b"max_percentile: 99.8", b"max_percentile: 60.0")
                assert b"max_percentile: 60.0" in data
            dst.writestr(item, data)
    with watched_global_state() as changed:  # the test run seeds the generators, in its own process
        check = ex.validate_package(broken, weight_format="onnx", stop_early=True)
    assert changed == []
    assert check["format"] in ("passed", "valid-format")
    assert check["status"] == "failed"
    assert any("output" in e.lower() for e in check["errors"]), check["errors"]


def test_bioimageio_doc_snippet(package):
    namespace: dict = {}
    exec(doc_blocks()[2], namespace)
    # the test run seeds the global generators: this process's states are put back; single
    # calls: skip TorchScript's profiling passes
    with kept_global_state(), torch.jit.optimized_execution(False):
        assert namespace["check_package"](str(package.path)) == "passed"


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_bad_exports_fail_clearly_and_leave_nothing(tiny, raw, tmp_path, monkeypatch):
    with pytest.raises(BadInputError, match="unknown export format 'tflite'"):
        ex.export_model(tiny, "tflite", tmp_path / "m.tflite")
    with pytest.raises(BadInputError, match=r"onnx exports are written to a \.onnx file"):
        ex.export_model(tiny, "onnx", tmp_path / "m.pt")
    with pytest.raises(BadInputError, match="does not exist"):
        ex.export_model(tiny, "torchscript", tmp_path / "missing" / "m.pt")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(BadInputError, match="it is a folder"):
        ex.export_model(tiny, "torchscript", tmp_path / "dir.pt")
    with pytest.raises(BadInputError, match="sample must be a 2-D image"):
        ex.export_model(tiny, "torchscript", tmp_path / "m.pt", sample=np.zeros((2, 3, 40, 40)))
    with pytest.raises(BadInputError, match="at least 16 x 16"):
        ex.export_model(tiny, "torchscript", tmp_path / "m.pt", sample=np.zeros((8, 40)))
    with pytest.raises(BadInputError, match="not found"):
        ex.export_model(str(tmp_path / "nothing.safetensors"), "onnx", tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BadInputError, match="pip install onnx onnxruntime"):
        ex.export_model(tiny, "onnx", tmp_path / "m.onnx")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "bioimageio.core", None)
    with pytest.raises(BadInputError, match="needs the package 'bioimageio.core': pip install bioimageio.core"):
        ex.export_model(tiny, "bioimageio", tmp_path / "m.zip")
    monkeypatch.undo()
    # a check that fails (here: a zero tolerance) leaves neither the file nor its sidecar
    monkeypatch.setattr(ex, "TOLERANCE", -1.0)
    with pytest.raises(BadInputError, match="differs from PyTorch"):
        ex.export_model(tiny, "torchscript", tmp_path / "m.pt", sample=raw[SMALL])
    assert _left(tmp_path) == ["dir.pt"]


def test_cli_export_and_no_partial_file_on_failure(tiny, raw, tmp_path, capsys, monkeypatch):
    model_file = save_model(tiny, tmp_path / "tiny.safetensors")
    sample = tmp_path / "sample.tif"
    tifffile.imwrite(sample, raw[SMALL].astype(np.uint16))
    out = tmp_path / "out"
    out.mkdir()
    small = ["--sample", str(sample)]
    assert main(["export", str(model_file), "--format", "onnx", "--out", str(out / "tiny.onnx"), *small]) == 0
    printed = capsys.readouterr().out
    assert "onnx export" in printed and "max abs difference" in printed
    assert _left(out) == ["tiny.onnx", "tiny.onnx.json"]
    assert main(["export", str(model_file), "--format", "onnx", "--out", str(out / "x.pt")]) == 2
    assert "error: onnx exports are written to a .onnx file" in capsys.readouterr().err
    monkeypatch.setattr(ex, "TOLERANCE", -1.0)
    assert main(["export", str(model_file), "--format", "torchscript", "--out", str(out / "t.pt"), *small]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from PyTorch" in err
    assert _left(out) == ["tiny.onnx", "tiny.onnx.json"]


def test_export_help_does_not_import_torch():
    code = ("import sys; from napari_jointattn.cli import main; assert main(['export', '--help']) == 0; "
            "heavy = [m for m in ('torch', 'onnx', 'bioimageio', 'napari') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "bioimageio" in done.stdout and "torchscript" in done.stdout


# ------------------------------------------------------------------ the real preset (slow)
@pytest.mark.slow
def test_nuclei_preset_exports(tmp_path, raw):
    from napari_jointattn.engine.models.model import load_model

    nuclei = load_model("nuclei")
    onnx_result = ex.export_model(nuclei, "onnx", tmp_path / "nuclei.onnx")
    session = ex.onnx_session(onnx_result.path)
    for h, w in SIZES:
        image = raw[:h, :w]
        x, _ = normalize(image[None], None, nuclei.normalization.percentiles)
        got = session.run(["output"], {"input": x[None]})[0][0]
        assert np.abs(got - reference(nuclei, image)).max() < 1e-4, (h, w)
    namespace: dict = {}
    exec(doc_blocks()[0], namespace)
    _, ids = namespace["segment_onnx"](raw[:256, :256], str(onnx_result.path))
    labels = split_instances(ids > 0, 3, 15)
    np.testing.assert_array_equal(labels, segment(raw[:256, :256], nuclei, device="cpu").labels)
    package = ex.export_model(nuclei, "bioimageio", tmp_path / "nuclei.zip")
    assert package.checks["bioimageio"] == "passed"
    namespace = {}
    exec(doc_blocks()[2], namespace)
    assert namespace["check_package"](str(package.path)) == "passed"
