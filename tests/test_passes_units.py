"""The passes, part by part, at the edges where a shared prefix, a resumed pass or the reference cache could go wrong unseen.

References: eager attention over whole prompts (``test_vgrefine.last_row_maps``), the full-prompt passes (themselves
held to eager attention in test_engine), the image processor's own grid, and values written by hand.
"""

import dataclasses

import pytest
import torch
from test_engine import QUESTIONS, load_llava
from test_vgrefine import REF_PROMPT, last_row_maps

from lmms_vg import engine, internals
from lmms_vg.families.llava import LlavaAdapter
from lmms_vg.methods.base import Steering
from lmms_vg.methods.vgrefine import VGRefineConfig, VGRefiner
from lmms_vg.passes import (
    FullPromptBatch,
    Passes,
    ReferenceCache,
    Resume,
    SharedPrefixBatch,
    can_resume,
    same_grid,
)
from lmms_vg.passes.prefix import truncate, with_text_after

ATOL = 1e-5
CONFIG = VGRefineConfig(heads=((1, 0), (2, 1), (1, 3)), knockout_layers=(2,), top_k=3, reference_prompt=REF_PROMPT)


@pytest.fixture
def llava(llava_dir):
    model, processor = load_llava(llava_dir)
    return model, processor, LlavaAdapter(model, processor)


def load(checkpoint, request):
    from lmms_vg.families.qwen2_vl import Qwen2VLAdapter
    from lmms_vg.presets import family_of
    from lmms_vg_models.loading import load_checkpoint

    family = "llava" if checkpoint == "llava_dir" else "qwen2_vl"
    path = str(request.getfixturevalue(checkpoint))
    model, processor = load_checkpoint(path, family_of(family).model_types, torch.float32, None, "main", False)
    engine.install(model)
    return model, processor, (LlavaAdapter if family == "llava" else Qwen2VLAdapter)(model, processor)


def batches(adapter, images, texts, keys=None):
    keys = keys or [None] * len(images)
    return SharedPrefixBatch(adapter, images, texts, keys, ReferenceCache(0)), FullPromptBatch(
        adapter, images, texts, keys, ReferenceCache(0)
    )


def count_runs(layer, into: list):
    """A hook noting the rows a decoder layer ran on, per call (after the pass's own hooks cut them)."""
    return layer.register_forward_hook(lambda _m, _args, out: into.append((out[0] if isinstance(out, tuple) else out).shape[1]))


# --- plain helpers, by hand -----------------------------------------------------------------------------------------


def test_only_plain_greedy_decoding_resumes(llava):
    """A resumed pass reproduces the first token as the argmax: a sampler, beams, a penalty or any logits edit, set by the
    call or by the checkpoint's generation config, takes the full pass; so does a call that leaves the length to generate()."""
    model = llava[0]
    plain = {"do_sample": False, "num_beams": 1, "max_new_tokens": 4}
    assert can_resume(model, plain) and can_resume(
        model, {**plain, "logits_processor": [], "repetition_penalty": 1.0, "guidance_scale": 1.0}
    )
    assert not can_resume(model, {"do_sample": False})
    edits = [{"do_sample": True}, {"num_beams": 2}, {"logits_processor": [object()]}, {"repetition_penalty": 1.2}]
    edits += [{"min_new_tokens": 1}, {"guidance_scale": 1.5}, {"no_repeat_ngram_size": 2}, {"suppress_tokens": [3]}]
    for edit in edits:
        assert not can_resume(model, {**plain, **edit}), edit
    model.generation_config.repetition_penalty = 1.05  # as Qwen2.5-VL's generation_config.json ships it
    assert not can_resume(model, plain) and can_resume(model, {**plain, "repetition_penalty": 1.0})
    model.generation_config.repetition_penalty, model.generation_config.do_sample = 1.0, True
    assert not can_resume(model, {"num_beams": 1, "max_new_tokens": 4}) and can_resume(model, plain)


def test_reference_cache_drops_the_least_recently_used():
    cache, a, b, c = ReferenceCache(2), torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") is a  # now the most recently used: b goes first
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") is a and cache.get("c") is c
    cache.put("d", b)  # c was used after a: a goes
    assert cache.get("a") is None and cache.get("c") is c and cache.get("d") is b
    off = ReferenceCache(0)
    off.put("a", a)
    assert off.get("a") is None
    cache.put(None, a)  # an image without a key is never cached
    assert cache.get(None) is None


