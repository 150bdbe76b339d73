"""The engine's plan records one rule at a time, by hand: which calls a steer applies to (a prompt pass of two rows is a
prompt pass), the edit's arithmetic in the scores' own precision, and the shapes it refuses."""

import pytest
import torch

from lmms_vg import engine


def steer(steps="all", kind="amplify", value=(2.0, 0.5), cols=None):
    cols = torch.tensor([[True, False, True], [False, True, True]]) if cols is None else cols
    return engine.Steer(frozenset({1, 3}), cols, kind, torch.tensor(value), steps)


@pytest.mark.parametrize(
    ("steps", "q_len", "applies"),
    [("prefill", 2, True), ("prefill", 1, False), ("decode", 1, True), ("decode", 2, False), ("all", 1, True), ("all", 7, True)],
)
def test_a_steer_applies_to_the_calls_its_steps_name(steps, q_len, applies):
    s = steer(steps)
    assert s.applies(3, q_len) is applies and s.applies(1, q_len) is applies
    assert s.applies(2, q_len) is False  # a layer it does not name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_edit_by_hand_in_the_scores_precision(dtype):
    scores = torch.tensor([[[[-1.0, 2.0, -3.0]]], [[[4.0, -5.0, 6.0]]]], dtype=dtype)  # [B=2, H=1, R=1, kv=3]
    cols = torch.tensor([[True, False, True], [False, True, True]])
    amplified = steer("all", "amplify").edit(scores, cols)  # a + v|a|: v = 2 for the first sample, 0.5 for the second
    assert amplified.dtype == dtype
    assert amplified.float().flatten().tolist() == [1.0, 2.0, 3.0, 4.0, -2.5, 9.0]
    scaled = steer("all", "scale").edit(scores, cols)  # a v
    assert scaled.dtype == dtype and scaled.float().flatten().tolist() == [-2.0, 2.0, -6.0, 4.0, -2.5, 3.0]


def test_a_steer_refuses_cols_that_are_not_bool_and_values_that_are_not_one_per_sample():
    with pytest.raises(ValueError, match="one number per sample"):
        steer(value=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="must be bool"):
        steer(cols=torch.ones(2, 3))
    with pytest.raises(ValueError, match="kind"):
        steer(kind="add")
    with pytest.raises(ValueError, match="steps"):
        steer(steps="first")


# ---------------------------------------------------------------- the attention function itself, against attention by hand


class Attention(torch.nn.Module):
    """What transformers' SDPA path reads from an attention module: causal, 2 query heads per key head."""

    is_causal, num_key_value_groups = True, 2


def by_hand(q, k, v, keys_ok, scale, knocked=None, cols=None, mode="mask", steer=None):
    """Eager attention, each rule written out: [B, H, Q, D] queries over [B, KVH, KV, D]; ``keys_ok`` [B, Q, KV];
    ``knocked`` [B, Q] rows that may not see ``cols`` [B, KV] (mask: before the softmax; zero: their weights zeroed after);
    ``steer`` (kind, values [B], cols [B, KV]) edits the last row's logits."""
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, Q, KV]
    allowed = keys_ok[:, None].clone()
    blocked = torch.zeros_like(allowed)
    if knocked is not None:
        blocked = (knocked[:, :, None] & cols[:, None, :])[:, None]
        if mode == "mask":
            allowed &= ~blocked
    scores = scores.masked_fill(~allowed, float("-inf"))
    if steer is not None:
        kind, values, steer_cols = steer
        last = scores[:, :, -1, :]
        edited = last + values[:, None, None] * last.abs() if kind == "amplify" else last * values[:, None, None]
        scores[:, :, -1, :] = torch.where(steer_cols[:, None, :], edited, last)
    weights = torch.softmax(scores, -1)
    if knocked is not None and mode == "zero":
        weights = weights * ~blocked
    return (weights @ v).transpose(1, 2), weights


