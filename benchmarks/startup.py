"""What lmms-vg's start-up file (``lmms_vg_tasks.pth``) costs every Python process of its environment.

Runs ``python -X importtime -c pass`` in fresh processes and reads, per run, the cumulative import
time of what the file imports (``lmms_vg_tasks._hook`` with its package) and of ``site`` as a whole.
Prints the medians: the file's share, ``site`` with lmms-vg, and ``site`` without it (the same runs
less the file's share: the file adds nothing else). In an editable install, setuptools' editable
finder (what any editable project costs, absent from a wheel install) is shown apart.

    .venv/bin/python benchmarks/startup.py [--runs 21]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys

LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def one_run() -> dict[str, int]:
    """Cumulative microseconds per top-level import of one interpreter start (site's children included)."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True).stderr
    found: dict[str, int] = {}
    for self_us, cumulative, indent, name in LINE.findall(err):
        if len(indent) <= 3:  # site and what the .pth files import directly
            found[name] = found.get(name, 0) + int(cumulative)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    one_run()  # compiled bytecode in place first
    runs = [one_run() for _ in range(args.runs)]

    def median(name: str) -> float:
        return statistics.median(r.get(name, 0) for r in runs) / 1000

    ours = statistics.median(r.get("lmms_vg_tasks._hook", 0) + r.get("lmms_vg_tasks", 0) for r in runs) / 1000
    site = median("site")
    editable = statistics.median(sum(v for k, v in r.items() if k.startswith("__editable__")) for r in runs) / 1000
    if not any("lmms_vg_tasks._hook" in r for r in runs):
        raise SystemExit("lmms_vg_tasks.pth did not run: is lmms-vg installed in this environment (scripts/setup.sh)?")
    print(f"interpreter start-up, median of {args.runs} runs of `python -X importtime -c pass` ({sys.executable})")
    print(f"  lmms_vg_tasks.pth (the task hook):   {ours:6.2f} ms   target < 2 ms")
    print(f"  site, with lmms-vg:                  {site:6.2f} ms")
    print(f"  site, without lmms-vg's file:        {site - ours:6.2f} ms   ({ours / (site - ours):.1%} more with it)")
    if editable:
        print(f"  of which setuptools' editable finder: {editable:5.2f} ms   (any editable install; none in a wheel install)")


if __name__ == "__main__":
    main()