def test_with_text_after_gives_the_texts_type_zero():
    """Per-token inputs of the prefix (``[B, width]``) are widened with zeros for the texts after it; anything else passes as is."""
    types = torch.tensor([[0, 1, 1], [0, 2, 2]])
    grid = torch.tensor([[1, 4, 4, 4]])  # 2-D but not per token (another width)
    flat = torch.tensor([1, 1, 1])  # per token, not per sample
    out = with_text_after({"token_type_ids": types, "grid": grid, "flat": flat, "name": "x"}, width=3, total=5)
    assert torch.equal(out["token_type_ids"], torch.tensor([[0, 1, 1, 0, 0], [0, 2, 2, 0, 0]]))
    assert out["grid"] is grid and out["flat"] is flat and out["name"] == "x"
    assert with_text_after({}, 3, 5) == {}


def test_same_grid_groups_by_the_processors_own_grid(qwen2_vl_dir, llava, images, request):
    """Qwen's dynamic resolution: images of two sizes are two prefixes, grouped as the image processor grids them; LLaVA: one."""
    from conftest import random_image

    _, _, adapter = load("qwen2_vl_dir", request)
    imgs = [images[0], random_image(300, 120, 3), images[0], images[1], random_image(300, 120, 4)]
    grids = adapter.processor.image_processor(images=imgs, return_tensors="pt")["image_grid_thw"].tolist()
    expected: dict = {}
    for n, grid in enumerate(grids):
        expected.setdefault(tuple(grid), []).append(n)
    assert len(expected) >= 3 and same_grid(adapter, imgs) == list(expected.values())
    assert same_grid(llava[2], imgs) == [[0, 1, 2, 3, 4]]


def test_the_resume_watch_reads_a_layer_that_returns_a_tuple(llava):
    """Decoder layers of some releases and families return ``(hidden, ...)``, others the tensor alone: the watch takes either."""
    model, _, _ = llava
    hidden = torch.randn(2, 7, 64)
    for returned in (hidden, (hidden, None)):
        resume = Resume(depth=2, width=3)
        handle = resume.watch(model, slice(1, None), 2)
        try:
            layer = engine.text_decoder_layers(model)[1]
            layer._forward_hooks[handle.id](layer, (), returned)
        finally:
            handle.remove()
        assert torch.equal(resume.hidden, hidden[1:, 2:5])


# --- maps: the shared prefix against whole prompts --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["prefix pass", "suffix pass", "steered", "full prompts"])
def test_maps_of_chosen_layers_stop_at_the_deepest(llava, images, path):
    """``layers={1}``: layer 1 equals eager attention over the whole prompts, layer 0 is left zero, and no text row reaches
    layer 2 (the prefix's own pass carries only the prefix's rows there, to fill its cache)."""
    model, processor, adapter = llava
    shared, full = batches(adapter, images, QUESTIONS)
    batch = full if path == "full prompts" else shared
    if path in ("suffix pass", "steered"):
        assert shared.state is not None  # the prefix runs alone first: the texts' maps come from a pass of their own
    steer = Steering("amplify", frozenset({1}), torch.zeros(2), "all") if path == "steered" else None  # a steer of 0 edits nothing
    rows = []
    hook = count_runs(engine.text_decoder_layers(model)[2], rows)
    try:
        (maps,) = batch.maps([QUESTIONS], frozenset({1}), steer)
    finally:
        hook.remove()
    _, _, eager = last_row_maps(model, processor, images, QUESTIONS)
    assert maps.shape == (2, 2, 4, eager.shape[-1])
    assert torch.allclose(maps[:, 1], eager[:, 1], atol=ATOL, rtol=0) and not maps[:, 0].any()
    prefix = len(shared.prefix[0])
    assert rows == ([prefix] if path == "prefix pass" else [])