@pytest.mark.parametrize("mode", ["mask", "zero"])
def test_the_attention_function_on_a_resumed_padded_chunk_with_its_own_scale(mode):
    """A chunk of 3 queries after 4 cached keys (start 4), the second sample left-padded by 2, grouped heads, a scale that
    is not 1/sqrt(d); one row knocked out for the first sample only; the capture of the last row; a prompt-pass steer."""
    torch.manual_seed(0)
    B, H, KVH, Q, KV, D, scale = 2, 4, 2, 3, 7, 8, 0.3
    q, k, v = torch.randn(B, H, Q, D), torch.randn(B, KVH, KV, D), torch.randn(B, KVH, KV, D)
    start = KV - Q
    keys = torch.arange(KV)
    padded = torch.tensor([[True] * KV, [False, False] + [True] * (KV - 2)])
    keys_ok = (keys[None, None, :] <= (start + torch.arange(Q))[None, :, None]) & padded[:, None, :]  # [B, Q, KV]
    rows = torch.zeros(B, KV, dtype=torch.bool)
    rows[0, start + 1] = True  # one knocked row in this chunk, in the first sample only
    cols = torch.zeros(B, KV, dtype=torch.bool)
    cols[:, 2:4] = True  # the "image"
    attn, model = Attention(), torch.nn.Module()
    model._lmms_vg_layers = {id(attn): 0}
    knockout = engine.Knockout(frozenset({0}), rows, cols, mode)
    capture = engine.Capture(rows=torch.tensor([[start + 2], [start + 2]]), cols=torch.tensor([[2, 3], [2, 3]]))
    with engine.arm(model, capture=capture, knockout=knockout):
        out, _ = engine.vg_attention(attn, q, k, v, keys_ok[:, None], scaling=scale)
    expected, weights = by_hand(q, k, v, keys_ok, scale, rows[:, start:], cols, mode)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(capture.maps[0][:, :, 0], weights[:, :, -1, 2:4], atol=1e-6, rtol=0)
    plain, _ = by_hand(q, k, v, keys_ok, scale)
    assert not torch.allclose(out[0, 1], plain[0, 1]) and torch.equal(
        out[1], engine.vg_attention(attn, q, k, v, keys_ok[:, None], scaling=scale)[0][1]
    )

    steer_cols = cols.clone()
    steer = engine.Steer(frozenset({0}), steer_cols, "amplify", torch.tensor([0.5, 2.0]), "prefill")
    with engine.arm(model, steer=steer):
        out, _ = engine.vg_attention(attn, q, k, v, keys_ok[:, None], scaling=scale)
    expected, _ = by_hand(q, k, v, keys_ok, scale, steer=("amplify", torch.tensor([0.5, 2.0]), steer_cols))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_a_capture_outside_the_chunk_is_left_for_another_and_every_row_inside_is_taken():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    attn, model = Attention(), torch.nn.Module()
    model._lmms_vg_layers = {id(attn): 0}
    keys_ok = torch.arange(5)[None, None, :] <= (2 + torch.arange(3))[None, :, None]
    for rows, taken in (([[1]], False), ([[5]], False), ([[2]], True), ([[4]], True)):  # the chunk holds positions 2..4
        capture = engine.Capture(rows=torch.tensor(rows), cols=torch.tensor([[0, 1]]))
        with engine.arm(model, capture=capture):
            engine.vg_attention(attn, q, k, v, keys_ok[:, None])
        assert (0 in capture.maps) is taken, rows
    _, weights = by_hand(q, k, v, keys_ok, 8**-0.5)
    torch.testing.assert_close(capture.maps[0][:, :, 0], weights[:, :, 2, 0:2], atol=1e-6, rtol=0)


def test_a_knockout_refuses_rows_and_cols_that_are_not_bool_masks_of_one_shape():
    ok = torch.zeros(1, 4, dtype=torch.bool)
    engine.Knockout(frozenset({0}), ok, ok)
    for rows, cols in ((ok, torch.zeros(1, 5, dtype=torch.bool)), (ok.long(), ok), (ok, ok.long())):
        with pytest.raises(ValueError, match="bool tensors of the same shape"):
            engine.Knockout(frozenset({0}), rows, cols)


@pytest.mark.parametrize("float_mask", [False, True])
def test_float_masks_read_as_bool_ones(float_mask):
    """Some models hand the attention a float mask (0 or the dtype's minimum): it means what the bool one does."""
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    keys_ok = (torch.arange(6)[None, None, :] <= (3 + torch.arange(3))[None, :, None]) & torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]]).bool()[
        :, None
    ]
    mask = keys_ok[:, None]
    if float_mask:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    attn, model = Attention(), torch.nn.Module()
    model._lmms_vg_layers = {id(attn): 0}
    rows, cols = torch.zeros(2, 6, dtype=torch.bool), torch.zeros(2, 6, dtype=torch.bool)
    rows[:, 4], cols[:, 1:3] = True, True
    capture = engine.Capture(rows=torch.tensor([[5], [5]]), cols=torch.tensor([[1, 2], [1, 2]]))
    with engine.arm(model, capture=capture, knockout=engine.Knockout(frozenset({0}), rows, cols)):
        out, _ = engine.vg_attention(attn, q, k, v, mask)
    expected, weights = by_hand(q, k, v, keys_ok, 8**-0.5, rows[:, 3:], cols)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(capture.maps[0][:, :, 0], weights[:, :, -1, 1:3], atol=1e-6, rtol=0)


