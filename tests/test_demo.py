"""The README's main job: the bundled demo, end to end, and what its numbers say."""

import csv
import dataclasses
import json
import math
import random
import xml.etree.ElementTree as ET

import numpy as np
import torch
from PIL import Image

from lmms_vg import cli, engine, report


def test_demo_writes_results_tables_and_figures(demo):
    out, seconds = demo
    print(f"\ndemo: {seconds:.0f}s on this machine")
    for model in ("lmms_vg_demo", "lmms_vg_demo_vgrefine", "lmms_vg_demo_pai", "lmms_vg_demo_adaptvis", "lmms_vg_demo_vicrop"):
        assert list((out / "results" / model).rglob("*_results.json")), model
    rows = list(csv.reader((out / "report" / "leaderboard.csv").read_text().splitlines()))
    assert rows[0] == [
        "Model",
        *(c for name in ("medvqa_demo", "medvqa_demo_shifted", "Avg.") for c in (name, f"{name} 95% CI")),
    ]
    methods = ("VGRefine", "PAI", "AdaptVis", "ViCrop")
    assert [r[0] for r in rows[1:]] == [
        "lmms_vg_demo",
        *(f"lmms_vg_demo + {m}" for m in methods),
        *(f"lmms_vg_demo: {m} - baseline" for m in methods),
    ]
    assert (out / "report" / "leaderboard.md").read_text().startswith("| Model | medvqa_demo | medvqa_demo 95% CI | medvqa_demo_shifted |")
    deltas = list(csv.reader((out / "report" / "deltas.csv").read_text().splitlines()))
    shifted = next(r for r in deltas if r[0] == "lmms_vg_demo + VGRefine - lmms_vg_demo" and r[1] == "medvqa_demo_shifted")
    print(
        f"\ndemo, VGRefine - baseline on the shifted domain: {shifted[2]} points, 95% CI [{shifted[3]}, {shifted[4]}], McNemar p {shifted[5]}"
    )
    assert int(shifted[6]) == 192 and shifted[7] in ("yes", "no")
    grounding = list(csv.reader((out / "report" / "grounding.csv").read_text().splitlines()))
    assert len(grounding) == 7  # two models x (task, control, shifted task)
    for name in ("layer_curves", "heatmaps", "heatmaps_shifted"):
        with Image.open(out / "report" / f"{name}.png") as img:
            img.verify()
        assert ET.parse(out / "report" / f"{name}.svg").getroot().tag.endswith("svg")


def test_grounding_metrics_tell_grounded_from_ungrounded(demo):
    """The trained demo model looks at the target: AR well above 1; with the box moved at random, AR near 1."""
    out, _ = demo
    run = next(r for r in report.load_runs([out / "results"]) if r.method is None)
    true_ar = max(run.results["vgmed_demo"]["ar_by_layer,none"])
    random_ar = run.results["vgmed_demo_random"]["ar_by_layer,none"]
    best = run.results["vgmed_demo"]["best_layer,none"]
    print(f"\nAR by layer, true boxes: {run.results['vgmed_demo']['ar_by_layer,none']}")
    print(f"AR by layer, random boxes: {random_ar}")
    print(f"best layer {best['layer']}: AR {best['ar']:.3f}, KL {best['kl']:.3f}, JS {best['js']:.3f}")
    assert true_ar > 2.0
    assert all(abs(a - 1) < (true_ar - 1) / 2 for a in random_ar)
    accuracy = run.results["medvqa_demo"]["accuracy,none"]
    print(f"demo VQA accuracy: {accuracy:.1f}%")
    assert json.dumps(run.results["medvqa_demo"]["samples,none"])


