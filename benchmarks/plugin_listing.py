"""What lmms-vg costs lmms-eval's listings: `lmms-eval models` and `lmms-eval tasks list`, with and without lmms-vg.

Each command runs in 3 fresh processes per setting; the median wall time is printed with the ratio.
"Without" is the same interpreter with lmms-vg hidden: its entry point filtered out of
``importlib.metadata`` and its start-up task hook removed, so both settings start the same way.

    python benchmarks/plugin_listing.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

LAUNCHER = """
import importlib.metadata as md, runpy, sys
if {hide!r}:
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__module__ != "lmms_vg_tasks._hook"]
    _entry_points = md.entry_points
    def entry_points(**kw):
        found = _entry_points(**kw)
        found = [ep for group in found.values() for ep in group] if isinstance(found, dict) else found  # every group, flat
        return md.EntryPoints(ep for ep in found if not ep.value.startswith("lmms_vg"))
    md.entry_points = entry_points
sys.argv = ["lmms_eval", *{args!r}]
runpy.run_module("lmms_eval", run_name="__main__")
"""
COMMANDS = {"lmms-eval models": ["models"], "lmms-eval tasks list": ["tasks", "list"]}
MARKERS = {"lmms-eval models": "huatuo_vgrefine", "lmms-eval tasks list": "vgmed_loc"}


def run(args: list[str], hide: bool) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER.format(hide=hide, args=args)], capture_output=True, text=True, env=env, check=True
    )
    return time.perf_counter() - t0, proc.stdout


def main() -> None:
    print(f"{'command':24} {'without (s)':>12} {'with (s)':>10} {'ratio':>7}  lmms-vg listed")
    for name, args in COMMANDS.items():
        times = {}
        for hide in (True, False):
            samples = [run(args, hide) for _ in range(3)]
            times[hide] = statistics.median(t for t, _ in samples)
            listed = MARKERS[name] in samples[-1][1].split()
            if hide and listed:
                raise SystemExit(f"{name}: lmms-vg was not hidden")
        print(f"{name:24} {times[True]:12.2f} {times[False]:10.2f} {times[False] / times[True]:7.2f}  {'yes' if listed else 'NO'}")


if __name__ == "__main__":
    main()
