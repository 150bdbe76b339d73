"""The transformers internals the faster paths need, detected at load both ways, and the exact fallback each takes.

Expectations come from the installed transformers' version (its release notes: the cache keyword
became ``cache`` in 5.24), not from the detection code; every fallback is held equal to the fast path.
"""

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from packaging.version import Version
from test_engine import QUESTIONS, load_llava, load_qwen2_vl
from test_vgrefine import HEADS, reference_vgrefine

from lmms_vg import engine, internals, passes
from lmms_vg.families.llava import LlavaAdapter
from lmms_vg.families.qwen2_vl import Qwen2VLAdapter
from lmms_vg.grounding import GroundingRunner
from lmms_vg.methods.vgrefine import VGRefineConfig, VGRefiner

CACHE = "cache" if Version(transformers.__version__) >= Version("5.24.0") else "past_key_values"
REF_PROMPT = "Write a general description of the image."
GENERATE = {"max_new_tokens": 5, "do_sample": False, "output_logits": True}


def refine(model, processor, images):
    adapter = LlavaAdapter(model, processor)
    config = VGRefineConfig(heads=HEADS, knockout_layers=(2,), top_k=3, percentile=50, reference_prompt=REF_PROMPT)
    return VGRefiner(adapter, config, reference_cache_size=0).generate(images, QUESTIONS[: len(images)], **GENERATE)


def test_shipped_families_get_every_fast_path(llava_dir, qwen2_vl_dir):
    llava, _ = load_llava(llava_dir)
    assert internals.of(llava) == internals.Internals(CACHE, CACHE, row_cut=True, rope_deltas=False)
    qwen, _, _ = load_qwen2_vl(qwen2_vl_dir)
    assert internals.of(qwen) == internals.Internals(CACHE, CACHE, row_cut=True, rope_deltas=True)


def rename_layer_inputs(model):
    """Decoder layers whose signature names their cache and inputs as no transformers release does (what a future release might)."""
    layers = engine.text_decoder_layers(model)
    base = type(layers[0])

    class Renamed(base):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, kv_store=None, token_weights=None, **kwargs):
            return base.forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    for layer in layers:
        layer.__class__ = Renamed


def test_unknown_layer_signature_takes_the_exact_path_and_says_so(llava_dir, images, caplog):
    """Detected at load: no resume, no row cut; VGRefine's answers equal the three-pass reference and the fast path's."""
    model, processor = load_llava(llava_dir)
    fast = refine(model, processor, images)
    calls = []
    hook = engine.text_decoder_layers(model)[0].register_forward_pre_hook(lambda *_: calls.append(1))
    fast_calls, calls[:] = None, []
    try:
        refine(model, processor, images)
        fast_calls, calls[:] = len(calls), []
        rename_layer_inputs(model)
        with caplog.at_level(logging.WARNING, logger="lmms_vg.internals"):
            engine.install(model)
        slow = refine(model, processor, images)
    finally:
        hook.remove()
    found = internals.of(model)
    assert (found.layer_cache_kwarg, found.row_cut) == (None, False)
    lines = [r.getMessage() for r in caplog.records]
    assert any(transformers.__version__ in line and "runs from layer 0" in line for line in lines)
    assert any(transformers.__version__ in line and "every row" in line for line in lines)
    assert len(calls) == fast_calls + 1  # layer 0 ran once more: the knocked-out pass did not resume
    assert torch.equal(slow.tokens, fast.tokens) and torch.equal(slow.keep, fast.keep)
    assert torch.allclose(slow.first_logits, fast.first_logits, atol=1e-5, rtol=0)
    tokens, logits, _ = reference_vgrefine(model, processor, images, QUESTIONS[:2], 3, 50, (2,), "mask", 5)
    assert torch.equal(slow.tokens, tokens) and torch.allclose(slow.first_logits, logits, atol=1e-4, rtol=0)


