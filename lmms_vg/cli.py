"""``lmms-vg``: reports over lmms-eval results, head calibration, checkpoint conversion, and the offline demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import keys, report, settings, writing


def cmd_leaderboard(args) -> list[Path]:
    runs = load_runs(args)
    with writing.staged(Path(args.out), args.force, what=f"lmms-vg {args.command}") as stage:
        written = report.write_leaderboards(runs, stage)
        if not written:
            raise report.ReportError("neither accuracy nor grounding results found under the given folders")
        return writing.in_place(written, stage, Path(args.out))


def load_runs(args) -> report.Runs:
    """The runs under the command's folders; files that could not be read are named now and fail the command at its end."""
    runs = report.load_runs(args.results)
    for path, why in runs.unreadable:
        print(f"lmms-vg {args.command}: cannot read {path} ({why}); reporting the other files", file=sys.stderr)
    args.unreadable = runs.unreadable
    return runs


def cmd_curves(args) -> list[Path]:
    runs = load_runs(args)
    with writing.staged(Path(args.out), args.force, what=f"lmms-vg {args.command}") as stage:
        return writing.in_place(report.layer_curves(runs, stage), stage, Path(args.out))


def cmd_heatmaps(args) -> list[Path]:
    panels = {"baseline": Path(args.baseline)}
    if args.vgrefine:
        panels["VGRefine"] = Path(args.vgrefine)
    with writing.staged(Path(args.out), args.force, what=f"lmms-vg {args.command}") as stage:
        written = report.heatmaps(panels, stage, layer=args.layer, limit=args.limit, normalised=not args.question_attention)
        return writing.in_place(written, stage, Path(args.out))


def cmd_report(args) -> list[Path]:
    runs = load_runs(args)
    with writing.staged(Path(args.out), args.force, what=f"lmms-vg {args.command}") as stage:
        written = report.write_leaderboards(runs, stage)
        try:
            written += report.layer_curves(runs, stage)
        except report.ReportError as err:
            print(f"layer curves: {err}")
        return writing.in_place(written, stage, Path(args.out))


def cmd_calibrate(args) -> list[Path]:
    """Rank heads by mean KL from a head-level grounding run into a VGRefine preset."""
    from .methods.vgrefine import calibrate

    if args.top_k < 1:
        raise report.ReportError(f"--top-k {args.top_k}: a preset needs at least one head")
    layers = settings.as_layers("--knockout-layers", args.knockout_layers)
    if not layers:
        raise report.ReportError("--knockout-layers is empty: name at least one layer, e.g. '16'")
    runs = [r for r in load_runs(args) if args.task in r.results]
    if not runs:
        raise report.ReportError(f"no results for task '{args.task}' under {args.results}")
    run = runs[-1]
    result = run.grounding(args.task)
    if result is None or not result.head_kl:
        raise report.ReportError(f"{run.path}: task '{args.task}' has no head-level KL; rerun it with --model_args ...,head_level=true")
    head_kl, samples = result.head_kl, result.scored
    source = f"{args.task} ({run.path.name})"
    preset = calibrate(head_kl, args.top_k, layers, run.base, source, samples)
    out = Path(args.out)
    writing.refuse_existing_file(out, args.force, "lmms-vg calibrate")
    out.write_text(preset.to_json() + "\n")
    print(f"{len(preset.heads)} heads from {samples} samples of {args.task} ({run.base}) -> {out}")
    return [out]


def cmd_check(args) -> list[Path]:
    """Exit non-zero unless every named task has results with at least one scored sample (lmms-eval itself exits 0 on failure)."""
    runs = load_runs(args)
    wanted = [t for t in args.tasks.replace(",", " ").split() if t]
    problems = []
    for task in wanted:
        found = [r for r in runs if task in r.results]
        if not found:
            problems.append(f"{task}: no results (the run failed or did not include it; read its log)")
            continue
        for run in found:
            scored = report.scored(run.results[task])
            counts = run.results[task].get(keys.key(keys.SAMPLES), {})
            print(f"{run.label} · {task}: {scored if scored is not None else '?'} scored ({run.sources.get(task, run.path)})")
            if scored == 0:
                problems.append(f"{run.label} · {task}: no sample was scored ({counts})")
            if task in run.failed:  # the newest run of it scored nothing: an older one's results stand in the tables
                problems.append(f"{run.label} · {task}: its newest results ({run.failed[task]}) scored no sample")
            mismatch = report.samples_mismatch(run, task)
            if mismatch:
                problems.append(f"{run.label} · {task}: {mismatch}")
    if problems:
        raise report.ReportError("; ".join(problems))
    return []


def cmd_convert(args) -> list[Path]:
    from .convert import convert

    return [convert(args.source, args.out, arch=args.arch, vision_tower=args.vision_tower, force=args.force)]


def cmd_check_family(args) -> None:
    """The conformance battery on a model id's (or a family's) adapter: exit 1 if any check fails."""
    import tempfile

    import torch

    from . import conformance, presets

    presets.load_families()
    pretrained = args.pretrained
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:  # the family's tiny random checkpoint: offline, seconds
            name = presets.PRESETS[args.id].family if args.id in presets.PRESETS else args.id
            family = presets.family_of(name)
            if family.tiny is None:
                raise ValueError(f"family {family.name} registers no tiny checkpoint builder (its Family's tiny=); give --pretrained")
            pretrained = str(family.tiny(Path(scratch) / "tiny"))
        adapter = conformance.load_adapter(args.id, pretrained, getattr(torch, args.dtype), args.trust_remote_code)
        results = conformance.run_checks(adapter, args.checks or None)
    print(conformance.report(results))
    if any(r.passed is False for r in results):
        raise SystemExit(1)


