"""Packaging: napari finds the manifest from this install and from a built wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_npe2_lists_the_widgets_of_this_install():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-jointattn")
    widgets = [w.display_name for w in manifest.contributions.widgets]
    assert "Segment" in widgets
    # every command points at an importable object
    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        assert hasattr(__import__(module, fromlist=[attr]), attr), cmd.python_name


QT = ("qtpy", "PyQt6", "PyQt5", "PySide6", "PySide2")


@pytest.mark.parametrize("layer,banned", [
    ("engine", ("napari", "magicgui", *QT)),  # headless: every engine module, no napari at all
    ("controllers", QT),  # the docks' workflows run on a ViewerModel without Qt
], ids=["engine: no napari, no Qt", "controllers: no Qt"])
def test_layers_import_nothing_from_the_layers_above(layer, banned):
    code = (
        "import importlib, pkgutil, sys\n"
        f"import napari_jointattn.{layer} as pkg\n"
        "names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
        "assert len(names) > 3, names\n"
        "for name in names: importlib.import_module(name)\n"
        "import napari_jointattn.cli\n"
        f"bad = sorted({{m for m in sys.modules if m.split('.')[0] in {banned!r}}})\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


@pytest.mark.slow  # builds a wheel: about a minute
def test_wheel_contains_manifest_and_entry_point(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("napari_jointattn-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "napari_jointattn/napari.yaml" in names
        manifest_text = zf.read("napari_jointattn/napari.yaml").decode()
        (ep,) = [n for n in names if n.endswith("entry_points.txt")]
        entry_points = zf.read(ep).decode()
    assert "[napari.manifest]" in entry_points
    assert "napari-jointattn = napari_jointattn:napari.yaml" in entry_points
    # the packaged manifest is the top-level one, and npe2 accepts it
    assert manifest_text == (ROOT / "napari.yaml").read_text()
    from npe2 import PluginManifest

    (tmp_path / "napari.yaml").write_text(manifest_text)
    manifest = PluginManifest.from_file(tmp_path / "napari.yaml")
    assert "Segment" in [w.display_name for w in manifest.contributions.widgets]


def test_console_script_help():
    import shutil

    exe = shutil.which("napari-jointattn")
    if exe is None:
        pytest.skip("console script not on PATH")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    assert "segment" in out.stdout and "evaluate" in out.stdout


def test_docks_stay_thin():
    """The Qt docks only show and start things: no file of widgets/ grows past 450 lines."""
    widgets = Path(__file__).resolve().parent.parent / "src" / "napari_jointattn" / "widgets"
    sizes = {p.name: len(p.read_text().splitlines()) for p in widgets.glob("*.py")}
    assert len(sizes) >= 5 and max(sizes.values()) <= 450, sizes
