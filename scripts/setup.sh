#!/usr/bin/env bash
# Set up lmms-vg in a virtual environment: torch, lmms-eval (without torchvision), lmms-vg.
#   bash scripts/setup.sh            # into ./.venv
#   VENV=/tmp/env bash scripts/setup.sh
# TORCH_SPEC picks the torch build (default torch==2.13.0: the CPU wheel where one is provided
# locally, the CUDA build from the registry on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP_QUIET=${PIP_QUIET:--q}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip() { "$PY" -m pip "$PIP_QUIET" --disable-pip-version-check "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip install "$TORCH_SPEC"
# lmms-eval's requirements name torchvision and timm; the registry's torchvision need not match
# the torch above and then breaks `import transformers`. Nothing in lmms-vg needs them.
pip install --no-deps "lmms-eval>=0.7.3,<0.8"
pip install -r requirements-runtime.txt
pip install --no-deps -e .
# An editable install leaves out the wheel's lmms_vg_tasks.pth (the hook that shows lmms-vg's tasks in
# listings that load no model plugin, e.g. `lmms-eval tasks list`): put it beside the packages.
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp tasks/lmms_vg_tasks.pth "$SITE/lmms_vg_tasks.pth"
if ! "$PY" -c "import torchvision" 2>/dev/null && "$PY" -m pip show torchvision >/dev/null 2>&1; then
  echo "setup: removing a torchvision that does not match the installed torch" >&2
  "$PY" -m pip uninstall -q -y torchvision
fi
HF_HUB_OFFLINE=1 "$PY" - <<'PY'
import transformers, lmms_eval, lmms_vg  # noqa: F401  (fails loudly if the environment is broken)
from lmms_eval.models import MODEL_REGISTRY_V2
assert "huatuo" in MODEL_REGISTRY_V2.list_model_names(), "lmms-vg's models are not registered with lmms-eval"
print(f"setup: ok (torch {__import__('torch').__version__}, transformers {transformers.__version__})")
PY
