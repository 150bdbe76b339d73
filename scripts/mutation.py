"""Mutation testing of the core: each module's kill rate, with the tests that cover it.

    .venv/bin/python scripts/mutation.py                 # every core module (tens of minutes on 2 cores)
    .venv/bin/python scripts/mutation.py metrics scoring # some of them (minutes)
    .venv/bin/python scripts/mutation.py passes --sample 200  # a seeded sample of a large module's mutants
    .venv/bin/python scripts/mutation.py passes --sample 200 --seed 1  # another sample (after tests that target the first)

For each module, mutmut (pinned in the lock) changes the code one small step at a time and runs the
test files mapped to it below (only the tests that reach the changed function). A mutant the tests do
not fail on "survives". Survivors that cannot change behaviour (equivalent mutants) are listed, with
why, in ``tests/mutation_equivalents.toml``; they are left out of the rate. Run it before a change to
the core lands; a module under 90% needs the assertions its survivors show missing (``--show`` prints
each survivor's diff). Each module runs in a scratch copy under ``.mutation/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.toml"
TARGET = 90.0
# module -> (its files under lmms_vg/, the test files that exercise it in-process)
MODULES = {
    "metrics": (["metrics.py"], ["test_metrics.py", "test_authors_pipeline.py", "test_grounding.py"]),
    "geometry": (
        ["geometry.py"],
        ["test_geometry.py", "test_padding.py", "test_authors_pipeline.py", "test_grounding.py", "test_conformance.py"],
    ),
    "scoring": (["scoring.py"], ["test_scoring.py", "test_vqa_units.py", "test_medvqa.py", "test_bad_inputs.py"]),
    "vqa_results": (["vqa_results.py"], ["test_vqa_units.py", "test_medvqa.py", "test_scoring.py", "test_bad_inputs.py"]),
    "vgrefine": (
        ["methods/vgrefine.py"],
        [
            "test_vgrefine.py",
            "test_vgrefine_units.py",
            "test_internals.py",
            "test_bad_inputs.py",
            "test_conformance.py",
            "test_models.py",
            "test_robustness.py",
        ],
    ),
    "engine": (["engine.py"], ["test_engine.py", "test_engine_units.py", "test_vgrefine.py", "test_methods.py"]),
    "methods": (
        ["methods/base.py", "methods/pai.py", "methods/adaptvis.py", "methods/vicrop.py"],
        ["test_methods.py", "test_methods_units.py"],
    ),
    "grounding": (
        ["grounding.py"],
        ["test_grounding.py", "test_grounding_units.py", "test_authors_pipeline.py", "test_methods.py", "test_bad_inputs.py"],
    ),
    "passes": (
        ["passes/*.py"],
        ["test_passes_units.py", "test_vgrefine.py", "test_internals.py", "test_grounding.py", "test_methods.py", "test_conformance.py"],
    ),
}
# lines not mutated: an error's or a log line's wording is not behaviour (the bad-input tests check that a message names
# its input; a mutated word in it would survive every test that reads the condition, not the prose)
NOT_MUTATED = [r"^\s*raise [\w.]+(Error|Exception|Unsupported)\(", r"^\s*(logger|log)\.(warning|info|error|debug)\("]


def source_files() -> list[str]:
    """The working tree as git sees it: tracked files and new ones that are not ignored."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def scratch_copy(module: str) -> Path:
    """The checkout copied to ``.mutation/<module>/``, configured for mutmut; ``lmms_vg_models`` and ``lmms_vg_tasks``
    resolve to the copy's ``models/`` and ``tasks/`` (through ``.shim/`` on PYTHONPATH), not to the installed checkout."""
    folder = WORK / module
    shutil.rmtree(folder, ignore_errors=True)
    for name in source_files():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    shim = folder / ".shim"
    shim.mkdir()
    (shim / "lmms_vg_models").symlink_to(folder / "mutants" / "models")
    (shim / "lmms_vg_tasks").symlink_to(folder / "mutants" / "tasks")
    files, tests = MODULES[module]
    config = {
        "source_paths": ["lmms_vg"],
        "only_mutate": [f"lmms_vg/{f}" for f in files],
        "also_copy": ["models", "tasks"],
        "do_not_mutate_patterns": NOT_MUTATED,
        "pytest_add_cli_args_test_selection": [f"tests/{t}" for t in tests],
        "pytest_add_cli_args": ["-p", "no:randomly", "-q"],
        "process_isolation": "forkserver",  # torch is not fork-safe after use
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    with open(folder / "pyproject.toml", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    return folder


def run_module(module: str, children: int, again: bool = True, sample: int = 0, seed: int = 0) -> dict[str, str]:
    """mutmut on one module: mutant name -> status (killed, survived, timeout, no tests, ...); ``again`` False reads the
    last run's results in ``.mutation/<module>/`` without running anything. ``sample``: run that many of its mutants,
    drawn with ``seed`` (the others stay "not checked" and out of the rate)."""
    folder = scratch_copy(module) if again else WORK / module
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LMMS_VG_MUTATION": "1",  # tests that run lmms-eval in a subprocess skip: mutants live in this process only
        "PYTHONPATH": os.pathsep.join([str(folder / ".shim"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    log = WORK / f"{module}.log"
    run = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children)]
    with open(log, "w" if again else "a") as fh:
        if again and sample:  # mutants generated and the tests' coverage collected, then nothing matches the name
            subprocess.run([*run, "lmms_vg.no_such_mutant"], cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
            names = sorted(statuses(folder, env))
            run += random.Random(seed).sample(names, min(sample, len(names)))
        subprocess.run(
            run if again else [sys.executable, "-c", "pass"], cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False
        )
    found = statuses(folder, env)
    if not found:
        raise SystemExit(f"{module}: mutmut gave no results; its log: {log}")
    return found


def statuses(folder: Path, env: dict) -> dict[str, str]:
    """Each mutant's status in the last run in ``folder``."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=folder, env=env, capture_output=True, text=True, check=False
    )
    found = {}
    for line in out.stdout.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith("lmms_vg."):
            found[name] = status
    return found


def diff_of(module: str, mutant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=WORK / module, capture_output=True, text=True, check=False)
    return "\n".join(line for line in out.stdout.splitlines() if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))


def equivalents() -> dict[str, dict]:
    """The survivors judged equivalent: mutant name -> {"change": its diff lines, "reason": why it cannot change behaviour}."""
    if not EQUIVALENTS.exists():
        return {}
    return {entry["mutant"]: entry for entry in tomllib.loads(EQUIVALENTS.read_text()).get("equivalent", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--show", action="store_true", help="print each survivor's diff")
    parser.add_argument("--no-run", action="store_true", help="report the last run's results (in .mutation/) without running")
    parser.add_argument("--sample", type=int, default=0, help="run N mutants of each module, drawn with --seed (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed: another seed draws other mutants (default 0)")
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown modules {unknown}; the core: {', '.join(MODULES)}")
    WORK.mkdir(exist_ok=True)
    known = equivalents()
    rows, summary = [], {}
    for module in args.modules or list(MODULES):
        t0 = time.time()
        found = run_module(module, args.children, again=not args.no_run, sample=args.sample, seed=args.seed)
        survivors = sorted(n for n, s in found.items() if s == "survived")
        equivalent = [n for n in survivors if n in known]
        for name in equivalent:  # an entry whose mutant is now a different change is stale: it counts as a survivor
            if diff_of(module, name) != known[name]["change"].strip():
                print(f"  {name}: tests/mutation_equivalents.toml describes another change; re-check it")
                equivalent.remove(name)
        killed = sum(1 for s in found.values() if s in ("killed", "timeout"))
        judged = len(found) - len(equivalent) - sum(1 for s in found.values() if s in ("skipped", "not checked"))
        rate = 100.0 * killed / judged if judged else float("nan")
        checked = sum(1 for s in found.values() if s not in ("skipped", "not checked"))
        rows.append((module, len(found), checked, killed, len(survivors) - len(equivalent), len(equivalent), rate, time.time() - t0))
        summary[module] = {
            "mutants": len(found),
            "checked": checked,
            "killed": killed,
            "survivors": [n for n in survivors if n not in equivalent],
            "rate": rate,
        }
        if args.show:
            for name in survivors:
                if name not in equivalent:
                    print(f"\n{name}\n{diff_of(module, name)}")
    previous = json.loads((WORK / "summary.json").read_text()) if (WORK / "summary.json").exists() else {}
    (WORK / "summary.json").write_text(json.dumps(previous | summary, indent=1))
    print(f"\n{'module':12} {'mutants':>8} {'checked':>8} {'killed':>7} {'survived':>9} {'equivalent':>11} {'kill rate':>10} {'time':>7}")
    for module, total, checked, killed, survived, equivalent, rate, seconds in rows:
        flag = ("" if rate >= TARGET else f"  < {TARGET:.0f}%") + ("  (a sample)" if checked < total else "")
        print(f"{module:12} {total:8} {checked:8} {killed:7} {survived:9} {equivalent:11} {rate:9.1f}% {seconds:6.0f}s{flag}")
    return 0 if all(r[6] >= TARGET for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
