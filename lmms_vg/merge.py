"""``lmms-vg merge``: lmms-eval output folders of one run's shards (``--offset``/``--limit`` slices, Slurm array tasks,
separate machines) joined into one results folder, each task's results rebuilt from the per-sample logs.

The shards must be one run: the same model, checkpoint, method and settings (their run record), the same
item set and generation settings; their items may not overlap and, together, must cover every item of
each task. Each difference is an error that names it and the two shards. The aggregates are computed
by the task's own aggregation functions (the ones lmms-eval called) over the joined logs, so the merged
folder holds what one unsharded run would have written, and ``report``, ``check`` and ``browse`` read it
like any other.
"""

from __future__ import annotations

import importlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from . import keys, writing

FUNCTION = re.compile(r"<function (\w+) at ")
STDERR_SUFFIXES = ("_stderr", "_stderr_clt", "_stderr_clustered")  # lmms-eval writes these as "N/A" for our metrics


class MergeError(ValueError):
    """Shards that cannot be joined as given; the message names what differs and where."""


@dataclass
class Shard:
    path: Path  # its results file
    data: dict

    def samples(self, task: str) -> list[dict]:
        found = self.path.parent / self.path.name.replace("_results.json", f"_samples_{task}.jsonl")
        if not found.exists():
            raise MergeError(f"{self.path}: no per-sample log for {task} ({found.name}); rerun the shard with --log_samples")
        return [json.loads(line) for line in found.read_text().splitlines() if line.strip()]

    def tasks(self) -> list[str]:
        """The tasks this shard ran items of (a slice past a task's end runs none of it)."""
        groups = {g for g, members in (self.data.get("group_subtasks") or {}).items() if members}
        ran = {t: n.get("effective", 1) for t, n in (self.data.get("n-samples") or {}).items()}
        return [t for t in self.data.get("results", {}) if t not in groups and ran.get(t, 1) > 0]

    def run(self) -> dict:
        """The run record the shard's lmms-vg tasks carry (its model id as lmms-eval named it, for other tasks)."""
        for values in self.data.get("results", {}).values():
            record = (values.get(keys.key(keys.SAMPLES)) or {}) if isinstance(values, dict) else {}
            if isinstance(record, dict) and isinstance(record.get("run"), dict):
                return record["run"]
        return {"model": self.data.get("config", {}).get("model")}

    def settings(self, task: str) -> dict:
        """What must be the same in every shard of a run, for one task."""
        counts = self.data["results"][task].get(keys.key(keys.SAMPLES)) or {}
        config = self.data.get("configs", {}).get(task, {})
        return {
            "run (model, checkpoint, method and its settings)": self.run(),
            "item set": counts.get("item_set") if isinstance(counts, dict) else None,
            "the task's generation settings": config.get("generation_kwargs"),
            "--gen_kwargs": self.data.get("config", {}).get("gen_kwargs"),
            "the task's size": (self.data.get("n-samples") or {}).get(task, {}).get("original"),
        }


def find_shards(folders: list[str | Path]) -> list[Shard]:
    missing = [str(f) for f in folders if not Path(f).exists()]
    if missing:
        raise MergeError(f"shard folder(s) not found: {', '.join(missing)}")
    shards = []
    for path in sorted(p for f in folders for p in Path(f).rglob("*_results.json")):
        try:
            shards.append(Shard(path, json.loads(path.read_text())))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MergeError(f"{path} cannot be read ({type(err).__name__}: {err}); every shard's results are needed") from err
    if not shards:
        raise MergeError(f"no lmms-eval results (*_results.json) under {', '.join(map(str, folders))}")
    return shards


def task_modules(task: str) -> list:
    """The ``utils`` modules lmms-eval resolved the task's functions in: beside its YAML, then beside each file it includes
    (a ``!function`` is found beside the file that names it)."""
    import lmms_vg_tasks

    root = Path(lmms_vg_tasks.__file__).parent
    found = next(
        (p for p in sorted(root.rglob("*.yaml")) if re.search(rf"^task:\s*{re.escape(task)}\s*$", p.read_text(), re.MULTILINE)), None
    )
    if found is None:
        raise MergeError(f"{task} is not one of lmms-vg's tasks: merge rebuilds lmms-vg's own tasks' results")
    folders, path = [], found
    while path is not None:
        folders.append(path.parent.resolve())
        include = re.search(r"^include:\s*(\S+)", path.read_text(), re.MULTILINE)
        path = (path.parent / include.group(1)) if include else None
    names = list(dict.fromkeys(folder.name for folder in folders))
    return [importlib.import_module(f"lmms_vg_tasks.{name}.utils") for name in names]


