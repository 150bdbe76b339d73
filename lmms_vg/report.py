"""Tables and figures from lmms-eval output folders: leaderboard, layer curves (Fig. 3), heatmaps (Fig. 1)."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import keys, metrics, stats
from .outputs import RunRecord
from .presets import METHODS, split_model_id
from .prompts import INSTRUCTIONS

# the paper's column order; any other accuracy task found is appended after these
VQA_TASKS = ("vqa_rad", "slake_closed", "pathvqa", "pmc_vqa", "omnimedvqa", "mmmu_med")
VQA_NAMES = {
    "vqa_rad": "VQA-RAD",
    "slake_closed": "SLAKE",
    "pathvqa": "PathVQA",
    "pmc_vqa": "PMC-VQA",
    "omnimedvqa": "OmniMedVQA",
    "mmmu_med": "MMMU H&M",
}
GROUPS = ("medvqa", "medvqa_open", "vgmed")
METHOD_NAMES = {"vgrefine": "VGRefine", "pai": "PAI", "adaptvis": "AdaptVis", "vicrop": "ViCrop"}
CONTROL_MARKERS = ("coco", "random")  # natural-image or control tasks: dashed lines


class ReportError(ValueError):
    """Nothing to report from the given folders; the message says what was looked for."""


@dataclass(frozen=True)
class VqaResult:
    """A closed-ended task's accuracy (%; None when nothing was scored), items scored, and the item set it covers."""

    accuracy: float | None
    scored: int
    item_set: str = ""

    @classmethod
    def from_metrics(cls, metrics: dict, docs: int) -> VqaResult:
        """From the task's ``metric,filter`` entries; results that do not count scored items fall back on the doc count."""
        counts = metrics.get(keys.key(keys.SAMPLES))
        counts = counts if isinstance(counts, dict) else {}
        return cls(_number(metrics.get(keys.key(keys.ACCURACY))), int(counts.get("scored", docs)), str(counts.get("item_set", "")))


@dataclass(frozen=True)
class GroundingResult:
    """A grounding task's per-layer means, its best layer (lowest mean KL) with AR/KL/JS there, and its sample counts."""

    by_layer: dict[str, list[float]]  # "ar", "kl", "js" -> one value per layer
    best_layer: int | None
    best: dict[str, float | None]  # "ar", "kl", "js" at the best layer
    scored: int | None
    skipped: int | None
    head_kl: list[list[float]] | None = None  # mean KL per (layer, head), in head-level runs

    @classmethod
    def from_metrics(cls, metrics: dict) -> GroundingResult:
        best = metrics.get(keys.key(keys.BEST_LAYER)) or {}
        counts = metrics.get(keys.key(keys.SAMPLES)) or {}
        return cls(
            by_layer={m: list(metrics.get(keys.by_layer(m)) or []) for m in keys.LAYER_METRICS},
            best_layer=best.get("layer"),
            best={m: _number(best.get(m)) for m in keys.LAYER_METRICS},
            scored=counts.get("scored"),
            skipped=counts.get("skipped"),
            head_kl=metrics.get(keys.key(keys.HEAD_KL)) or None,
        )


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


