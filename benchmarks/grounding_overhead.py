"""Per-sample cost of a grounding sample over plain generation of one token.

    python benchmarks/grounding_overhead.py [--shape 7b --device cuda --dtype bfloat16]

Variants, one sample each, interleaved: plain generation of one token (the baseline); grounding
with the image prefix shared by the question and the generic reference prompt (reference not
cached: every image new); grounding with the reference cached for the image (VGMED asks ~2.4
questions per image); and the naive way, two full forwards. Target: reference cached <= 1.1x.
On the LLaVA family the texts ride on the image prefix's own pass; on the Qwen2-VL family
(M-RoPE) they run as a suffix pass after it.
"""

from __future__ import annotations

import torch
from common import build, images, interleaved, parser, print_pass_counts, report, throughput

from lmms_vg import engine
from lmms_vg.grounding import GroundingRunner, GroundingSample
from lmms_vg.prompts import GENERIC_PROMPT, SHORT_ANSWER

QUESTION = "Where is the liver in this image?" + SHORT_ANSWER


def main() -> None:
    args = parser(__doc__).parse_args()
    adapter = build(args.shape, args.device, args.dtype, args.family)
    model, image = adapter.model, images(1, family=args.family)[0]
    box = [[40, 60, 200, 180]]
    uncached = GroundingRunner(adapter, GENERIC_PROMPT + SHORT_ANSWER, reference_cache_size=0)
    cached = GroundingRunner(adapter, GENERIC_PROMPT + SHORT_ANSWER, reference_cache_size=8)

    def plain_one_token():
        batch = adapter.encode([image], [QUESTION])
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=adapter.tokenizer.pad_token_id)

    def shared_prefix():
        uncached.score([GroundingSample(image, QUESTION, box, "xyxy")])

    def shared_prefix_cached():
        cached.score([GroundingSample(image, QUESTION, box, "xyxy", image_key="img")])

    def naive_two_passes():
        for text in (QUESTION, GENERIC_PROMPT + SHORT_ANSWER):
            batch = adapter.encode([image], [text])
            cols = engine.image_token_positions(batch["input_ids"], adapter.image_token_id)
            cap = engine.Capture(rows=torch.full((1, 1), batch["input_ids"].shape[1] - 1), cols=cols)
            with torch.no_grad(), engine.arm(model, capture=cap):
                model(**batch, logits_to_keep=1)

    seconds = interleaved(
        {
            "plain generation, 1 token": plain_one_token,
            "grounding, shared image prefix": shared_prefix,
            "grounding, reference cached": shared_prefix_cached,
            "grounding, naive two passes": naive_two_passes,
        },
        args.repeats,
        args.device,
    )
    print(f"shape={args.shape} device={args.device} dtype={args.dtype}")
    report("time per grounding sample", seconds, "plain generation, 1 token", ("grounding, reference cached", 1.1))
    layers = model.config.text_config.num_hidden_layers
    split = adapter.split_prompts([image], [QUESTION])
    prefix, question = len(split.prefix[0]), len(split.suffix[0])
    reference = len(adapter.split_prompts([image], [GENERIC_PROMPT + SHORT_ANSWER]).suffix[0])
    ride = adapter.positions_by_index  # the texts ride on the prefix's pass, else a suffix pass after it

    def shared(*texts):
        return [[(prefix, layers), (sum(texts), layers)]] if ride else [(prefix, layers), (sum(texts), layers)]

    print_pass_counts(
        {
            "plain generation, 1 token": [(prefix + question, layers)],
            "grounding, shared image prefix": shared(question, reference),
            "grounding, reference cached": shared(question),
            "grounding, naive two passes": [(prefix + question, layers), (prefix + reference, layers)],
        },
        layers,
    )
    pool = images(16, family=args.family)

    def batched(method, b):
        if method == "plain":
            with torch.no_grad():
                model.generate(
                    **adapter.encode(pool[:b], [QUESTION] * b),
                    max_new_tokens=1,
                    do_sample=False,
                    pad_token_id=adapter.tokenizer.pad_token_id,
                )
        else:
            uncached.score([GroundingSample(img, QUESTION, box, "xyxy") for img in pool[:b]])

    print("\nsamples per second by batch size")
    for method in ("plain", "grounding"):
        rates = throughput(lambda b, m=method: batched(m, b), args.batches, max(1, args.repeats // 3), args.device)
        print(f"{method:<12} " + "  ".join(f"batch {b}: {r:.2f}/s" for b, r in rates.items()))


if __name__ == "__main__":
    main()