def cmd_browse(args) -> list[Path]:
    from .browse import browse

    written = browse(args.results, args.out, force=args.force)
    print(f"open {written[0]} in a browser (works from disk, offline)")
    return written[:1]


def cmd_merge(args) -> list[Path]:
    from .merge import merge

    return merge(args.shards, args.out, force=args.force)


def cmd_tasks_path(args) -> None:
    """The folder of lmms-vg's task YAMLs, for lmms-eval's ``--include_path`` (where the automatic task path is off)."""
    import lmms_vg_tasks

    print(Path(lmms_vg_tasks.__file__).resolve().parent)


def cmd_demo(args) -> list[Path]:
    from .demo.run import run_demo

    return run_demo(Path(args.out), device=args.device, force=args.force)


FORCE_HELP = "replace files lmms-vg did not write (or that changed since); without it the command stops and names them"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmms-vg", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def results_command(name, fn, help_text):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("results", nargs="+", help="lmms-eval --output_path folder(s)")
        s.add_argument("--out", default="lmms_vg_report", help="folder for the tables/figures")
        s.add_argument("--force", action="store_true", help=FORCE_HELP)
        s.set_defaults(fn=fn)
        return s

    results_command("leaderboard", cmd_leaderboard, "models x benchmarks table (Markdown, CSV), VGRefine deltas")
    results_command("curves", cmd_curves, "AR, KL, JS against layer (PNG, SVG)")
    results_command("report", cmd_report, "leaderboard and layer curves together")
    s = results_command("calibrate", cmd_calibrate, "VGRefine head ranking from a head-level grounding run")
    s.add_argument("--task", default="vgmed_coco_loc")
    s.add_argument("--top-k", type=int, default=20)
    s.add_argument("--knockout-layers", required=True, help="e.g. '16' or '14 15 16'")
    s.set_defaults(out="heads.json")

    s = results_command("check", cmd_check, "exit non-zero unless each task has results with scored samples (for scripts)")
    s.add_argument("--tasks", required=True, help="e.g. 'vqa_rad,vgmed_loc'")

    s = results_command("browse", cmd_browse, "a static per-sample browser: maps, boxes, answers, runs side by side (open index.html)")
    s.set_defaults(out="lmms_vg_browser")

    s = sub.add_parser("merge", help="join the output folders of one run's shards (--offset/--limit, machines) into one results folder")
    s.add_argument("shards", nargs="+", help="lmms-eval --output_path folders of the shards (run with --log_samples)")
    s.add_argument("--out", required=True, help="folder for the joined results (lmms-eval's layout)")
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(fn=cmd_merge)

    s = sub.add_parser("heatmaps", help="attention over the image with the box (PNG, SVG), baseline vs VGRefine")
    s.add_argument("--baseline", required=True, help="save_maps folder of the baseline run")
    s.add_argument("--vgrefine", help="save_maps folder of the VGRefine run")
    s.add_argument(
        "--layer", type=int, default=None, help="default: the layer where the last run (VGRefine) puts the most attention in the boxes"
    )
    s.add_argument("--limit", type=int, default=6)
    s.add_argument(
        "--question-attention",
        action="store_true",
        help="draw the question's own attention, not divided by the generic prompt's: where a knockout's effect on a distractor shows",
    )
    s.add_argument("--out", default="lmms_vg_report")
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(fn=cmd_heatmaps)

    s = sub.add_parser("convert", help="original LLaVA-format checkpoint -> transformers-native folder (safetensors)")
    s.add_argument("source", help="folder of the original checkpoint (config.json + weights)")
    s.add_argument("out")
    s.add_argument(
        "--arch",
        choices=["llava_qwen2", "llava_qwen", "llava_mistral", "llava_llama"],
        default=None,
        help="default: from the source config",
    )
    s.add_argument(
        "--vision-tower", default=None, help="folder of the vision tower (a CLIP folder, or an open_clip one such as BiomedCLIP's)"
    )
    s.add_argument("--force", action="store_true", help="write into a folder that holds other files (even the source)")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("demo", help="the whole pipeline, offline, on the bundled model and data")
    s.add_argument("--out", default="lmms_vg_demo")
    s.add_argument("--device", default="cpu")
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser(
        "check-family", help="the conformance battery on a model id's adapter: encoding, maps vs eager, shared prefix, VGRefine, geometry"
    )
    s.add_argument("id", help="a model id (its preset's checkpoint) or a family name (with --tiny or --pretrained)")
    s.add_argument("--pretrained", help="checkpoint folder or HF id instead of the preset's")
    s.add_argument("--tiny", action="store_true", help="on the family's tiny random-weight checkpoint (offline, seconds)")
    s.add_argument("--checks", nargs="*", help="some of: encoding maps maps_left_padded shared_prefix vgrefine geometry (default: all)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="eager comparisons want float32")
    s.add_argument("--trust-remote-code", action="store_true")
    s.set_defaults(fn=cmd_check_family)

    s = sub.add_parser("tasks-path", help="print the folder of lmms-vg's tasks, for lmms-eval's --include_path")
    s.set_defaults(fn=cmd_tasks_path)

    args = p.parse_args(argv)
    try:
        written = args.fn(args)
    except (report.ReportError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        prefix = f"lmms-vg {args.command}: "
        print(("" if str(err).startswith(prefix) else prefix) + str(err), file=sys.stderr)
        return 2
    if written is None:  # a command that prints its answer itself
        return 0
    print(json.dumps({"written": [str(w) for w in written]}, indent=1))
    unreadable = getattr(args, "unreadable", [])
    if unreadable:  # what was reported is written, but it is not all there was
        print(f"lmms-vg {args.command}: {len(unreadable)} results file(s) could not be read (named above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