@dataclass
class Run:
    """One model's results (a model id on one checkpoint, with or without a method), merged from every lmms-eval results
    file found for it: per task, the newest file's that scored any sample."""

    model: str  # the model id as given to --model
    base: str  # the model as tables name it, without its method (RunRecord.name: the checkpoint where it is not the id's own)
    method: str | None  # "vgrefine", "pai", "adaptvis", "vicrop" or None (the baseline)
    results: dict  # task -> metrics
    samples: dict[str, int]  # task -> docs evaluated
    path: Path  # the newest file that contributed
    sources: dict[str, Path] = field(default_factory=dict)  # task -> the file its results came from
    settings: dict = field(default_factory=dict)  # the method's settings as the run used them
    failed: dict[str, Path] = field(default_factory=dict)  # task -> a newer file whose results scored nothing (kept out)
    layers: tuple[int, ...] = ()  # the layers the model's preset names (the paper's fixed layer where it published one)
    _lines: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"{self.base} + {METHOD_NAMES[self.method]}" if self.method else self.base

    @property
    def vgrefine(self) -> bool:
        return self.method == "vgrefine"

    @property
    def order(self) -> tuple:
        """Sort key: by model, the baseline first, then its methods in presets.METHODS order."""
        return self.base, -1 if self.method is None else METHODS.index(self.method)

    def vqa(self, task: str) -> VqaResult | None:
        """The task's closed-ended result, if it has one."""
        metrics = self.results.get(task, {})
        return VqaResult.from_metrics(metrics, self.samples.get(task, 0)) if keys.key(keys.ACCURACY) in metrics else None

    def grounding(self, task: str) -> GroundingResult | None:
        """The task's grounding result, if it has one."""
        metrics = self.results.get(task, {})
        found = keys.key(keys.BEST_LAYER) in metrics or keys.by_layer("kl") in metrics
        return GroundingResult.from_metrics(metrics) if found else None

    def grounding_tasks(self) -> list[str]:
        return sorted(t for t in self.results if self.grounding(t) is not None)

    def sample_lines(self, task: str) -> list[dict] | None:
        """The task's per-sample log lines (lmms-eval's ``--log_samples`` file beside its results), or None without one."""
        source = self.sources.get(task)
        if source is None:
            return None
        found = source.parent / source.name.replace("_results.json", f"_samples_{task}.jsonl")
        if not found.exists():
            return None
        if found not in self._lines:
            self._lines[found] = [json.loads(line) for line in found.read_text().splitlines() if line.strip()]
        return self._lines[found]

    def closed_items(self, task: str) -> dict[str, int] | None:
        """Item id -> 1 (right) or 0 (wrong) for every scored item of a closed-ended task; None without its sample log."""
        lines = self.sample_lines(task)
        if lines is None:
            return None
        records = [line.get(keys.ACCURACY) for line in lines]
        return {str(r["id"]): int(bool(r.get("correct"))) for r in records if isinstance(r, dict) and not r.get("excluded")}

    def grounding_items(self, task: str) -> list[dict] | None:
        """The task's per-sample grounding records that were scored (per-layer ar/kl/js), or None without its sample log."""
        lines = self.sample_lines(task)
        if lines is None:
            return None
        records = [line.get(keys.GROUNDING_METRICS[0]) for line in lines]
        return [r for r in records if isinstance(r, dict) and not r.get("skipped")]

    def take(self, task: str, metrics: dict, samples: int, path: Path) -> None:
        """A file's results for ``task``, newer than what the run holds: they replace it unless they scored nothing while
        it did (a failed rerun never replaces a good row; it is listed in ``failed``)."""
        if scored(metrics) == 0 and scored(self.results.get(task, {})):
            self.failed[task] = path
            return
        self.results[task], self.samples[task], self.sources[task] = metrics, samples, path
        self.failed.pop(task, None)


class Runs(list):
    """The runs found (a list of :class:`Run`), plus the files that could not be read, each with why."""

    def __init__(self, runs: list[Run], unreadable: list[tuple[Path, str]] = ()):
        super().__init__(runs)
        self.unreadable = list(unreadable)


def samples_mismatch(run: Run, task: str) -> str | None:
    """Why a task's per-sample log does not belong to its results (None where it does, or where there is no log): more or
    fewer rows than the results counted, or a doc twice, as when two runs wrote into one folder in the same second."""
    lines = run.sample_lines(task)
    if lines is None:
        return None
    docs = Counter(line.get("doc_id") for line in lines)
    twice = sorted(str(d) for d, n in docs.items() if n > 1)
    expected = run.samples.get(task)
    if twice or (expected and len(lines) != expected):
        where = run.sources[task].parent
        return (
            f"its samples log has {len(lines)} rows for {expected} results items"
            + (f", docs {', '.join(twice[:5])}{' ...' if len(twice) > 5 else ''} twice" if twice else "")
            + f": two runs wrote into {where}; rerun each into its own --output_path"
        )
    return None


