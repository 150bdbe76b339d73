"""Shared benchmark set-up: a random LLaVA of a chosen shape, and interleaved timing.

Timings are medians over interleaved repeats (variant A, B, C, A, B, C, ...), reported as ratios
to a baseline measured in the same run, so machine noise hits every variant alike.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from lmms_vg import engine
from lmms_vg.demo import tiny
from lmms_vg.families.llava import LlavaAdapter

# text shapes: (layers, heads, kv_heads, hidden); the image grid is 24x24 (336 px, patch 14) in all
SHAPES = {"small": (8, 8, 4, 512), "7b": (28, 28, 4, 3584)}


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="text model shape ('7b' needs a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--family", choices=["llava", "qwen2_vl"], default="llava", help="the model family's passes (Qwen2-VL: M-RoPE)")
    p.add_argument("--batches", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 4, 16), help="batch sizes for samples/s")
    return p


def build(shape: str, device: str, dtype: str, family: str = "llava"):
    """A random model of the shape and family; its image grid is 24 x 24 (576 tokens) for the benchmark images in both."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmms_vg.families.qwen2_vl import Qwen2VLAdapter
    from lmms_vg_models.loading import load_processor

    layers, heads, kv_heads, hidden = SHAPES[shape]
    folder = tempfile.mkdtemp(prefix="lmms_vg_bench_")
    atexit.register(shutil.rmtree, folder, True)  # the random checkpoint is loaded once and not needed after the run
    if family == "qwen2_vl":  # a 672-px square image: 48 x 48 patches of 14, merged 2 x 2
        tiny.build_qwen2_vl(folder, layers=layers, heads=heads, kv_heads=kv_heads, hidden=hidden, max_pixels=672 * 672)
    else:
        tiny.build_llava(folder, layers=layers, heads=heads, kv_heads=kv_heads, hidden=hidden, image_size=336)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    engine.install(model)
    if family == "qwen2_vl":
        return Qwen2VLAdapter(model, load_processor(folder, "main", False))
    return LlavaAdapter(model, AutoProcessor.from_pretrained(folder))


def spread_vgrefine_config(model, reference_prompt: str | None = None):
    """A VGRefine config for a random model: 20 heads spread over the middle layers, knockout at the middle layer."""
    from lmms_vg.methods.vgrefine import VGRefineConfig

    text = model.config.text_config
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    head_list = tuple((layer, h) for layer in range(1, layers - 1) for h in range(heads))[::2][:20]
    extra = {"reference_prompt": reference_prompt} if reference_prompt else {}
    return VGRefineConfig(heads=head_list, knockout_layers=(layers // 2,), **extra)


def images(n: int, seed: int = 0, family: str = "llava") -> list[Image.Image]:
    """Random images; for the Qwen2-VL family 672-px squares (24 x 24 merged tokens, as LLaVA's 336-px grid)."""
    rng = np.random.default_rng(seed)
    size = (lambda i: (672, 672)) if family == "qwen2_vl" else (lambda i: (300 + 10 * i, 360))
    return [Image.fromarray((rng.random((*size(i), 3)) * 255).astype("uint8")) for i in range(n)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each variant, measured round-robin after one warm-up each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, seconds: dict[str, float], baseline: str, target: tuple[str, float] | None = None) -> bool:
    print(f"\n{title}")
    print(f"{'variant':<34} {'ms':>10} {'x ' + baseline:>16}")
    for name, s in seconds.items():
        print(f"{name:<34} {1000 * s:>10.1f} {s / seconds[baseline]:>16.3f}")
    if target is None:
        return True
    name, limit = target
    ok = seconds[name] / seconds[baseline] <= limit
    print(f"target: {name} <= {limit}x {baseline}: {'met' if ok else 'NOT met'} ({seconds[name] / seconds[baseline]:.3f}x)")
    return ok


def print_pass_counts(rows: dict[str, list], layers: int) -> None:
    """Per sample, from the model's shape alone: each variant's forward passes, each a (tokens, layers run) pair, or a
    list of them for a pass whose rows leave at different depths (texts riding on the image prefix's pass).

    Prints the passes (a pass that stops early counts as its share of the layers), the layer passes
    (on a GPU each one reads that layer's weights: a short pass costs nearly a long one) and the
    token-layers (the arithmetic). Read with the measured times where no GPU is at hand.
    """
    print(f"\n{'variant':<34} {'passes':>8} {'layer passes':>13} {'token-layers':>13}")
    for name, passes in rows.items():
        groups = [p if isinstance(p, list) else [p] for p in passes]
        depths = [max(d for _, d in g) for g in groups]
        work = sum(t * d for g in groups for t, d in g)
        print(f"{name:<34} {sum(depths) / layers:>8.2f} {sum(depths):>13} {work:>13}")


def throughput(run: Callable[[int], object], batches: tuple[int, ...], repeats: int, device: str) -> dict[int, float]:
    """Samples per second of ``run(batch_size)`` at each batch size (median of ``repeats``, after a warm-up)."""
    out = {}
    for b in batches:
        seconds = interleaved({str(b): lambda b=b: run(b)}, repeats, device)[str(b)]
        out[b] = b / seconds
    return out
