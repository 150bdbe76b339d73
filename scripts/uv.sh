#!/usr/bin/env bash
# uv at the version the project's locks are made with, installed once into .tools/ (or $TOOLS): `bash scripts/uv.sh pip compile ...`.
set -euo pipefail
UV_VERSION=0.13.9
TOOLS=${TOOLS:-"$(cd "$(dirname "$0")/.." && pwd)/.tools"}
if ! { [ -x "$TOOLS/bin/uv" ] && "$TOOLS/bin/uv" --version | grep -q " $UV_VERSION\b"; }; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" 2> >(grep -v "^WARNING: Location 'file:" >&2)
fi
exec "$TOOLS/bin/uv" "$@"