@pytest.mark.parametrize("checkpoint", ["llava_dir", "qwen2_vl_dir"])
def test_a_checkpoint_saved_without_cache_still_shares_its_prefix(checkpoint, request, images):
    """A config saved with ``use_cache: false`` (as training with gradient checkpointing leaves it): the prefix's pass still
    fills its cache, so maps and the knocked-out answer equal whole prompts'."""
    model, _, adapter = load(checkpoint, request)
    for config in (model.config, model.config.get_text_config()):
        config.use_cache = False
    imgs = [images[0]] * 2
    shared, full = batches(adapter, imgs, QUESTIONS)
    q_s, r_s = shared.question_and_reference(REF_PROMPT)
    q_f, r_f = full.question_and_reference(REF_PROMPT)
    assert torch.allclose(q_s, q_f, atol=ATOL, rtol=0) and torch.allclose(r_s, r_f, atol=ATOL, rtol=0)
    keep = torch.ones(2, q_s.shape[-1], dtype=torch.bool)
    keep[:, ::3] = False
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "pad_token_id": adapter.tokenizer.pad_token_id}
    tokens_s, logits_s = shared.generate(shared.knockout(keep, (1,), "mask"), **kwargs)
    tokens_f, logits_f = full.generate(full.knockout(keep, (1,), "mask"), **kwargs)
    assert torch.equal(tokens_s, tokens_f) and torch.allclose(logits_s, logits_f, atol=1e-4, rtol=0)


# --- the questions and the generic prompt, with and without the cache -------------------------------------------------


def resumed_and_full(adapter, images, config=CONFIG, **kwargs):
    """VGRefine's answers with the knocked-out pass resumed and run whole, and the rows layer 0 ran on in the resumed one."""
    calls = []
    hook = count_runs(engine.text_decoder_layers(adapter.model)[0], calls)
    try:
        resumed = VGRefiner(adapter, config).generate(images, QUESTIONS, **kwargs)
    finally:
        hook.remove()
    return resumed, VGRefiner(adapter, config, share_layers=False).generate(images, QUESTIONS, **kwargs), calls


def spy_sets(batch) -> list[int]:
    """How many sets of texts each of ``batch``'s map passes carries."""
    calls, maps = [], batch.maps

    def counted(text_sets, *args, **kwargs):
        calls.append(len(text_sets))
        return maps(text_sets, *args, **kwargs)

    batch.maps = counted
    return calls


def test_no_generic_prompt_runs_the_questions_alone(llava, images):
    model, processor, adapter = llava
    batch = Passes(adapter, 8).batch(images, QUESTIONS, ["img0", "img1"])
    sets = spy_sets(batch)
    question, reference = batch.question_and_reference(None)
    _, _, eager = last_row_maps(model, processor, images, QUESTIONS)
    assert reference is None and sets == [1] and torch.allclose(question, eager, atol=ATOL, rtol=0)


def test_cached_references_leave_the_questions_pass_alone_and_steered(llava, images):
    """Every reference cached: one pass of the questions only, under the same steer as without the cache."""
    _, _, adapter = llava
    keys = ["img0", "img1"]
    steer = Steering("amplify", frozenset({0, 1, 2}), torch.tensor([5.0, 9.0]), "all")
    cached = Passes(adapter, 8)
    first_q, first_r = cached.batch(images, QUESTIONS, keys).question_and_reference(REF_PROMPT, steer=steer)
    again = cached.batch(images, QUESTIONS, keys)
    sets = spy_sets(again)
    second_q, second_r = again.question_and_reference(REF_PROMPT, steer=steer)
    fresh_q, fresh_r = Passes(adapter, 0).batch(images, QUESTIONS, keys).question_and_reference(REF_PROMPT, steer=steer)
    plain_q, _ = Passes(adapter, 0).batch(images, QUESTIONS, keys).question_and_reference(REF_PROMPT)
    assert sets == [1]
    assert torch.allclose(second_q, fresh_q, atol=ATOL, rtol=0) and torch.equal(second_r, first_r)
    assert torch.allclose(first_q, fresh_q, atol=ATOL, rtol=0) and torch.allclose(first_r, fresh_r, atol=ATOL, rtol=0)
    assert not torch.allclose(second_q, plain_q, atol=1e-3)  # the steer shows


