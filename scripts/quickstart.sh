#!/usr/bin/env bash
# The two Quick-start commands of the README:
#   bash scripts/quickstart.sh demo   launch napari with the Segment dock on a sample
#                                     (no display: run under Xvfb, save a screenshot)
#   bash scripts/quickstart.sh test   run the test suite under a virtual X server
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
bash scripts/setup.sh
# napari runs on any Qt binding; we install and pin PyQt6 (its PyQt5 support is deprecated)
export QT_API="${QT_API:-pyqt6}"
cmd="${1:-demo}"
shift || true
case "$cmd" in
    demo)
        if [ -n "${DISPLAY:-}" ]; then
            exec "$PYTHON" scripts/demo.py "$@"
        else
            exec xvfb-run -a -s "-screen 0 1600x1000x24" "$PYTHON" scripts/demo.py \
                --screenshot napari-jointattn-demo.png "$@"
        fi
        ;;
    test)
        # pytest-xvfb starts a virtual X server for the napari canvas.
        exec "$PYTHON" -m pytest "$@"
        ;;
    *)
        echo "usage: bash scripts/quickstart.sh {demo|test} [args]" >&2
        exit 2
        ;;
esac
