"""The newest-versions check: a throwaway environment with the newest versions pyproject.toml allows, the core suite on it.

Run it before a change lands (and whenever the registry may have moved):

    python3 scripts/check_versions.py              # the newest versions the ranges allow
    python3 scripts/check_versions.py --lowest     # the oldest (each direct dependency at its lower bound)
    python3 scripts/check_versions.py --uncapped   # the newest releases, upper bounds lifted: may a cap be raised?

It resolves with uv (scripts/uv.sh) from pyproject.toml, lmms-eval's requirements less
requirements/overrides.txt and torch's CPU build, installs into a temporary folder, runs the core
suite (engine, grounding with one real lmms-eval CLI run, VGRefine, methods, the internals' checks,
packaging), and prints each dependency's version: locked, installed here, newest on the registry.
The exit status is the suite's. When a new release breaks it, fix the code or cap the range the same
day (README "Install" says how), then refresh the lock (scripts/lock.sh).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_TESTS = [
    "tests/test_engine.py",
    "tests/test_grounding.py",
    "tests/test_vgrefine.py",
    "tests/test_methods.py",
    "tests/test_internals.py",
    "tests/test_packaging.py",
]
ALSO_SHOWN = ("filelock", "huggingface-hub", "tokenizers")  # not ours to bound, but each has broken a run before


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def direct_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["test"]]


def uncapped(requirement: str) -> str:
    """The requirement with its upper bounds removed (``<``, ``<=``; ``==`` becomes ``>=``)."""
    head = re.match(r"\s*[A-Za-z0-9_.\-\[\]]+", requirement).group(0)
    specs = [s.strip() for s in requirement[len(head) :].split(",") if s.strip()]
    return head + ",".join(">=" + s[2:] if s.startswith("==") else s for s in specs if not s.startswith("<"))


def compile_requirements(requirements: list[str], out: Path, options: list[str], torch_cpu: bool = True) -> None:
    """uv's resolution of ``requirements`` (lmms-eval's own less the overrides) for CPython 3.11, written to ``out``."""
    source = out.with_suffix(".in")
    source.write_text("\n".join(requirements) + "\n")
    torch = ["-c", str(ROOT / "requirements" / "torch-cpu.txt"), "--find-links", torch_links()] if torch_cpu else []
    override = ["--override", str(ROOT / "requirements" / "overrides.txt")]
    run(
        ["bash", str(ROOT / "scripts" / "uv.sh"), "pip", "compile", str(source), "-o", str(out), "--python-version", "3.11"]
        + override
        + torch
        + ["--no-header", "--quiet", *options]
    )


def pins(path: Path) -> dict[str, str]:
    return {
        name_of(line): line.split("==", 1)[1].split()[0] for line in path.read_text().splitlines() if "==" in line and line[0].isalnum()
    }


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def torch_links() -> str:
    wheels = Path("/opt/wheels")
    return str(wheels) if any(wheels.glob("torch-*+cpu-*.whl")) else "https://download.pytorch.org/whl/torch/"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lowest", action="store_true", help="each direct dependency at the lowest version its range allows")
    mode.add_argument("--uncapped", action="store_true", help="upper bounds lifted: the newest releases")
    parser.add_argument("--keep", metavar="DIR", help="build the environment here and keep it (default: a temporary folder)")
    parser.add_argument("--tests", nargs="*", default=CORE_TESTS, help="test files to run (default: the core suite)")
    args = parser.parse_args()
    label = "lowest" if args.lowest else "uncapped" if args.uncapped else "newest allowed"

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lmms_vg_versions_"))
    work.mkdir(parents=True, exist_ok=True)
    direct = direct_requirements()
    wanted = [uncapped(r) if args.uncapped else r for r in direct]
    uv = ["bash", str(ROOT / "scripts" / "uv.sh")]
    resolved = work / "resolved.txt"
    started = time.time()
    compile_requirements(wanted, resolved, ["--resolution", "lowest-direct"] if args.lowest else [])
    newest = work / "newest.txt"  # what the registry has for CPython 3.11, no upper bound, any torch build
    compile_requirements([uncapped(r) for r in direct], newest, [], torch_cpu=False)
    venv = work / "venv"
    if venv.exists():
        shutil.rmtree(venv)
    run([sys.executable, "-m", "venv", str(venv)])  # with pip, as the set-up's (a test builds a wheel with it)
    python = str(venv / "bin" / "python")
    run([*uv, "pip", "sync", "--quiet", "--python", python, "--find-links", torch_links(), str(resolved)])
    run([*uv, "pip", "install", "--quiet", "--python", python, "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    suite = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:randomly", *args.tests], check=False, cwd=ROOT, env=env, capture_output=True, text=True
    )
    summary = (suite.stdout.strip().splitlines() or ["(no output)"])[-1]
    if suite.returncode != 0:
        print(suite.stdout[-6000:], suite.stderr[-3000:], sep="\n")

    installed, locked, registry = pins(resolved), pins(ROOT / "requirements" / "lock-cpu.txt"), pins(newest)
    ranges = {name_of(r): r[len(name_of(r)) :] for r in direct}
    names = list(ranges) + [n for n in ALSO_SHOWN if n not in ranges]
    print(f"\nnewest-versions check ({label}), {time.strftime('%Y-%m-%d')}, {time.time() - started:.0f} s")
    print(f"{'package':16} {'range':30} {'locked':>12} {'tested here':>12} {'registry':>12}  (registry: the newest for CPython 3.11)")
    for name in names:
        here, newest = installed.get(name, "-"), registry.get(name, "-")
        capped = label == "newest allowed" and name in ranges and newest.split("+")[0] != here.split("+")[0]
        print(
            f"{name:16} {ranges.get(name, '(transitive)'):30} {locked.get(name, '-'):>12} {here:>12} {newest:>12}"
            + ("  <- newer release outside the range" if capped else "")
        )
    print(f"\ncore suite: {summary}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return suite.returncode


if __name__ == "__main__":
    sys.exit(main())
