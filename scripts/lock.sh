#!/usr/bin/env bash
# Refresh the locks that scripts/setup.sh installs: exact versions with hashes for everything the
# set-up puts in the environment, from pyproject.toml's ranges (and its `test` and `dev` extras), lmms-eval's
# own requirements less requirements/overrides.txt, and one torch build per lock:
#   requirements/lock-cpu.txt   torch's CPU build (requirements/torch-cpu.txt)
#   requirements/lock-cuda.txt  the registry's CUDA build (requirements/torch-cuda.txt)
# For CPython 3.11 on Linux x86_64 (manylinux_2_28). Then run scripts/check_versions.sh and the suite.
#   bash scripts/lock.sh                                # after a change to the ranges: the other pins stay
#   bash scripts/lock.sh --upgrade                      # every package to the newest its range allows
#   bash scripts/lock.sh --upgrade-package transformers  # one package
# TORCH_CPU_LINKS: where the CPU build of torch is found (a folder of wheels or a find-links page).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${TORCH_CPU_LINKS:-}" ]; then
  if ls /opt/wheels/torch-*+cpu-* >/dev/null 2>&1; then TORCH_CPU_LINKS=/opt/wheels; else TORCH_CPU_LINKS=https://download.pytorch.org/whl/torch/; fi
fi
compile() {
  bash scripts/uv.sh pip compile pyproject.toml --extra test --extra dev --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --override requirements/overrides.txt --custom-compile-command "bash scripts/lock.sh" \
    --quiet "$@"
}
compile -c requirements/torch-cpu.txt --find-links "$TORCH_CPU_LINKS" -o requirements/lock-cpu.txt "$@"
compile -c requirements/torch-cuda.txt -o requirements/lock-cuda.txt "$@"
echo "lock: requirements/lock-cpu.txt ($(grep -c '^[a-z]' requirements/lock-cpu.txt) packages), requirements/lock-cuda.txt ($(grep -c '^[a-z]' requirements/lock-cuda.txt) packages)"