def test_one_cached_reference_is_reused_and_the_other_computed(llava, images):
    model, processor, adapter = llava
    cached = Passes(adapter, 8)
    cached.batch(images[:1], QUESTIONS[:1], ["img0"]).question_and_reference(REF_PROMPT)
    batch = cached.batch(images, QUESTIONS, ["img0", "img1"])
    sets = spy_sets(batch)
    question, reference = batch.question_and_reference(REF_PROMPT)
    _, _, eager = last_row_maps(model, processor, images, [REF_PROMPT] * 2)
    assert sets == [2] and torch.allclose(reference, eager, atol=ATOL, rtol=0)
    assert torch.allclose(question, last_row_maps(model, processor, images, QUESTIONS)[2], atol=ATOL, rtol=0)


# --- the resumed knocked-out pass ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["call", "generation_config"])
def test_a_resumed_answer_stops_at_its_eos(llava, images, where):
    """The end of sequence given by the caller or by the model's generation config: a sample whose first new token is it is
    padded after it with the caller's pad token, as ``generate()`` pads a finished sample; the other goes on. Resumed and
    full passes give the same tokens."""
    model, _, adapter = llava
    pad = 0 if adapter.tokenizer.pad_token_id != 0 else 1  # not the tokenizer's: the caller's pad token is the one used
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": pad}
    probe = VGRefiner(adapter, CONFIG, share_layers=False).generate(images, QUESTIONS, **kwargs).tokens
    eos = int(probe[0, 0])
    assert eos != model.generation_config.eos_token_id and eos not in probe[1] and pad not in probe
    if where == "call":
        kwargs["eos_token_id"] = eos
    else:
        model.generation_config.eos_token_id = eos
    resumed, full, calls = resumed_and_full(adapter, images, **kwargs)
    assert torch.equal(resumed.tokens, full.tokens) and resumed.first_logits is None
    assert resumed.tokens[0, 0] == eos and (resumed.tokens[0, 1:] == pad).all() and torch.equal(resumed.tokens[1], probe[1])
    assert len(calls) == 1 + 3  # the prefix with both texts once, then the 3 later tokens: the first new one resumed at layer 2


@pytest.mark.parametrize("keyword", ["no_such_keyword", "attention_mask"])  # nothing under it; a tensor, not a cache
def test_a_resumed_pass_that_fails_falls_back_to_the_exact_pass(llava, images, monkeypatch, keyword):
    """A decoder layer that hands the resumed layer no cache: the path is turned off for the model, the answer is the full pass's."""
    model, _, adapter = llava
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_logits": True}
    full = VGRefiner(adapter, CONFIG, share_layers=False).generate(images, QUESTIONS, **kwargs)
    monkeypatch.setattr(model, "_lmms_vg_internals", dataclasses.replace(internals.of(model), layer_cache_kwarg=keyword))
    resumed = VGRefiner(adapter, CONFIG).generate(images, QUESTIONS, **kwargs)
    assert torch.equal(resumed.tokens, full.tokens) and torch.allclose(resumed.first_logits, full.first_logits, atol=1e-4, rtol=0)
    assert internals.of(model).layer_cache_kwarg is None


@pytest.mark.parametrize(
    ("setting", "where"),
    [("min_new_tokens", "call"), ("suppress_tokens", "call"), ("bad_words_ids", "call"), ("min_new_tokens", "generation_config")],
)
def test_settings_that_change_the_first_token_take_the_full_pass(llava, images, setting, where):
    """A minimum length, suppressed tokens or banned words change which token comes first: whether the caller or the
    checkpoint's generation config sets them, the answer is generate()'s own (a resumed pass would take the plain argmax)."""
    model, _, adapter = llava
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "pad_token_id": adapter.tokenizer.pad_token_id}
    plain = VGRefiner(adapter, CONFIG, share_layers=False).generate(images, QUESTIONS, **kwargs)
    first = int(plain.tokens[0, 0])
    value = {"min_new_tokens": 2, "suppress_tokens": [first], "bad_words_ids": [[first]]}[setting]
    if setting == "min_new_tokens":  # it shows where the plain first token ends the sequence (generate() spares an EOS from bans)
        kwargs["eos_token_id"] = first
    if where == "call":
        kwargs[setting] = value
    else:
        setattr(model.generation_config, setting, value)
    full = VGRefiner(adapter, CONFIG, share_layers=False).generate(images, QUESTIONS, **kwargs)
    resumed = VGRefiner(adapter, CONFIG).generate(images, QUESTIONS, **kwargs)
    assert full.tokens[0, 0] != first  # the setting changes the first token here
    assert torch.equal(resumed.tokens, full.tokens)


