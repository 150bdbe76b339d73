#!/usr/bin/env bash
# Set up lmms-vg in a virtual environment from the lock: exact versions, checked against their hashes.
#   bash scripts/setup.sh                  # into ./.venv
#   VENV=/tmp/env bash scripts/setup.sh
#   LOCK=cuda bash scripts/setup.sh        # which lock: cpu (torch's CPU build) or cuda; default: cuda where nvidia-smi sees a GPU
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup.sh   # where the CPU build of torch is not on this machine
# The locks (requirements/lock-*.txt) are for CPython 3.11 on Linux x86_64; scripts/lock.sh refreshes them.
# Anything else: README "Install" (your own environment, from the ranges in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ -z "${LOCK:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then LOCK=cuda; else LOCK=cpu; fi
fi
LOCKFILE="requirements/lock-$LOCK.txt"
[ -f "$LOCKFILE" ] || { echo "setup: no lock $LOCKFILE: LOCK is cpu or cuda" >&2; exit 2; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -c 'import sys, platform; sys.exit(sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64")' || {
  echo "setup: the locks are for CPython 3.11 on x86_64 Linux; $VENV has $("$PY" -V) on $(uname -m). See README 'Install' for your own environment." >&2
  exit 2
}
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }
extra=()
[ -z "${TORCH_INDEX:-}" ] || extra=(--extra-index-url "$TORCH_INDEX")

locked() {  # pip install from the lock, quietly; this machine's pip configuration may name local indexes that lack a package: not news
  pip install -q --require-hashes --no-deps "${extra[@]}" "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2)
}
echo "setup: installing $LOCKFILE into $VENV"
# The locked setuptools first: the few packages published as source only are built with it, not with
# whatever setuptools the registry serves that day (--no-build-isolation below).
awk '/^setuptools==/ {on = 1; print; next} on && /^ / {print; next} {on = 0}' "$LOCKFILE" > "$VENV/setuptools.lock"
# --no-deps: the lock holds every package (lmms-eval's requirements less torchvision and timm), so
# pip resolves nothing and installs exactly these versions, each checked against its hashes.
if ! locked -r "$VENV/setuptools.lock" || ! locked --no-build-isolation -r "$LOCKFILE"; then
  echo "setup: installing the lock failed (above). If torch's CPU build was not found, set TORCH_INDEX=https://download.pytorch.org/whl/cpu" >&2
  exit 1
fi
# lmms-vg itself, editable, built with the locked setuptools (no unpinned build environment)
pip install -q --no-deps --no-build-isolation -e .

# lmms-eval asks for torchvision and timm; they are left out on purpose (requirements/overrides.txt says why)
problems=$(pip check 2>&1 | grep -v -E "^lmms-eval [0-9.]+ requires (torchvision|timm)\b" | grep -v "^No broken requirements" || true)
if [ -n "$problems" ]; then
  echo "setup: the environment does not hold together:" >&2
  echo "$problems" >&2
  exit 1
fi
echo "setup: lmms-eval's torchvision and timm left out on purpose (requirements/overrides.txt); everything else as locked"
HF_HUB_OFFLINE=1 "$PY" - <<'PY'
import transformers, lmms_eval, lmms_vg  # noqa: F401  (fails loudly if the environment is broken)
from lmms_eval.models import MODEL_REGISTRY_V2
assert "huatuo" in MODEL_REGISTRY_V2.list_model_names(), "lmms-vg's models are not registered with lmms-eval"
print(f"setup: ok (torch {__import__('torch').__version__}, transformers {transformers.__version__})")
PY
