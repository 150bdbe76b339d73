"""What the paper's full evaluation costs: GPU-hours per model and method, and wall-time on 1, 8 and 32 GPUs (an estimate).

    .venv/bin/python benchmarks/full_evaluation.py                     # the paper's item sets
    .venv/bin/python benchmarks/full_evaluation.py --open-access       # OmniMedVQA's ~89K open-access items instead
    .venv/bin/python benchmarks/full_evaluation.py --tflops 300        # another effective throughput

How it is estimated (no GPU run is needed, none is claimed): each item's work is counted in
token-layers, as the VGRefine and methods benchmarks count the passes lmms-vg makes (an image's tokens
plus the prompt through every layer; VGRefine's shared-prefix maps pass to its deepest head's layer and
its knocked-out pass resumed from the knockout layer; PAI's guidance a second, text-only stream; AdaptVis's
confidence pass then its steered one; ViCrop's two attention passes then an answer from image and crop);
a token-layer costs twice the layer's parameters in FLOPs; the GPU delivers ``--tflops`` effective
(default 150 bf16 TFLOP/s: about 15% of an H100's dense peak, allowing for transformers' generate loop,
small decode steps, the vision tower and data loading; batched prefill alone reaches more); decoding is
a few tokens per closed item (a letter) and is counted as such. Measured ratios on a GPU (the other
benchmarks with ``--device cuda``) replace these where at hand.
"""

from __future__ import annotations

import argparse

# the paper's item sets (HuatuoGPT-Vision's bundle) and VGMED's medical and COCO grounding samples (the paper's Section 3)
VQA_ITEMS = {"VQA-RAD": 251, "SLAKE": 416, "PathVQA": 3362, "PMC-VQA": 2000, "OmniMedVQA": 11124, "MMMU H&M": 150}
OPEN_ACCESS_OMNIMEDVQA = 88996
VGMED_ITEMS = 13962 * 2  # localisation and attribute questions per sample (28K)
# the paper's eight models by shape: (how many, text layers, parameters per text layer, image tokens)
SHAPES = {
    "HuatuoGPT-Vision-7B, HuatuoGPT-V-Bio (Qwen2-7B)": (2, 28, 233e6, 576),
    "LLaVA-Med, LLaVA-Tri, VILA-M3-8B (7-8B)": (3, 32, 218e6, 576),
    "VILA-M3-13B (13B)": (1, 40, 318e6, 196),
    "HuatuoGPT-Vision-34B (Yi-1.5-34B)": (1, 60, 560e6, 576),
    "MedRegA (Yi-34B)": (1, 60, 560e6, 256),
}
TEXT_TOKENS, REFERENCE_TOKENS, ANSWER_TOKENS = 60, 25, 3  # question + options + template; the generic prompt; a letter


def token_layers(method: str, layers: int, image: int) -> float:
    """Token-layers of one item under a method (the passes lmms-vg makes, counted as the benchmarks count them)."""
    prompt = image + TEXT_TOKENS
    decode = ANSWER_TOKENS * layers
    depth, resume = layers * 0.6, layers * 0.55  # the deepest selected head's layer and the knockout layer (layer 16 of 28)
    if method == "baseline":
        return prompt * layers + decode
    if method == "VGRefine":  # the prefix through every layer with both texts riding to the depth; the question resumed
        return image * layers + (TEXT_TOKENS + REFERENCE_TOKENS) * depth + TEXT_TOKENS * (layers - resume) + decode
    if method == "PAI":  # the image prompt and the text-only guidance prompt, each decoded
        return prompt * layers + TEXT_TOKENS * layers + 2 * decode
    if method == "AdaptVis":  # a plain pass for the confidence, then the steered generation
        return 2 * prompt * layers + decode
    if method == "ViCrop":  # question and generic prompt to the attention layer, then image + crop
        return (image + TEXT_TOKENS + REFERENCE_TOKENS) * layers * 0.5 + (2 * image + TEXT_TOKENS) * layers + decode
    raise ValueError(method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=150.0, help="effective bf16 TFLOP/s of one GPU")
    parser.add_argument("--open-access", action="store_true", help="OmniMedVQA's open-access items (~89K) instead of the paper's 11,124")
    args = parser.parse_args()
    items = dict(VQA_ITEMS, **({"OmniMedVQA": OPEN_ACCESS_OMNIMEDVQA} if args.open_access else {}))
    n_vqa = sum(items.values())
    methods = ("baseline", "VGRefine", "PAI", "AdaptVis", "ViCrop")
    print(
        f"{n_vqa:,} VQA items ({'open-access OmniMedVQA' if args.open_access else 'the paper item sets'}) + {VGMED_ITEMS:,} VGMED grounding samples"
    )
    print(f"effective throughput {args.tflops:.0f} TFLOP/s per GPU (an assumption; see the docstring)\n")
    print("GPU-hours per model:")
    print(f"{'model (shape)':<50}" + "".join(f"{m:>10}" for m in methods) + f"{'grounding':>11}")
    total = 0.0
    for name, (count, layers, per_layer, image) in SHAPES.items():
        flop = 2 * per_layer  # per token-layer
        hours = [n_vqa * token_layers(m, layers, image) * flop / (args.tflops * 1e12) / 3600 for m in methods]
        ground = VGMED_ITEMS * (image + TEXT_TOKENS + REFERENCE_TOKENS) * layers * flop / (args.tflops * 1e12) / 3600
        total += count * (sum(hours) + ground)
        print(f"{name:<50}" + "".join(f"{h:>9.1f}h" for h in hours) + f"{ground:>10.1f}h")
    print(f"\nGPU-hours, the eight models with every method and VGMED: {total:.0f}")
    for gpus in (1, 8, 32):
        print(f"  wall-time on {gpus:>2} GPU(s), shards balanced: {total / gpus:6.1f} h")


if __name__ == "__main__":
    main()