def test_the_row_cut_cuts_every_per_token_input_by_hand():
    """Above the deepest captured layer only the prefix's rows run: hidden states (given by position or by name), mask,
    positions and rotary tables are cut to them; other arguments pass as they are."""
    from lmms_vg.passes import prefix_rows_only

    hook = prefix_rows_only(2)
    hidden, mask = torch.arange(12.0).view(1, 4, 3), torch.arange(16.0).view(1, 1, 4, 4)
    positions, cos, sin = torch.tensor([[0, 1, 2, 3]]), torch.rand(1, 4, 5), torch.rand(1, 4, 5)
    given = {"attention_mask": mask, "position_ids": positions, "position_embeddings": (cos, sin), "use_cache": True}
    for args, kwargs in (((hidden,), dict(given)), ((), {**given, "hidden_states": hidden})):
        new_args, new_kwargs = hook(None, args, kwargs)
        assert len(new_args) == 1 and torch.equal(new_args[0], hidden[:, :2]) and "hidden_states" not in new_kwargs
        assert torch.equal(new_kwargs["attention_mask"], mask[..., :2, :2]) and torch.equal(new_kwargs["position_ids"], positions[:, :2])
        assert all(torch.equal(a, b[:, :2]) for a, b in zip(new_kwargs["position_embeddings"], (cos, sin)))
        assert new_kwargs["use_cache"] is True
    with pytest.raises(internals.Unsupported, match="positional"):
        hook(None, (hidden, mask), {})


@pytest.mark.parametrize("kind", ["shared", "full"])
def test_steered_maps_of_two_sets_equal_each_set_alone(llava, images, kind):
    """The questions and the generic prompt side by side under a steer of one value per sample: each set's maps as its own
    pass gives them, and those as whole prompts give them."""
    _, _, adapter = llava
    steer = Steering("amplify", frozenset({0, 1, 2}), torch.tensor([5.0, 9.0]), "all")
    shared, full = batches(adapter, images, QUESTIONS)
    batch = shared if kind == "shared" else full
    both = batch.maps([QUESTIONS, [REF_PROMPT] * 2], None, steer)
    alone = [full.maps([texts], None, steer)[0] for texts in (QUESTIONS, [REF_PROMPT] * 2)]
    for together, single in zip(both, alone):
        assert torch.allclose(together, single, atol=ATOL, rtol=0)
    assert not torch.allclose(both[0], full.maps([QUESTIONS])[0], atol=1e-3)  # the steer shows


def test_texts_beyond_the_window_run_as_whole_prompts(llava, images, monkeypatch):
    """A sliding window the prefix and the questions fit in, but not with the generic prompt beside them: that pass runs as
    whole prompts, with its layers and its steer; a question beyond the window makes the whole batch whole prompts."""
    _, _, adapter = llava
    shared, full = batches(adapter, images, QUESTIONS)
    prefix, question, reference = len(shared.prefix[0]), max(map(len, shared.suffixes)), len(shared._suffixes([REF_PROMPT])[0])
    monkeypatch.setattr(LlavaAdapter, "window", property(lambda self: prefix + question + reference - 1))
    assert shared.fits_window([shared.suffixes]) and not shared.fits_window([shared.suffixes, shared._suffixes([REF_PROMPT])])
    steer = Steering("amplify", frozenset({1}), torch.tensor([5.0, 9.0]), "all")
    calls = []
    hook = count_runs(engine.text_decoder_layers(adapter.model)[2], calls)
    try:
        got = shared.maps([QUESTIONS, [REF_PROMPT] * 2], frozenset({1}), steer)
    finally:
        hook.remove()
    expected = full.maps([QUESTIONS, [REF_PROMPT] * 2], frozenset({1}), steer)
    assert not calls and shared._state is None  # whole prompts, stopped after layer 1: no prefix in a cache
    for a, b in zip(got, expected):
        assert a.shape[1] == 2 and torch.allclose(a, b, atol=ATOL, rtol=0)
    assert not torch.allclose(got[0], full.maps([QUESTIONS], frozenset({1}))[0], atol=1e-3)
    assert isinstance(Passes(adapter, 0).batch(images, QUESTIONS), SharedPrefixBatch)
    monkeypatch.setattr(LlavaAdapter, "window", property(lambda self: prefix + question))
    assert isinstance(Passes(adapter, 0).batch(images, QUESTIONS), FullPromptBatch)