def test_a_decoding_step_without_a_mask_knocks_out_and_captures_its_own_row():
    """One query after 4 cached keys, no mask (transformers passes none for a one-row causal step of one sample)."""
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    attn, model = Attention(), torch.nn.Module()
    model._lmms_vg_layers = {id(attn): 0}
    rows, cols = torch.zeros(1, 5, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.bool)
    rows[0, 4], cols[0, 1:3] = True, True
    capture = engine.Capture(rows=torch.tensor([[4]]), cols=torch.tensor([[0, 1, 2, 3, 4]]))
    with engine.arm(model, capture=capture, knockout=engine.Knockout(frozenset({0}), rows, cols)):
        out, _ = engine.vg_attention(attn, q, k, v, None)
    keys_ok = torch.ones(1, 1, 5, dtype=torch.bool)
    expected, weights = by_hand(q, k, v, keys_ok, 8**-0.5, rows[:, 4:], cols)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(capture.maps[0][:, :, 0], weights[:, :, 0], atol=1e-6, rtol=0)


def test_image_token_positions_name_the_items_without_images_or_with_other_counts():
    assert engine.image_token_positions(torch.tensor([[1, 9, 9], [9, 9, 2]]), 9).tolist() == [[1, 2], [0, 1]]
    with pytest.raises(engine.EngineError, match="^model: no image tokens \\(id 9\\) in the prompt of batch item\\(s\\) \\[1\\]"):
        engine.image_token_positions(torch.tensor([[1, 9, 9], [1, 1, 1]]), 9)
    with pytest.raises(engine.EngineError, match="different image-token counts \\[2, 1\\]"):
        engine.image_token_positions(torch.tensor([[1, 9, 9], [1, 1, 9]]), 9)


def test_an_explicit_is_causal_reaches_sdpa_and_a_capture_can_stop_at_its_deepest_layer():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    attn, model = Attention(), torch.nn.Module()
    model._lmms_vg_layers = {id(attn): 0}
    full, _ = by_hand(q, k, v, torch.ones(1, 3, 3, dtype=torch.bool), 8**-0.5)
    out, _ = engine.vg_attention(attn, q, k, v, None, is_causal=False)  # bidirectional where the model says so
    torch.testing.assert_close(out, full, atol=1e-5, rtol=0)
    capture = engine.Capture(rows=torch.tensor([[2]]), cols=torch.tensor([[0, 1]]), layers=frozenset({0}), stop_early=True)
    with engine.arm(model, capture=capture), pytest.raises(engine.CaptureComplete):
        engine.vg_attention(attn, q, k, v, None)
    assert 0 in capture.maps


def decoder(layers: int = 2, with_attention: bool = True):
    inner = torch.nn.Module()
    inner.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(layers))
    for layer in inner.layers if with_attention else ():
        layer.self_attn = torch.nn.Module()
    return inner


@pytest.mark.parametrize("where", ["model.language_model", "model.language_model.model", "text_model", "model.text_model.model"])
def test_the_text_decoder_is_found_where_each_layout_keeps_it(where):
    model, found = torch.nn.Module(), decoder()
    node = model
    parts = where.split(".")
    for part in parts[:-1]:
        setattr(node, part, torch.nn.Module())
        node = getattr(node, part)
    setattr(node, parts[-1], found)
    assert engine.text_attention_layers(model) == {id(found.layers[0].self_attn): 0, id(found.layers[1].self_attn): 1}


def test_a_decoder_without_layers_or_attention_is_named():
    model = torch.nn.Module()
    model.language_model = torch.nn.Module()
    with pytest.raises(engine.EngineError, match="found no decoder `layers`"):
        engine.text_attention_layers(model)
    model.language_model = decoder(with_attention=False)
    with pytest.raises(engine.EngineError, match="decoder layer 0 has no `self_attn`"):
        engine.text_attention_layers(model)