def scored(metrics: dict) -> int | None:
    """How many samples a task's results scored (lmms-vg's tasks count them), or None where they do not say."""
    counts = metrics.get(keys.key(keys.SAMPLES)) if isinstance(metrics, dict) else None
    value = counts.get("scored") if isinstance(counts, dict) else None
    return int(value) if isinstance(value, int | float) else None


def run_record(results: dict) -> RunRecord | None:
    """The record of the run that made a results file (lmms-vg's tasks write it beside their counts); None for other tasks."""
    for values in results.values():
        counts = values.get(keys.key(keys.SAMPLES)) if isinstance(values, dict) else None
        found = RunRecord.from_dict(counts.get("run")) if isinstance(counts, dict) else None
        if found is not None:
            return found
    return None


def identify(data: dict, results: dict) -> tuple[str, str, str | None, dict, tuple[int, ...]]:
    """(model id, the model as tables name it, method, settings, the preset's layers) of a results file: from its run
    record, else (lmms-eval's own tasks) the model id given to --model."""
    record = run_record(results)
    if record is not None:
        model_id = record.model + (f"_{record.method}" if record.method else "")
        return model_id, record.name, record.method, record.settings, record.layers
    model = str(data.get("config", {}).get("model", "model"))
    base, method = split_model_id(model)
    return model, base, method, {}, ()


def load_runs(folders: list[str | Path]) -> Runs:
    """Every ``*_results.json`` below the folders, merged per model label: for each task, the newest file's results that
    scored a sample (:meth:`Run.take`). Runs are named by the record each results file carries (model id, checkpoint,
    method): two checkpoints of one model id are two runs.

    A file that cannot be read is skipped and listed in ``unreadable``; the others are still used.
    """
    runs: dict[str, Run] = {}
    unreadable: list[tuple[Path, str]] = []
    missing = [str(f) for f in folders if not Path(f).exists()]
    if missing:
        raise ReportError(f"results folder(s) not found: {', '.join(missing)}")
    files = sorted((p for f in folders for p in Path(f).rglob("*_results.json")), key=lambda p: (p.name, p.stat().st_mtime))
    for path in files:  # oldest first: a newer file's task replaces an older one's
        try:
            data = json.loads(path.read_text())
            results = data["results"]
            model, base, method, used, layers = identify(data, results)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as err:
            unreadable.append((path, f"{type(err).__name__}: {err}"))
            continue
        samples = {t: int(v.get("effective", v.get("original", 0))) for t, v in (data.get("n-samples") or {}).items()}
        found = Run(model, base, method, {}, {}, path, settings=used, layers=layers)
        run = runs.setdefault(found.label, found)
        for task, values in results.items():
            run.take(task, values, samples.get(task, 0), path)
        run.path = path
    if not runs:
        where = ", ".join(map(str, folders))
        named = "; ".join(f"{p}: {why}" for p, why in unreadable)
        raise ReportError(f"no lmms-eval results (*_results.json) readable under {where}" + (f" (unreadable: {named})" if named else ""))
    return Runs(list(runs.values()), unreadable)


def accuracy_tasks(runs: list[Run]) -> list[str]:
    found = {t for r in runs for t in r.results if r.vqa(t) is not None and t not in GROUPS}
    return [t for t in VQA_TASKS if t in found] + sorted(found - set(VQA_TASKS))


def _scored_vqa(run: Run, task: str) -> VqaResult | None:
    """The task's result where it has an accuracy."""
    result = run.vqa(task)
    return result if result is not None and result.accuracy is not None else None