def test_a_resume_that_fails_in_a_pass_turns_itself_off_with_equal_outputs(llava_dir, images, caplog):
    """Detection passed but the layers are handed the cache under another name: the pass reruns from layer 0, once and for all."""
    model, processor = load_llava(llava_dir)
    fast = refine(model, processor, images)
    wrong = "past_key_values" if CACHE == "cache" else "cache"
    model._lmms_vg_internals = dataclasses.replace(internals.of(model), layer_cache_kwarg=wrong)
    with caplog.at_level(logging.WARNING, logger="lmms_vg.internals"):
        slow = refine(model, processor, images)
    assert internals.of(model).layer_cache_kwarg is None
    assert any("resume" in r.getMessage() and transformers.__version__ in r.getMessage() for r in caplog.records)
    assert torch.equal(slow.tokens, fast.tokens)
    assert torch.allclose(slow.first_logits, fast.first_logits, atol=1e-5, rtol=0)


def test_a_row_cut_that_meets_an_unknown_input_reruns_uncut(llava_dir, images, monkeypatch):
    """The pre-hook refuses a per-token input it does not know; the prefix pass reruns with every row to the top, same maps."""
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)

    def maps_of_layer_1():  # captured up to layer 1: above it the cut applies
        return passes.Passes(adapter, 0).batch(images, QUESTIONS[:2]).question_and_reference(REF_PROMPT, frozenset({1}))

    fast = maps_of_layer_1()
    hook = passes.prefix_rows_only(4)
    with pytest.raises(internals.Unsupported, match="token_weights"):
        hook(None, (torch.zeros(1, 8, 2),), {"token_weights": torch.ones(1, 8)})
    cut = []

    def refusing(width):
        def refuse(module, args, kwargs):
            cut.append(width)
            raise internals.Unsupported("row cut", "a test input")

        return refuse

    monkeypatch.setattr(passes.prefix, "prefix_rows_only", refusing)
    slow = maps_of_layer_1()
    assert cut and internals.of(model).row_cut is False
    for a, b in zip(fast, slow):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_m_rope_without_its_shift_runs_full_prompts(qwen2_vl_dir, images):
    """A Qwen2-VL model that keeps no ``rope_deltas`` cannot share its prefix: full prompts, the same maps."""
    model, tokenizer, image_processor = load_qwen2_vl(qwen2_vl_dir)
    adapter = Qwen2VLAdapter(model, SimpleNamespace(tokenizer=tokenizer, image_processor=image_processor))
    assert adapter.shares_prefix
    same_grid = [images[0], images[0]]  # one prefix length per batch
    shared = GroundingRunner(adapter, REF_PROMPT, 0).question_and_reference_maps(same_grid, QUESTIONS[:2], [None, None])
    model._lmms_vg_internals = dataclasses.replace(internals.of(model), rope_deltas=False)
    assert not adapter.shares_prefix
    full = GroundingRunner(adapter, REF_PROMPT, 0).question_and_reference_maps(same_grid, QUESTIONS[:2], [None, None])
    for a, b in zip(shared, full):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_detection_reads_signatures_and_attributes():
    """Each check both ways, on stand-ins: the cache keyword by either name or neither, the row cut's inputs, M-RoPE's shift."""

    def layer_class(forward):
        return type("Layer", (torch.nn.Module,), {"forward": forward})

    def model_with(forward, layer_forward, base=None):
        model = SimpleNamespace(forward=forward, model=base)
        return model, [layer_class(layer_forward)()]

    def new(input_ids=None, cache=None, **kwargs): ...
    def old(input_ids=None, past_key_values=None, **kwargs): ...
    def layer_new(
        self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False, position_embeddings=None, **kw
    ): ...
    def layer_old(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, position_embeddings=None): ...
    def layer_other(self, hidden_states, attention_mask=None, kv=None, token_types=None): ...

    assert internals.detect(*model_with(new, layer_new)) == internals.Internals("cache", "cache", True, False)
    assert internals.detect(*model_with(old, layer_old)) == internals.Internals("past_key_values", "past_key_values", True, False)
    assert internals.detect(*model_with(old, layer_other)) == internals.Internals("past_key_values", None, False, False)
    m_rope = SimpleNamespace(get_rope_index=lambda *a: None, rope_deltas=None)
    assert internals.detect(*model_with(new, layer_new, m_rope)).rope_deltas
    assert not internals.detect(*model_with(new, layer_new, SimpleNamespace(get_rope_index=lambda *a: None))).rope_deltas
