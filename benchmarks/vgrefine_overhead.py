"""Time per sample of VGRefine vs the same model without it, and vs a naive three-pass VGRefine.

    python benchmarks/vgrefine_overhead.py [--shape 7b --device cuda --dtype bfloat16]

For one-token answers (closed-ended VQA) and 32-token answers. The naive version runs three full
prompts: question maps, reference maps, knocked-out generation. lmms-vg's runs the image prefix
once: on the LLaVA family the question and the generic prompt ride on its pass, then the
knocked-out question resumes at the knockout layer; on the Qwen2-VL family (M-RoPE) the two texts
run as one batched suffix pass after it. Targets for one-token answers: <= 1.15x the baseline
(LLaVA family), <= 1.3x (Qwen2-VL family); 32-token answers <= 1.1x.
"""

from __future__ import annotations

import torch
from common import build, images, interleaved, parser, print_pass_counts, report, spread_vgrefine_config, throughput

from lmms_vg import engine
from lmms_vg.methods.vgrefine import VGRefiner, triage_keep, triage_map
from lmms_vg.prompts import GENERIC_PROMPT, MC_INSTRUCTION

QUESTION = f"Is there a lesion in the left lung?\nA. yes\nB. no\n{MC_INSTRUCTION}"
REFERENCE = f"{GENERIC_PROMPT}\n{MC_INSTRUCTION}"


def main() -> None:
    args = parser(__doc__).parse_args()
    adapter = build(args.shape, args.device, args.dtype, args.family)
    model, image = adapter.model, images(1, family=args.family)[0]
    config = spread_vgrefine_config(model, REFERENCE)
    refiner = VGRefiner(adapter, config, reference_cache_size=0)  # every image new: no help from the cache
    pad = adapter.tokenizer.pad_token_id

    def generation(n):
        return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": pad}

    def baseline(n):
        batch = adapter.encode([image], [QUESTION])
        with torch.no_grad():
            model.generate(**batch, **generation(n))

    def vgrefine(n):
        refiner.generate([image], [QUESTION], **generation(n))

    def naive(n):
        maps = []
        for text in (QUESTION, REFERENCE):
            batch = adapter.encode([image], [text])
            cols = engine.image_token_positions(batch["input_ids"], adapter.image_token_id)
            cap = engine.Capture(rows=torch.full((1, 1), batch["input_ids"].shape[1] - 1), cols=cols)
            with torch.no_grad(), engine.arm(model, capture=cap):
                model(**batch, logits_to_keep=1)
            maps.append(cap.last_row_maps())
        keep = triage_keep(triage_map(maps[0], maps[1], config.selected), config.percentile)
        batch = adapter.encode([image], [QUESTION])
        T = batch["input_ids"].shape[1]
        cols = engine.image_token_positions(batch["input_ids"], adapter.image_token_id)
        blocked = torch.zeros(1, T, dtype=torch.bool).scatter_(1, cols.cpu(), ~keep)
        rows = engine.span_mask(T, cols[:, -1].cpu() + 1, [T])
        with torch.no_grad(), engine.arm(model, knockout=engine.Knockout(frozenset(config.knockout_layers), rows, blocked)):
            model.generate(**batch, **generation(n))

    print(
        f"shape={args.shape} device={args.device} dtype={args.dtype} heads={len(config.selected)} knockout_layers={config.knockout_layers}"
    )
    for n in (1, 32):
        seconds = interleaved(
            {
                f"baseline, {n} tokens": lambda n=n: baseline(n),
                f"VGRefine (lmms-vg), {n} tokens": lambda n=n: vgrefine(n),
                f"VGRefine naive 3-pass, {n} tokens": lambda n=n: naive(n),
            },
            args.repeats,
            args.device,
        )
        limit = (1.15 if args.family == "llava" else 1.3) if n == 1 else 1.1
        report(f"time per sample, {n}-token answers", seconds, f"baseline, {n} tokens", (f"VGRefine (lmms-vg), {n} tokens", limit))
        print_pass_counts(pass_rows(adapter, image, config, n), model.config.text_config.num_hidden_layers)
    pool = images(16, family=args.family)

    def batched(method, b):
        batch_images, texts = pool[:b], [QUESTION] * b
        if method == "baseline":
            with torch.no_grad():
                model.generate(**adapter.encode(batch_images, texts), **generation(1))
        else:
            refiner.generate(batch_images, texts, **generation(1))

    print("\nsamples per second, one-token answers, by batch size")
    for method in ("baseline", "VGRefine"):
        rates = throughput(lambda b, m=method: batched(m, b), args.batches, max(1, args.repeats // 3), args.device)
        print(f"{method:<12} " + "  ".join(f"batch {b}: {r:.2f}/s" for b, r in rates.items()))


def pass_rows(adapter, image, config, n: int) -> dict[str, list[tuple[int, int]]]:
    """(tokens, layers) of each pass per sample: prefill, VGRefine's shared-prefix passes, the naive three full prompts; n-1 decode steps."""
    layers = adapter.model.config.text_config.num_hidden_layers
    split = adapter.split_prompts([image], [QUESTION])
    prefix, question = len(split.prefix[0]), len(split.suffix[0])
    reference = len(adapter.split_prompts([image], [REFERENCE]).suffix[0])
    depth = max(config.map_layers) + 1  # the maps pass stops after the deepest selected head's layer
    resume = min(min(config.knockout_layers), depth)  # the knocked-out pass resumes there
    decode = [(1, layers)] * (n - 1)
    if adapter.positions_by_index:  # one pass: the prefix through every layer, both texts to the depth
        maps = [[(prefix, layers), (question + reference, depth)]]
    else:  # the prefix, then both texts as one batched suffix pass that stops at the depth
        maps = [(prefix, layers), (question + reference, depth)]
    return {
        f"baseline, {n} tokens": [(prefix + question, layers), *decode],
        f"VGRefine (lmms-vg), {n} tokens": [*maps, (question, layers - resume), *decode],
        f"VGRefine naive 3-pass, {n} tokens": [
            (prefix + question, layers),
            (prefix + reference, layers),
            (prefix + question, layers),
            *decode,
        ],
    }


if __name__ == "__main__":
    main()
