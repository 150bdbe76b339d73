"""Time per sample of each inference-time method beside the same model without one, side by side in one run.

    python benchmarks/methods_overhead.py [--shape 7b --device cuda --dtype bfloat16]

VGRefine (shared image prefix, three short passes), PAI (steered attention every step, plus a
text-only guidance run), AdaptVis (a confidence pass, then a steered generation) and ViCrop
(relative-attention maps at one layer, then an answer with the original image and a crop: twice
the image tokens). For one-token answers (closed-ended VQA) and 32-token answers. Each method's
cost is printed as a ratio to the baseline measured in the same run, and its passes per sample.
"""

from __future__ import annotations

import torch
from common import build, images, interleaved, parser, report, spread_vgrefine_config

from lmms_vg import methods
from lmms_vg.methods.vgrefine import VGRefiner
from lmms_vg.prompts import MC_INSTRUCTION

QUESTION = f"Is there a lesion in the left lung?\nA. yes\nB. no\n{MC_INSTRUCTION}"

PASSES = {  # forward passes over the prompt per sample, from the methods' definitions (decode steps aside)
    "baseline": "1 full prompt",
    "VGRefine": "1 pass of the image prefix with the question and the generic prompt riding on it + the question from the knockout layer up",
    "PAI": "1 full prompt (steered) + 1 text-only prompt (guidance); each decode step: 2 tokens",
    "AdaptVis": "2 full prompts (a plain one for the confidence, then the steered one)",
    "ViCrop": "1 batched pass of 2 full prompts up to its layer + 1 prompt with 2 images",
}


def main() -> None:
    args = parser(__doc__).parse_args()
    adapter = build(args.shape, args.device, args.dtype, args.family)
    model, image = adapter.model, images(1, family=args.family)[0]
    layers = model.config.text_config.num_hidden_layers
    refiner = VGRefiner(adapter, spread_vgrefine_config(model), reference_cache_size=0)
    configs = {
        "PAI": methods.PaiConfig(),
        "AdaptVis": methods.AdaptVisConfig(),
        "ViCrop": methods.ViCropConfig(layer=min(14, layers - 1)),
    }
    run = {"PAI": methods.pai_generate, "AdaptVis": methods.adaptvis_generate, "ViCrop": methods.vicrop_generate}
    pad = adapter.tokenizer.pad_token_id

    def generation(n):
        return {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": pad}

    def baseline(n):
        with torch.no_grad():
            model.generate(**adapter.encode([image], [QUESTION]), **generation(n))

    print(f"shape={args.shape} device={args.device} dtype={args.dtype} layers={layers}")
    for name, passes in PASSES.items():
        print(f"  {name:<10} {passes}")
    for n in (1, 32):
        variants = {f"baseline, {n} tokens": lambda n=n: baseline(n)}
        variants[f"VGRefine, {n} tokens"] = lambda n=n: refiner.generate([image], [QUESTION], **generation(n))
        for name, config in configs.items():
            variants[f"{name}, {n} tokens"] = lambda n=n, name=name, config=config: run[name](
                adapter, [image], [QUESTION], config, **generation(n)
            )
        seconds = interleaved(variants, args.repeats, args.device)
        report(f"time per sample, {n}-token answers", seconds, f"baseline, {n} tokens")


if __name__ == "__main__":
    main()