def test_a_knockout_from_layer_0_does_not_resume(llava, images):
    """Knocked out from the first layer: nothing below it to keep, the knocked-out pass runs whole, same answer as the full path."""
    _, _, adapter = llava
    shared, _ = batches(adapter, images, QUESTIONS)
    assert shared.resume_point(0) is None and shared.resume_point(1).depth == 1
    config = dataclasses.replace(CONFIG, knockout_layers=(0, 2))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_logits": True}
    ours = VGRefiner(adapter, config).generate(images, QUESTIONS, **kwargs)
    full = VGRefiner(adapter, config, share_layers=False).generate(images, QUESTIONS, **kwargs)
    assert torch.equal(ours.tokens, full.tokens) and torch.allclose(ours.first_logits, full.first_logits, atol=1e-4, rtol=0)


def test_a_resumed_answer_without_any_eos_runs_its_length(llava, images):
    """A checkpoint whose generation config names no end of sequence: the resumed answer goes on for max_new_tokens, as generate()'s."""
    model, _, adapter = llava
    model.generation_config.eos_token_id = None
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": adapter.tokenizer.pad_token_id}
    resumed, full, calls = resumed_and_full(adapter, images, **kwargs)
    assert len(calls) == 1 + 3 and resumed.tokens.shape == (2, 4) and torch.equal(resumed.tokens, full.tokens)


@pytest.mark.parametrize("mode", ["mask", "zero"])
@pytest.mark.parametrize("kind", ["shared", "full"])
def test_question_maps_under_a_knockout_equal_hand_masked_eager_attention(llava, images, mode, kind):
    """Grounding under VGRefine measures the questions' maps with the knockout in place: every layer as eager attention over
    the whole prompts gives them with the patches not kept blocked (mask) or zeroed (zero) for the text after the image."""
    from test_engine import llava_batch, masked_eager_attentions

    model, processor, adapter = llava
    shared, full = batches(adapter, images, QUESTIONS)
    batch = shared if kind == "shared" else full
    inputs = llava_batch(processor, images, QUESTIONS)
    cols = engine.image_token_positions(inputs["input_ids"], model.config.image_token_id)
    keep = torch.rand(cols.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    ours = batch.question_maps(batch.knockout(keep, (1,), mode))
    T = inputs["input_ids"].shape[1]
    rows, blocked = torch.zeros(2, T, dtype=torch.bool), torch.zeros(2, T, dtype=torch.bool)
    for b in range(2):
        rows[b, int(cols[b, -1]) + 1 :] = True
        blocked[b, cols[b][~keep[b]]] = True
    weights = masked_eager_attentions(model, inputs, {"layers": {1}, "rows": rows, "cols": blocked, "mode": mode})
    expected = torch.stack([torch.stack([w[b, :, -1, cols[b]] for w in weights]) for b in range(2)])
    assert ours.shape == expected.shape and torch.allclose(ours, expected, atol=ATOL, rtol=0)
    assert (ours[:, 1].permute(1, 0, 2)[:, ~keep] == 0).all() and (ours[:, 1].sum(-1) > 0).all()


@pytest.mark.parametrize("new", [1, 2])
def test_short_resumed_answers_equal_the_full_pass(llava, images, new):
    """One new token: the resumed pass alone; two: it and one step of generate(). Same tokens and first logits as the full pass."""
    _, _, adapter = llava
    kwargs = {"max_new_tokens": new, "do_sample": False, "output_logits": True}
    resumed = VGRefiner(adapter, CONFIG).generate(images, QUESTIONS, **kwargs)
    full = VGRefiner(adapter, CONFIG, share_layers=False).generate(images, QUESTIONS, **kwargs)
    assert resumed.tokens.shape == (2, new) and torch.equal(resumed.tokens, full.tokens)
    assert torch.allclose(resumed.first_logits, full.first_logits, atol=1e-4, rtol=0)


def refusing_row_cut(monkeypatch):
    """The row cut refuses the pass (as it does for a per-token input it does not know): the prefix pass reruns uncut."""
    from lmms_vg import passes

    def refusing(width):
        def refuse(module, args, kwargs):
            raise internals.Unsupported("row cut", "a test input")

        return refuse

    monkeypatch.setattr(passes.prefix, "prefix_rows_only", refusing)


def test_a_row_cut_refused_with_a_resume_point_keeps_the_rerun_rows(llava, images, monkeypatch):
    """The row cut refused in the prefix's pass: what the failed pass kept for the resume is dropped, the rerun's rows are
    kept, and the answer resumes from them, equal to the full pass's."""
    model, _, adapter = llava
    refusing_row_cut(monkeypatch)
    # maps up to layer 1 (the cut applies above it), knockout at 2: the resumed pass starts at layer 2
    config = dataclasses.replace(CONFIG, heads=((1, 0), (1, 1), (1, 3)))
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_logits": True}
    resumed, full, calls = resumed_and_full(adapter, images, config, **kwargs)  # resumed first: the refusal meets the resume point
    assert internals.of(model).row_cut is False
    assert torch.equal(resumed.tokens, full.tokens) and torch.allclose(resumed.first_logits, full.first_logits, atol=1e-4, rtol=0)
    assert len(calls) == 2 + 2  # the refused prefix pass and its rerun; the first token resumed; two more tokens


def test_a_row_cut_refused_reruns_with_the_prefixs_token_types(tmp_path, images, monkeypatch):
    """Gemma 3 hands its prefix pass the image tokens' types (bidirectional attention among them): the rerun after a refused
    row cut gets them too, and its maps equal whole prompts'."""
    from lmms_vg import conformance
    from lmms_vg.families import gemma3

    adapter = conformance.load_adapter("medgemma", str(gemma3.tiny(tmp_path / "gemma3")))
    refusing_row_cut(monkeypatch)
    shared, full = batches(adapter, images, QUESTIONS)
    got, expected = shared.question_and_reference(REF_PROMPT, frozenset({1})), full.question_and_reference(REF_PROMPT, frozenset({1}))
    assert internals.of(adapter.model).row_cut is False
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=ATOL, rtol=0)


