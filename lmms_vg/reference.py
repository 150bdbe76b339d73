"""An eager attention written apart from the engine: full weight matrices, masks applied by hand.

The reference of the conformance battery (:mod:`lmms_vg.conformance`) and of the tests. Independent
of :mod:`lmms_vg.engine`: it shares no code with it, and applies knockout exactly as the two formulas
read (additive -inf before softmax; post-softmax multiply by the 0/1 mask), and steers as PAI's and
AdaptVis's code write it. Selected by ``attn_implementation="reference_eager"``; :data:`REFERENCE`
holds the knockout or steer of the pass.
"""

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

REFERENCE = {"knockout": None, "steer": None}  # knockout: {"layers", "rows" [B,T], "cols" [B,T], "mode"}; steer: below


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = query @ k.transpose(-1, -2) * scaling  # [B, H, q, kv]
    st = REFERENCE["steer"]  # {"layers", "cols" [B,T] bool, "kind", "value" [B], "steps": "all" | "prefill" | "decode"}
    prompt_pass = query.shape[2] > 1
    steps = {"all": True, "prefill": prompt_pass, "decode": not prompt_pass}
    steer_here = st is not None and module.layer_idx in st["layers"] and steps[st["steps"]]
    image = None
    if steer_here:
        image = torch.zeros(query.shape[0], key.shape[2], dtype=torch.bool)
        image[:, : min(key.shape[2], st["cols"].shape[1])] = st["cols"][:, : key.shape[2]]
    if steer_here and st["kind"] == "scale":  # AdaptVis: attn_weights[:, :, -1, image] *= weight, before the mask
        for b in range(query.shape[0]):
            scores[b, :, -1, image[b]] = scores[b, :, -1, image[b]] * float(st["value"][b])
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : k.shape[-2]]
        scores = torch.max(scores, torch.tensor(torch.finfo(scores.dtype).min))
    if steer_here and st["kind"] == "amplify":  # PAI: a[:, :, -1, image] = |a| * alpha + a, after the mask
        for b in range(query.shape[0]):
            a = scores[b, :, -1, image[b]]
            scores[b, :, -1, image[b]] = a.abs() * float(st["value"][b]) + a
    ko = REFERENCE["knockout"]
    q_len, kv_len = query.shape[2], key.shape[2]
    block = None
    if ko is not None and module.layer_idx in ko["layers"]:
        start = kv_len - q_len
        rows = torch.zeros(query.shape[0], q_len, dtype=torch.bool)
        cols = torch.zeros(query.shape[0], kv_len, dtype=torch.bool)
        T = ko["rows"].shape[1]
        for b in range(query.shape[0]):
            for i in range(q_len):
                if start + i < T:
                    rows[b, i] = ko["rows"][b, start + i]
            for j in range(min(kv_len, T)):
                cols[b, j] = ko["cols"][b, j]
        block = rows[:, None, :, None] & cols[:, None, None, :]
        if ko["mode"] == "mask":
            scores = scores.masked_fill(block, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if block is not None and ko["mode"] == "zero":
        weights = weights * (~block).to(weights.dtype)
    out = weights @ v
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register("reference_eager", reference_attention)
AttentionMaskInterface.register("reference_eager", eager_mask)