def test_a_failed_rerun_into_the_same_folder_fails_and_reports_nothing_stale(demo, tmp_path, monkeypatch, capsys):
    """Run again into the finished demo's folder with its tasks hidden: the command fails, and the old results are gone."""
    import shutil

    out, _ = demo
    again = tmp_path / "again"
    shutil.copytree(out, again)
    monkeypatch.setenv("LMMS_VG_AUTO_TASKS", "0")  # lmms-eval no longer finds the demo tasks: its run fails (and exits 0)
    assert cli.main(["demo", "--out", str(again)]) == 2
    assert "wrote no results for lmms_vg_demo" in capsys.readouterr().err
    assert not list((again / "results" / "lmms_vg_demo").rglob("*_results.json"))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    p = successes / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_shifted_domain_loses_grounding_and_vgrefine_recovers_accuracy():
    """The paper's finding on the demo's two domains, on fresh test scenes (a seed of their own: never the scenes the
    heads were ranked on, nor those the knockout layer, percentile and K were chosen on, nor the demo's data).

    Grounding at the best layer drops on the shifted domain; the baseline's multiple-choice accuracy falls; VGRefine
    with the shipped source-ranked heads recovers part of it, beyond noise: the paired difference's 95% interval
    (McNemar's exact test on the items the two disagree on) excludes zero.
    """
    from scipy.stats import binomtest

    from lmms_vg.demo import synthetic, train
    from lmms_vg.families.llava import LlavaAdapter
    from lmms_vg.grounding import GroundingRunner, GroundingSample
    from lmms_vg.methods.vgrefine import VGRefiner, config_from_args
    from lmms_vg.presets import PRESETS, family_of, resolve_checkpoint
    from lmms_vg.prompts import GENERIC_PROMPT, MC_INSTRUCTION, SHORT_ANSWER
    from lmms_vg_models.loading import load_checkpoint

    model, processor = load_checkpoint(
        resolve_checkpoint(PRESETS["lmms_vg_demo"].checkpoint), family_of("llava").model_types, torch.float32, None, "main", False
    )
    engine.install(model)
    adapter = LlavaAdapter(model, processor, name="demo", pad_to_square=True)
    seed, n = 4242, 384

    runner = GroundingRunner(adapter, GENERIC_PROMPT + SHORT_ANSWER)
    best = {}
    for shift in (False, True):
        rng = random.Random(seed)
        samples = []
        for _ in range(n // 2):
            image, things = synthetic.scene(rng)
            q = synthetic.question(things, rng)
            image = synthetic.shifted(image, things, rng) if shift else image
            samples.append(GroundingSample(image, q.question + SHORT_ANSWER, [q.target.box], "xyxy"))
        records = runner.score(samples)
        ar, kl = np.mean([r.ar for r in records], 0), np.mean([r.kl for r in records], 0)
        layer = int(np.argmin(kl))
        best[shift] = (layer, ar[layer], kl[layer])
        print(f"\n{'shifted' if shift else 'source '}: best layer {layer}, AR {ar[layer]:.2f}, KL {kl[layer]:.2f} ({n // 2} scenes)")
    assert best[True][1] < best[False][1] and best[True][2] > best[False][2]

    config = config_from_args("lmms_vg_demo", "demo", None, None, None, "mask")
    config = dataclasses.replace(config, reference_prompt=GENERIC_PROMPT + "\n" + MC_INSTRUCTION)  # the MC task's reference
    refiner = VGRefiner(adapter, config, reference_cache_size=0)
    pad = adapter.tokenizer.pad_token_id
    outcome = {}
    for shift in (False, True):
        items = train.mc_items(random.Random(seed + 1), n, shift)
        base, refined = [], []
        for i in range(0, n, 32):
            chunk = items[i : i + 32]
            batch = adapter.encode([e[0] for e in chunk], [e[1] for e in chunk])
            with torch.no_grad():  # the baseline: plain generation, as the wrapper answers
                tokens = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=pad)[:, batch["input_ids"].shape[1] :]
            base += [t.strip() == e[2] for t, e in zip(adapter.tokenizer.batch_decode(tokens, skip_special_tokens=True), chunk)]
            out = refiner.generate([e[0] for e in chunk], [e[1] for e in chunk], max_new_tokens=1, do_sample=False, pad_token_id=pad)
            refined += [t.strip() == e[2] for t, e in zip(adapter.tokenizer.batch_decode(out.tokens, skip_special_tokens=True), chunk)]
        outcome[shift] = (np.array(base), np.array(refined))
        for name, hits in (("baseline", base), ("VGRefine", refined)):
            lo, hi = wilson(sum(hits), n)
            print(f"{'shifted' if shift else 'source '} {name:8}: {100 * sum(hits) / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] of {n} items")
    (b_src, _), (b_sh, v_sh) = outcome[False], outcome[True]
    assert b_sh.mean() < b_src.mean()  # the shift costs the baseline accuracy
    gained, lost = int((v_sh & ~b_sh).sum()), int((b_sh & ~v_sh).sum())
    test = binomtest(gained, gained + lost)
    lo, hi = test.proportion_ci(0.95)
    diff = (gained - lost) / n
    print(
        f"shifted: VGRefine - baseline {100 * diff:+.1f} points ({gained} items gained, {lost} lost; McNemar exact p={test.pvalue:.2g}; "
        f"share of disagreements VGRefine wins {gained / (gained + lost):.2f} [{lo:.2f}, {hi:.2f}])"
    )
    assert lo > 0.5  # beyond noise: VGRefine wins significantly more of the items the two disagree on