def leaderboard(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Models x benchmarks: closed-ended accuracy (%) with its Wilson 95% interval in the next column, the Avg. weighted
    by items scored (its interval over the pooled items), and a method - baseline row per method run: the delta with its
    paired bootstrap interval over the items both scored (``*``: the interval excludes 0; :func:`deltas` has McNemar's p).

    When one of the paper's benchmarks was scored on another item set than the paper's, the Avg.
    column is headed "Avg. (not the paper's item sets)"; :func:`item_set_notes` says which sets.
    """
    tasks = accuracy_tasks(runs)
    if not tasks:
        raise ReportError("no closed-ended accuracy in these results: run the VQA tasks (e.g. --tasks medvqa)")
    # the question only arises for the paper's benchmarks: is each scored on the items the paper reports?
    other_sets = {v.item_set for r in runs for t in tasks if t in VQA_TASKS and (v := _scored_vqa(r, t))} - {"paper", ""}
    average = "Avg. (not the paper's item sets)" if other_sets else "Avg."
    header = ["Model"] + [c for name in [VQA_NAMES.get(t, t) for t in tasks] + [average] for c in (name, f"{name} 95% CI")]
    rows = []
    ordered = sorted(runs, key=lambda r: r.order)
    for run in ordered:
        results = [_scored_vqa(run, t) for t in tasks]
        pooled = [(round(v.accuracy * v.scored / 100), v.scored) for v in results if v and v.scored > 0]
        right, n = sum(k for k, _ in pooled), sum(m for _, m in pooled)
        cells = [(v.accuracy, _wilson_cell(v.accuracy * v.scored / 100, v.scored)) if v else (None, "-") for v in results]
        cells.append((100.0 * right / n if n else None, _wilson_cell(right, n)))
        rows.append([run.label] + [c for value, interval in cells for c in (_fmt(value), interval)])
    baselines = {r.base: r for r in ordered if r.method is None}
    for run in ordered:
        baseline = baselines.get(run.base)
        if run.method and baseline is not None:
            found = [_delta_cells(d) for d in task_deltas(baseline, run, tasks)]
            rows.append([f"{run.base}: {METHOD_NAMES[run.method]} - baseline"] + [c for pair in found for c in pair])
    return header, rows


def _wilson_cell(right: float, n: int) -> str:
    if not n:
        return "-"
    low, high = stats.wilson(round(right), n)
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


@dataclass(frozen=True)
class Delta:
    """B - A in points on one task (or the pooled average): paired over the items both scored where their sample logs are
    there, else the difference of the two accuracies with no interval."""

    task: str
    value: float | None
    paired: stats.PairedDelta | None  # in points

    @property
    def marked(self) -> bool:
        return self.paired is not None and self.paired.excludes_zero


def task_deltas(a: Run, b: Run, tasks: list[str]) -> list[Delta]:
    """Per task, then the average: paired over the union of the tasks' items (each item weighing one, as the Avg. weighs
    them) where every task both runs scored has its sample logs, else the difference of the two Avg. columns."""
    found, pooled_a, pooled_b, paired = [], [], [], True
    for task in tasks:
        va, vb = _scored_vqa(a, task), _scored_vqa(b, task)
        if not (va and vb):
            found.append(Delta(task, None, None))
            continue
        ia, ib = a.closed_items(task), b.closed_items(task)
        if ia is None or ib is None:
            paired = False
            found.append(Delta(task, vb.accuracy - va.accuracy, None))
            continue
        common = sorted(set(ia) & set(ib))
        pooled_a += [ia[i] for i in common]
        pooled_b += [ib[i] for i in common]
        found.append(_paired(task, [ia[i] for i in common], [ib[i] for i in common]))
    found.append(_paired("Avg.", pooled_a, pooled_b) if paired and pooled_a else Delta("Avg.", _average_delta(a, b, tasks), None))
    return found


def _paired(task: str, a: list[int], b: list[int]) -> Delta:
    d = stats.paired_delta(a, b)
    points = stats.PairedDelta(100 * d.delta, 100 * d.low, 100 * d.high, d.p_value, d.n)
    return Delta(task, points.delta if d.n else None, points if d.n else None)


def _average_delta(a: Run, b: Run, tasks: list[str]) -> float | None:
    """The difference of the two Avg. columns (items-scored weights), where the items cannot be paired."""
    means = []
    for run in (a, b):
        pairs = [(v.accuracy, v.scored) for t in tasks if (v := _scored_vqa(run, t)) and v.scored > 0]
        means.append(sum(x * w for x, w in pairs) / sum(w for _, w in pairs) if pairs else None)
    return means[1] - means[0] if None not in means else None


def _delta_cells(d: Delta) -> tuple[str, str]:
    if d.value is None:
        return "-", "-"
    if d.paired is None:
        return _fmt(d.value, signed=True), "n/a (no sample logs: rerun with --log_samples)"
    return _fmt(d.value, signed=True) + ("*" if d.marked else ""), f"[{d.paired.low:+.1f}, {d.paired.high:+.1f}]"


def browser_link(task: str, a: Run, b: Run) -> str:
    """The sample browser's view of a comparison (``lmms-vg browse`` into ``<report>/browser``): the items B gained over A."""
    from urllib.parse import quote

    query = f"a={quote(a.label, safe='')}&b={quote(b.label, safe='')}&outcome=gained" + (
        "" if task == "Avg." else f"&task={quote(task, safe='')}"
    )
    return f"browser/index.html#?{query}"


def deltas(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Every method against its baseline and every pair of baseline models, per task and on the average: the paired delta,
    its 95% bootstrap interval, the exact McNemar p-value, the paired items, and whether the interval excludes 0."""
    tasks = accuracy_tasks(runs)
    ordered = sorted(runs, key=lambda r: r.order)
    baselines = [r for r in ordered if r.method is None]
    pairs = [(b, r) for r in ordered for b in baselines if r.method and b.base == r.base]
    pairs += [(a, b) for i, a in enumerate(baselines) for b in baselines[i + 1 :]]
    header = [
        "Comparison",
        "Task",
        "Delta (points)",
        "95% CI low",
        "95% CI high",
        "McNemar p",
        "Paired items",
        "Interval excludes 0",
        "Items",
    ]
    rows = []
    for a, b in pairs:
        for d in task_deltas(a, b, tasks):
            if d.value is None:
                continue
            p = d.paired
            found = (
                [_fmt(p.low, signed=True), _fmt(p.high, signed=True), f"{p.p_value:.3g}", str(p.n), "yes" if d.marked else "no"]
                if p
                else ["-"] * 5
            )
            rows.append(
                [f"{b.label} - {a.label}", VQA_NAMES.get(d.task, d.task), _fmt(d.value, signed=True), *found, browser_link(d.task, a, b)]
            )
    return header, rows


def item_set_notes(runs: list[Run]) -> list[str]:
    """One line per benchmark: the item set(s) and items scored per model, so that a reader knows what the numbers cover."""
    notes = []
    for task in accuracy_tasks(runs):
        seen = sorted({(v.item_set, v.scored) for r in runs if (v := _scored_vqa(r, task))})
        described = "; ".join(f"{name or 'unnamed item set'}, {n:,} items scored" for name, n in seen)
        notes.append(f"{VQA_NAMES.get(task, task)}: {described}")
    return notes


def failed_notes(runs: list[Run]) -> list[str]:
    """One line per task whose newest results scored nothing: an older run's stand in the table, and the reader is told."""
    return [
        f"{run.label} · {task}: newest results ({path}) scored no sample; the table shows {run.sources[task]}"
        for run in runs
        for task, path in sorted(run.failed.items())
    ]


def grounding_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Per model and grounding task: AR, KL and JS with bootstrap 95% intervals over the scored items, at the best layer
    (lowest mean KL, chosen on these same data) and at the fixed layer the model's preset names (the paper's, where it
    published one); the column ``Layer`` says which each row uses. Sample counts last."""
    header = (
        ["Model", "Task", "Layer", "Layer chosen"] + [c for m in ("AR", "KL", "JS") for c in (m, f"{m} 95% CI")] + ["Scored", "Skipped"]
    )
    rows = []
    for run in sorted(runs, key=lambda r: r.order):
        for task in run.grounding_tasks():
            g = run.grounding(task)
            items = run.grounding_items(task)
            layers = [(g.best_layer, "best on these data")] + [(layer, "fixed (the preset's)") for layer in run.layers[:1]]
            for layer, how in layers:
                if layer is None:
                    continue
                cells = []
                for metric in keys.LAYER_METRICS:
                    mean, low, high = _layer_interval(items, metric, layer)
                    if items is None:  # no sample log: the aggregate's mean, no interval
                        mean = g.best[metric] if layer == g.best_layer else _at(g.by_layer[metric], layer)
                    cells += [_fmt(mean, 3), "-" if items is None else f"[{low:.3f}, {high:.3f}]"]
                rows.append([run.label, task, str(layer), how, *cells] + [str(n) if n is not None else "" for n in (g.scored, g.skipped)])
    return header, rows


def _layer_interval(items: list[dict] | None, metric: str, layer: int) -> tuple[float, float, float]:
    if items is None:
        return float("nan"), float("nan"), float("nan")
    values = [r[metric][layer] if len(r.get(metric) or []) > layer and r[metric][layer] is not None else float("nan") for r in items]
    return stats.bootstrap_mean(values)


def _at(values: list, index: int):
    return values[index] if index < len(values) else None


def _fmt(value, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(header: list[str], rows: list[list[str]], notes: list[str] = (), kept_out: list[str] = ()) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += ["", "Item sets:", *(f"- {n}" for n in notes)]
    if kept_out:
        lines += ["", "Kept out (failed reruns):", *(f"- {n}" for n in kept_out)]
    return "\n".join(lines) + "\n"


def write_leaderboards(runs: list[Run], out: Path) -> list[Path]:
    """The accuracy leaderboard (with its item-set notes) and the grounding table, whichever the runs hold; each printed too."""
    written = []
    for build, stem in ((leaderboard, "leaderboard"), (deltas, "deltas"), (grounding_table, "grounding")):
        try:
            header, rows = build(runs)
        except ReportError:
            continue
        if rows:
            notes = item_set_notes(runs) if stem == "leaderboard" else []
            kept_out = failed_notes(runs)
            written += write_table(header, rows, out, stem, notes, kept_out)
            print(markdown(header, rows, notes, kept_out))
    return written


def write_table(header, rows, out: Path, stem: str, notes: list[str] = (), kept_out: list[str] = ()) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(markdown(header, rows, notes, kept_out))
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return [md, csv_path]


def layer_curves(runs: list[Run], out: Path, stem: str = "layer_curves") -> list[Path]:
    """AR, KL and JS against layer for every model (a colour each) and grounding task (a marker each; medical solid,
    natural/control dashed), e.g. the demo's source and shifted domains side by side."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r, t) for r in sorted(runs, key=lambda r: r.label) for t in r.grounding_tasks() if r.grounding(t).by_layer["kl"]]
    if not curves:
        raise ReportError("no per-layer grounding metrics in these results: run the grounding tasks (e.g. --tasks vgmed)")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    model_colour = {label: colours[i % len(colours)] for i, label in enumerate(sorted({r.label for r, _ in curves}))}
    task_marker = {task: "os^DvP*X"[i % 8] for i, task in enumerate(sorted({t for _, t in curves}))}
    for ax, (metric, title) in zip(
        axes,
        (("ar", "Attention ratio (higher: in the box)"), ("kl", "KL(G || P) (lower is better)"), ("js", "JS divergence (lower is better)")),
    ):
        for run, task in curves:
            ys = run.grounding(task).by_layer[metric]
            dashed = any(m in task for m in CONTROL_MARKERS)
            ax.plot(
                range(len(ys)),
                ys,
                linestyle="--" if dashed else "-",
                marker=task_marker[task],
                markersize=4.5,
                color=model_colour[run.label],
                label=f"{run.label} · {task}",
            )
        if metric == "ar":
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


def load_maps(folder: Path, pattern: str = "*") -> dict[str, dict]:
    maps = {}
    for path in sorted(Path(folder).glob(f"{pattern}.npz")):
        with np.load(path) as z:
            maps[path.stem] = {k: z[k] for k in z.files}
    if not maps:
        raise ReportError(f"no saved maps (*.npz) in {folder}: run a grounding task with --model_args ...,save_maps={folder}")
    return maps


def heatmaps(
    panels: dict[str, Path],
    out: Path,
    layer: int | None = None,
    limit: int = 6,
    pattern: str = "*",
    stem: str = "heatmaps",
    normalised: bool = True,
) -> list[Path]:
    """Attention over the image, the box drawn, one column per run (e.g. baseline, VGRefine), into ``<stem>.png/.svg``.

    ``pattern`` picks sample files by name (e.g. ``vgmed_loc_*``); the samples shown are those all runs share.
    ``normalised``: the maps divided by the generic prompt's (the metrics' maps); else the question's own
    attention, where a knockout's effect on a distracting structure shows (maps saved by this version on).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches

    loaded = {name: load_maps(folder, pattern) for name, folder in panels.items()}
    field = "maps" if normalised else "question_maps"
    if not normalised and any(field not in m for maps in loaded.values() for m in maps.values()):
        raise ReportError("these map files hold no question_maps (saved by an older version): draw the normalised maps")
    common = sorted(set.intersection(*(set(m) for m in loaded.values())))[:limit]
    if not common:
        raise ReportError("the map folders share no sample: run the same grounding task for each")
    first, last = next(iter(loaded.values())), list(loaded.values())[-1]
    if layer is None:
        # the layer where the last run (e.g. VGRefine) puts the most attention in the boxes, at or after its knockout
        # layer when it has one (below it, baseline and VGRefine maps are the same by construction)
        ar = np.mean([box_ratio(last[s][field], last[s]["box"]) for s in common], axis=0)
        knocked = last[common[0]].get("knockout_layers", np.array([], dtype=np.int64))
        start = int(knocked.min()) if knocked.size else 0
        layer = start + int(np.argmax(ar[start:]))
    fig, axes = plt.subplots(
        len(common), len(panels), figsize=(3.2 * len(panels), 3.2 * len(common)), squeeze=False, constrained_layout=True
    )
    for row, sample in enumerate(common):
        for col, (name, maps) in enumerate(loaded.items()):
            ax, m = axes[row][col], maps[sample]
            _draw_heatmap(ax, m, layer, patches, field)
            if row == 0:
                ax.set_title(f"{name} (layer {layer}{'' if normalised else ', not normalised'})", fontsize=10)
        axes[row][0].set_ylabel(question_label(str(first[sample]["question"])), fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def box_ratio(maps: np.ndarray, box: np.ndarray) -> np.ndarray:
    """AR per layer of saved maps ``[layers, N]`` and their box ``[N]`` (bool), by :func:`lmms_vg.metrics.attention_ratio`."""
    import torch

    return metrics.attention_ratio(torch.from_numpy(np.asarray(maps, np.float64)), torch.from_numpy(np.asarray(box, bool))).numpy()


def question_label(question: str, width: int = 34) -> str:
    """The question without its answer instruction, wrapped for a figure."""
    import textwrap

    for instruction in INSTRUCTIONS:
        question = question.replace(instruction, "")
    return "\n".join(textwrap.wrap(question.strip(), width)[:3])


def _draw_heatmap(ax, m: dict, layer: int, patches, field: str = "maps") -> None:
    """The map's grid cells are laid back on the original image through the saved preprocessing geometry."""
    width, height = (int(v) for v in m["image_size"])
    rows, cols = (int(v) for v in m["grid"])
    sx, sy, ox, oy, cell, *rest = (float(v) for v in m["transform"])
    cell_h = rest[0] if rest else cell  # files written before non-square cells hold five numbers
    import matplotlib.pyplot as plt

    heat = np.asarray(m[field][layer], np.float64).reshape(rows, cols)
    heat = heat / heat.max() if heat.max() > 0 else heat
    overlay = plt.get_cmap("jet")(heat)
    overlay[..., 3] = 0.1 + 0.6 * heat  # low attention lets the image show through
    extent = (-ox / sx, (cols * cell - ox) / sx, (rows * cell_h - oy) / sy, -oy / sy)  # left, right, bottom, top in pixels
    ax.imshow(m["image"], extent=(0, width, height, 0))
    ax.imshow(overlay, extent=extent, interpolation="nearest")
    for x0, y0, x1, y1 in m["boxes"]:
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=2))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
