#!/usr/bin/env bash
# Label Studio in a virtualenv of its own: it pins many packages (Django, pydantic, ...) that must not
# meet the project's. Used by README's labeling steps, tests/test_label_studio.py and
# docs/make_label_studio_screenshot.py.
#
#   scripts/label_studio_venv.sh [VENV]      # default: .venv-labelstudio next to this repository's setup.cfg
#
# Prints the venv's path. Idempotent: an existing venv with label-studio in it is reused as it is.
set -euo pipefail
LABEL_STUDIO_VERSION="${LABEL_STUDIO_VERSION:-1.23.2}"
venv="${1:-$(cd "$(dirname "$0")/.." && pwd)/.venv-labelstudio}"
if [ ! -x "$venv/bin/label-studio" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "label-studio==$LABEL_STUDIO_VERSION"
fi
echo "$venv"