def test_shifted_heatmaps_show_the_knockout_removing_the_disc(demo):
    """The saved question maps of the shifted task: the baseline's attention reaches the salient disc; under VGRefine,
    at the knockout layer, the disc's cells (found from the image's magenta pixels) get none."""
    from lmms_vg.demo import synthetic

    out, _ = demo
    base, refined = (report.load_maps(out / "maps" / m, "vgmed_demo_shifted_*") for m in ("lmms_vg_demo", "lmms_vg_demo_vgrefine"))
    layer = int(next(iter(refined.values()))["knockout_layers"][0])
    shares = {"baseline": [], "VGRefine": []}
    for name, m in base.items():
        rows, cols = (int(v) for v in m["grid"])
        image = np.asarray(m["image"], dtype=int)
        disc = np.abs(image - np.array(synthetic.SHIFT_COLOR)).sum(-1) < 120  # magenta through the noise
        cells = disc.reshape(rows, image.shape[0] // rows, cols, image.shape[1] // cols).mean((1, 3)).flatten() > 0.5
        for label, maps in (("baseline", m), ("VGRefine", refined[name])):
            q = np.asarray(maps["question_maps"][layer], dtype=np.float64)
            shares[label].append(q[cells].sum() / q.sum())
    print(
        f"\nshare of the question's attention on the disc at layer {layer}: "
        + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in shares.items())
    )
    assert np.mean(shares["baseline"]) > 0.05
    assert np.mean(shares["VGRefine"]) < np.mean(shares["baseline"]) / 10


def test_the_trainer_runs_end_to_end(tmp_path, monkeypatch):
    """``python -m lmms_vg.demo.train``, shortened (2 steps, a few scenes): the model folder loads and the heads file
    carries the ranked heads, the knockout layer and the percentile. The shipped model was trained on this path."""
    import sys

    from transformers import LlavaForConditionalGeneration

    from lmms_vg.demo import train
    from lmms_vg.methods.vgrefine import load_heads

    monkeypatch.setattr(train, "RANKING_SCENES", 4)
    monkeypatch.setattr(train, "SELECTION_SCENES", 8)
    monkeypatch.setattr(train, "SETTINGS", [(75.0, 8)])
    heads = tmp_path / "heads.json"
    argv = ["train", "--steps", "2", "--batch", "4", "--out", str(tmp_path / "model"), "--heads-out", str(heads)]
    monkeypatch.setattr(sys, "argv", argv)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        train.main()
    finally:
        torch.use_deterministic_algorithms(deterministic)
    ranking = load_heads(str(heads))
    assert len(ranking.heads) == 8 and ranking.percentile == 75.0 and len(ranking.knockout_layers) == 1
    assert "held-out shifted scenes" in ranking.source
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "model")