def test_generation_after_the_prefix_masks_the_suffixes_padding(llava, images):
    """Questions of two lengths, padded inside their region, and a pad token of the caller's that is not the tokenizer's:
    generation after the cached prefix masks the padding itself (generate() cannot infer it), same logits as whole prompts."""
    _, _, adapter = llava
    shared, full = batches(adapter, images, QUESTIONS)
    assert len(set(map(len, shared.suffixes))) == 2
    kwargs = {"max_new_tokens": 2, "do_sample": False, "output_logits": True, "pad_token_id": 0}
    (tokens_s, logits_s), (tokens_f, logits_f) = shared.generate(**kwargs), full.generate(**kwargs)
    assert torch.equal(tokens_s, tokens_f) and torch.allclose(logits_s, logits_f, atol=1e-4, rtol=0)


def test_an_earlier_batchs_m_rope_shift_does_not_leak(qwen2_vl_dir, images, request):
    """Qwen2-VL keeps the last prompt's position shift on the model: a later batch (another size, another grid) gets its own."""
    _, _, adapter = load("qwen2_vl_dir", request)
    earlier, _ = batches(adapter, [images[0]] * 2, QUESTIONS)
    earlier.generate(max_new_tokens=2, do_sample=False)
    shared, full = batches(adapter, [images[1]], QUESTIONS[1:])
    assert torch.allclose(shared.question_and_reference(None)[0], full.question_and_reference(None)[0], atol=ATOL, rtol=0)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_logits": True}
    (tokens_s, logits_s), (tokens_f, logits_f) = shared.generate(**kwargs), full.generate(**kwargs)
    assert torch.equal(tokens_s, tokens_f) and torch.allclose(logits_s, logits_f, atol=1e-4, rtol=0)


