#!/usr/bin/env bash
# Create a side-by-side virtual environment with the bioimage.io stack that ilastik ships today
# (tiktorch 26.5 pins bioimageio.core==0.10.2 -> bioimageio.spec==0.5.9.1, pydantic<2.12).
#
# tests/test_bmz_export.py::test_legacy_stack_reads_package runs `bioimageio test` in this environment to
# prove that packages written in legacy mode (the default) are read by ilastik's stack. The test is
# skipped when the environment is absent.
#
# Usage: bash scripts/legacy_env.sh [VENV_DIR]        (default: $TILENORM_LEGACY_VENV or /tmp/tilenorm-legacy-venv)
set -euo pipefail

VENV="${1:-${TILENORM_LEGACY_VENV:-/tmp/tilenorm-legacy-venv}}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ -x "$VENV/bin/bioimageio" ] && "$VENV/bin/python" -c \
    "import bioimageio.core as c, bioimageio.spec as s; assert c.__version__ == '0.10.2' and s.__version__ == '0.5.9.1'" \
    2>/dev/null; then
    echo "legacy environment already present: $VENV"
    exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch: the CPU wheel from pip's find-links (/opt/wheels here); elsewhere PyPI's default build.
"$VENV/bin/python" -m pip install --quiet \
    "torch==2.13.0" \
    "bioimageio.core==0.10.2" \
    "bioimageio.spec==0.5.9.1" \
    "pydantic<2.12"
"$VENV/bin/python" -c "import bioimageio.core as c, bioimageio.spec as s, pydantic, torch; \
print('legacy environment ready:', 'core', c.__version__, 'spec', s.__version__, 'pydantic', pydantic.VERSION, 'torch', torch.__version__)"