def aggregation(task: str, config: dict, metric: str):
    """The aggregation function lmms-eval called for ``metric`` of ``task``: named in the results file's task config, taken
    from the task's own ``utils`` modules."""
    for entry in config.get("metric_list", []):
        found = FUNCTION.match(str(entry.get("aggregation", ""))) if entry.get("metric") == metric else None
        for module in task_modules(task) if found else []:
            if hasattr(module, found.group(1)):
                return getattr(module, found.group(1))
    raise MergeError(f"{task}: no aggregation named for its metric {metric!r} in the shard's task config")


def join_task(task: str, shards: list[Shard]) -> tuple[dict, list[dict], int]:
    """One task across its shards: (its results entry, the joined sample lines by doc id, the task's size)."""
    first = shards[0]
    expected = first.settings(task)
    for shard in shards[1:]:
        found = shard.settings(task)
        for name, value in expected.items():
            if found[name] != value:
                raise MergeError(f"{task}: the shards differ in {name}: {first.path} has {value!r}, {shard.path} has {found[name]!r}")
    lines, owner = [], {}
    for shard in shards:
        for line in shard.samples(task):
            doc = line["doc_id"]
            if doc in owner:
                raise MergeError(f"{task}: doc {doc} is in two shards ({owner[doc]} and {shard.path}); shards must not overlap")
            owner[doc] = shard.path
            lines.append(line)
    size = expected["the task's size"]
    absent = sorted(set(range(size)) - set(owner)) if isinstance(size, int) else []
    if absent:
        raise MergeError(f"{task}: {len(absent)} of its {size} items are in no shard ({_ranges(absent)}); run the missing slice")
    lines.sort(key=lambda line: line["doc_id"])
    config = first.data.get("configs", {}).get(task, {})
    entry = {"alias": first.data["results"][task].get("alias", task)}
    for metric in [m["metric"] for m in config.get("metric_list", [])]:
        entry[keys.key(metric)] = aggregation(task, config, metric)([line[metric] for line in lines])
        entry.update({keys.key(metric + suffix): "N/A" for suffix in STDERR_SUFFIXES})
    return entry, lines, size if isinstance(size, int) else len(lines)


def _ranges(values: list[int]) -> str:
    spans, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans[:8]) + (" ..." if len(spans) > 8 else "")


def merge(folders: list[str | Path], out: str | Path, force: bool = False) -> list[Path]:
    """Join the shards under ``folders`` into ``out`` (one folder per run, lmms-eval's layout); the files written."""
    shards = find_shards(folders)
    runs: dict[str, list[Shard]] = {}
    for shard in shards:  # one run per model, checkpoint and method; its shards must then agree on everything else
        run = shard.run()
        runs.setdefault(json.dumps([run.get("model"), run.get("checkpoint"), run.get("method")]), []).append(shard)
    written = []
    with writing.staged(Path(out), force, what="lmms-vg merge") as stage:
        for members in runs.values():
            written += _write_run(members, stage)
        return writing.in_place(written, stage, Path(out))


def _write_run(shards: list[Shard], stage: Path) -> list[Path]:
    first = shards[0]
    tasks = list(dict.fromkeys(t for s in shards for t in s.tasks()))
    counts = Counter(t for s in shards for t in s.tasks())
    results, samples, sizes = {}, {}, {}
    for task in tasks:
        results[task], samples[task], sizes[task] = join_task(task, [s for s in shards if task in s.tasks()])
    data = dict(first.data)
    data["results"] = results | _groups(first, results)
    data["n-samples"] = {t: {"original": sizes[t], "effective": len(samples[t])} for t in tasks}
    data["config"] = {**first.data.get("config", {}), "limit": None, "offset": 0}
    data["merged_from"] = {t: [str(s.path) for s in shards if t in s.tasks()] for t in tasks}
    data["shards"] = max(counts.values())
    folder = stage / first.path.parent.name
    folder.mkdir(parents=True, exist_ok=True)
    stamp = first.path.name.removesuffix("_results.json")
    target = folder / f"{stamp}_results.json"
    target.write_text(json.dumps(data, indent=2, default=str))
    paths = [target]
    for task, lines in samples.items():
        path = folder / f"{stamp}_samples_{task}.jsonl"
        path.write_text("".join(json.dumps(line, default=str) + "\n" for line in lines))
        paths.append(path)
    return paths


def _groups(first: Shard, results: dict) -> dict:
    """The groups' entries (the paper's Avg.: accuracy weighted by the items each member scored), from the merged members."""
    from .vqa_results import weighted_average

    found = {}
    for group, members in (first.data.get("group_subtasks") or {}).items():
        present = [m for m in members if m in results and keys.key(keys.ACCURACY) in results[m]]
        if not present:
            continue
        values = [results[m][keys.key(keys.ACCURACY)] for m in present]
        scored = [(results[m].get(keys.key(keys.SAMPLES)) or {}).get("scored", 0) for m in present]
        entry = dict(first.data["results"].get(group, {"alias": group}))
        entry[keys.key(keys.ACCURACY)] = weighted_average(values, scored)
        found[group] = entry
    return found