def test_a_prompt_without_image_tokens_is_named_with_its_model(llava, images, monkeypatch):
    """A family whose prompt lost its image placeholder: the maps pass and the knockout both stop with the model's name."""
    from lmms_vg.engine import EngineError

    _, _, adapter = llava
    encode = adapter.encode

    def without_image(imgs, texts):
        batch = encode(imgs, texts)
        return {**batch, "input_ids": batch["input_ids"].masked_fill(batch["input_ids"] == adapter.image_token_id, 0)}

    monkeypatch.setattr(adapter, "encode", without_image)
    monkeypatch.setattr(adapter, "name", "my-family")
    _, full = batches(adapter, images, QUESTIONS)
    with pytest.raises(EngineError, match="my-family: no image tokens"):
        full.maps([QUESTIONS])
    with pytest.raises(EngineError, match="my-family: no image tokens"):
        full.knockout(torch.ones(2, 64, dtype=torch.bool), (1,), "mask")


def test_three_sets_of_texts_ride_on_the_prefix_alone(llava, images):
    """The prefix's own pass carries one or two sets; a third goes to a pass of its own on the cached prefix: same maps."""
    _, _, adapter = llava
    shared, full = batches(adapter, images, QUESTIONS)
    sets = [QUESTIONS, [REF_PROMPT] * 2, QUESTIONS[::-1]]
    for a, b in zip(shared.maps(sets), full.maps(sets)):
        assert torch.allclose(a, b, atol=ATOL, rtol=0)


def test_truncate_cuts_each_layer_back_to_the_prefix_by_hand():
    """After a pass that stopped early the cache's layers differ in length: each is cut by its own excess (one position, two,
    none), an empty layer is left alone."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, length in enumerate((7, 6, 5)):
        kv = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(1, 2, length, 4).contiguous()
        cache.update(kv, kv + 100, layer)
    cache.layers.append(type(cache.layers[0])())  # a fourth layer the pass never reached
    truncate(cache, 5)
    assert [layer.get_seq_length() for layer in cache.layers[:3]] == [5, 5, 5] and not cache.layers[3].is_initialized
    for layer in cache.layers[:3]:
        assert torch.equal(layer.keys[0, 0, :, 0], torch.arange(5.0)) and torch.equal(layer.values[0, 1, :, 3], torch.arange(5.0) + 100)


def test_unkeyed_images_never_share_a_cached_reference(llava, images):
    """Images without a key are not cached: a second batch of other images gets its own generic-prompt maps."""
    model, processor, adapter = llava
    passes = Passes(adapter, 8)
    passes.batch(images[:1], QUESTIONS[:1]).question_and_reference(REF_PROMPT)
    _, reference = passes.batch(images[1:], QUESTIONS[:1]).question_and_reference(REF_PROMPT)
    assert torch.allclose(reference, last_row_maps(model, processor, images[1:], [REF_PROMPT])[2], atol=ATOL, rtol=0)


def test_cached_references_keep_the_layers_and_the_resume_point(llava, images):
    """The second time an image is seen its reference comes from the cache: the questions' maps still stop at the chosen
    layers, and VGRefine's answer still resumes below the knockout layer (same as the full pass)."""
    model, processor, adapter = llava
    keys = ["img0", "img1"]
    passes = Passes(adapter, 8)
    passes.batch(images, QUESTIONS, keys).question_and_reference(REF_PROMPT, frozenset({1}))
    question, _ = passes.batch(images, QUESTIONS, keys).question_and_reference(REF_PROMPT, frozenset({1}))
    eager = last_row_maps(model, processor, images, QUESTIONS)[2]
    assert question.shape[1] == 2 and torch.allclose(question[:, 1], eager[:, 1], atol=ATOL, rtol=0)
    refiner = VGRefiner(adapter, CONFIG)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "output_logits": True}
    refiner.generate(images, QUESTIONS, keys, **kwargs)
    calls = []
    hook = count_runs(engine.text_decoder_layers(model)[0], calls)
    try:
        again = refiner.generate(images, QUESTIONS, keys, **kwargs)
    finally:
        hook.remove()
    full = VGRefiner(adapter, CONFIG, share_layers=False).generate(images, QUESTIONS, **kwargs)
    assert len(calls) == 1 + 2 and torch.equal(again.tokens, full.tokens)  # the questions' pass; the first token resumed
