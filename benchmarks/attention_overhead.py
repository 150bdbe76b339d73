"""Forward time and memory of plain SDPA, SDPA + lmms-vg capture of all layers, and eager + output_attentions.

    python benchmarks/attention_overhead.py                 # CPU, a small shape
    python benchmarks/attention_overhead.py --shape 7b --device cuda --dtype bfloat16

Prints times as ratios to plain SDPA (same run, interleaved), peak memory of each variant, and the
bytes each keeps per sample for HuatuoGPT-Vision-7B's shape (28 layers, 28 heads, 576 image tokens,
700 tokens). Targets: capture <= 1.05x plain SDPA time; capture keeps <= 1/100 of output_attentions.
"""

from __future__ import annotations

import argparse

import torch
from common import build, images, interleaved, parser, report

from lmms_vg import engine
from lmms_vg.prompts import SHORT_ANSWER


def kept_bytes(layers=28, heads=28, n_image=576, tokens=700, attn_bytes=2) -> tuple[int, int]:
    """(capture: fp32 last-row maps, output_attentions: every layer's full bf16 weight matrix) per sample."""
    return layers * heads * n_image * 4, layers * heads * tokens * tokens * attn_bytes


def peak_memory(fn, device: str) -> float:
    """Peak MiB one call adds: the CUDA allocator's peak, or on CPU the growth of this process's peak RSS."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is what is live now
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def cpu_peaks(args, names) -> dict[str, float]:
    """On CPU each variant's peak is measured in a fresh process (peak RSS only grows within one)."""
    import subprocess
    import sys

    peaks = {}
    for name in names:
        cmd = [sys.executable, __file__, "--shape", args.shape, "--device", args.device, "--dtype", args.dtype, "--peak-of", name]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
        peaks[name] = float(out[-1])
    return peaks


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    adapter = build(args.shape, args.device, args.dtype, args.family)
    model = adapter.model
    batch = adapter.encode(images(1), [f"Where is the lesion?{SHORT_ANSWER}"])
    cols = engine.image_token_positions(batch["input_ids"], adapter.image_token_id)
    last = torch.full((1, 1), batch["input_ids"].shape[1] - 1, device=model.device)
    kept = {}

    def plain():
        with torch.no_grad():
            model(**batch, logits_to_keep=1)

    def capture():
        cap = engine.Capture(rows=last, cols=cols)
        with torch.no_grad(), engine.arm(model, capture=cap):
            model(**batch, logits_to_keep=1)
        kept["capture"] = cap.last_row_maps()

    def eager():
        model.set_attn_implementation({"text_config": "eager"})
        try:
            with torch.no_grad():
                kept["eager"] = model(**batch, output_attentions=True, logits_to_keep=1).attentions
        finally:
            model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})

    def sdpa():  # the same model on transformers' own SDPA, for reference
        model.set_attn_implementation({"text_config": "sdpa"})
        try:
            plain()
        finally:
            model.set_attn_implementation({"text_config": engine.ATTN_IMPLEMENTATION})

    variants = {
        "plain SDPA (transformers)": sdpa,
        "lmms-vg, nothing armed": plain,
        "lmms-vg capture, all layers": capture,
        "eager + output_attentions": eager,
    }
    if args.peak_of:  # child mode: the peak memory of one variant's first forward in a fresh process
        print(peak_memory(variants[args.peak_of], args.device))
        return
    seconds = interleaved(variants, args.repeats, args.device)
    tokens = batch["input_ids"].shape[1]
    print(f"shape={args.shape} device={args.device} dtype={args.dtype} tokens={tokens} layers={model.config.text_config.num_hidden_layers}")
    ok = report("forward time per sample", seconds, "plain SDPA (transformers)", ("lmms-vg capture, all layers", 1.05))
    print("\npeak memory added by one forward (MiB; CPU: first forward in a fresh process)")
    peaks = cpu_peaks(args, variants) if args.device == "cpu" else {k: peak_memory(fn, args.device) for k, fn in variants.items()}
    for name, mib in peaks.items():
        print(f"{name:<34} {mib:>10.1f}")
    cap_bytes = kept["capture"].numel() * kept["capture"].element_size()
    eager_bytes = sum(a.numel() * a.element_size() for a in kept["eager"])
    print(
        f"\nkept per sample, this run: capture {cap_bytes / 2**10:.1f} KiB vs output_attentions {eager_bytes / 2**20:.1f} MiB (1/{eager_bytes / cap_bytes:.0f})"
    )
    c7, e7 = kept_bytes()
    print(
        f"kept per sample, 7B shape (28x28 heads, 576 image tokens, 700 tokens, bf16 weights): capture {c7 / 2**20:.2f} MiB vs output_attentions {e7 / 2**20:.0f} MiB -> 1/{e7 / c7:.0f} (target <= 1/100: {'met' if e7 / c7 >= 100 else 'NOT met'})"
    )
    if not ok:
        print("note: the time target is for a quiet machine; rerun with more --repeats if it is close")


if __name__ == "__main__":
    main()
