#!/usr/bin/env bash
# Creates .venv and installs planer with its export, test, dev and bench extras.
# torch is installed first and pinned: 2.13.0 has a CPU build pip can take offline, while an
# unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# compat: a plain .pth with the repository root, so planer/ and its symlinked subpackages are
# ordinary files to mypy and IDEs (the default editable mode installs an import hook instead).
.venv/bin/python -m pip install --quiet -e ".[export,test,dev,bench]" --config-settings editable_mode=compat
