"""The methods' pieces one by one, each against a reference computed here: PAI's guidance step by step on a left-padded
batch (each row's text prompt run whole, unpadded, uncached), the settings' bounds at their edges, AdaptVis's rounded
confidence, ViCrop's blocks, crop-search ties and defaults, and what each method logs and passes on."""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_engine import QUESTIONS, load_llava
from test_methods import reference_high_res_blocks, vicrop_reference_box

from lmms_vg import methods
from lmms_vg.families.llava import LlavaAdapter
from lmms_vg.methods.base import parse_settings

# ---------------------------------------------------------------- PAI's guidance


def text_rows(adapter) -> list[list[int]]:
    rows = [adapter.text_only_ids(q) for q in ("Is there a lesion in the left lung?", "Round?")]
    assert len(rows[0]) != len(rows[1]), "the batch must be left-padded"
    return rows


@pytest.mark.parametrize("use_cache_by_default", [True, False])
def test_pai_guidance_follows_each_rows_text_prompt_step_by_step(llava_dir, use_cache_by_default):
    """CFGLogits (LALBJ/PAI @ 9bbd8bd, CFG.py): at each step, the text-only prompt with the answer so far, run as one
    sequence; guided = gamma (logp - logp_text) + logp_text; tokens under cutoff x the top probability removed.
    Ours runs the rows left-padded and cached: each step must equal the unpadded, uncached run of each row."""
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    model.config.text_config.use_cache = use_cache_by_default  # the guidance asks for its cache whatever the config says
    rows = text_rows(adapter)
    guidance = methods.TextGuidance(model, methods.pai.left_padded(rows, adapter.tokenizer.pad_token_id, "cpu"), gamma=1.3)
    rng = torch.Generator().manual_seed(0)
    vocab = model.config.text_config.vocab_size
    answer = torch.randint(5, 200, (2, 4), generator=rng)
    for step in range(4):
        scores = torch.randn(2, vocab, generator=rng) * 0.02
        scores[:, :3] = -30.0  # far under the cutoff
        prompt_so_far = torch.cat([torch.zeros(2, 7, dtype=torch.long), answer[:, :step]], 1)  # only its last column is read
        got = guidance(prompt_so_far, scores.clone())
        logp = torch.log_softmax(scores, -1)
        for i, row in enumerate(rows):
            ids = torch.tensor([row + answer[i, :step].tolist()])
            with torch.no_grad():
                text = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), -1)
            expected = 1.3 * (logp[i] - text) + text
            removed = logp[i] < math.log(0.1) + logp[i].max()
            assert torch.equal(torch.isinf(got[i]), removed), (step, i)
            assert removed[:3].all() and not removed[3:].any()
            torch.testing.assert_close(got[i][~removed], expected[~removed], atol=2e-5, rtol=0, msg=f"step {step}, row {i}")


def test_pai_without_guidance_returns_log_probabilities_uncut(llava_dir):
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    guidance = methods.TextGuidance(model, methods.pai.left_padded(text_rows(adapter), 0, "cpu"), gamma=1.0)
    scores = torch.randn(2, model.config.text_config.vocab_size)
    scores[:, 0] = -50.0
    got = guidance(torch.zeros(2, 3, dtype=torch.long), scores)
    torch.testing.assert_close(got, torch.log_softmax(scores, -1))
    assert guidance.cache is None  # no text-only run at all


def test_pai_passes_its_cutoff_and_generation_settings_and_logs_them(llava_dir, images, monkeypatch):
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    made = []
    original = methods.pai.TextGuidance

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(methods.pai, "TextGuidance", recording)
    config = methods.PaiConfig(alpha=0.4, gamma=1.2, start_layer=1, cutoff=0.35)
    asked = methods.Asked([[images[0]], [images[1]]], list(QUESTIONS[:2]), [None, None], QUESTIONS[:2])
    outcome = methods.METHODS["pai"](adapter, config).answer(asked, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert made[0].log_cutoff == pytest.approx(math.log(0.35)) and made[0].gamma == 1.2
    assert outcome.tokens.shape == (2, 2)
    assert outcome.details == [{"pai_alpha": 0.4, "pai_gamma": 1.2}] * 2


# ---------------------------------------------------------------- settings at their edges


@pytest.mark.parametrize(
    ("make", "ok"),
    [
        (lambda: methods.PaiConfig(alpha=0.0, gamma=0.0, start_layer=0, cutoff=1.0), True),
        (lambda: methods.PaiConfig(gamma=0.5), True),
        (lambda: methods.PaiConfig(alpha=-0.1), False),
        (lambda: methods.PaiConfig(gamma=-0.1), False),
        (lambda: methods.PaiConfig(start_layer=-1), False),
        (lambda: methods.PaiConfig(cutoff=0.0), False),
        (lambda: methods.PaiConfig(cutoff=1.5), False),
        (lambda: methods.AdaptVisConfig(threshold=0.0, weight1=0.1, weight2=0.5), True),
        (lambda: methods.AdaptVisConfig(threshold=1.0), True),
        (lambda: methods.AdaptVisConfig(weight1=0.0), False),
        (lambda: methods.AdaptVisConfig(weight2=0.0), False),
        (lambda: methods.AdaptVisConfig(threshold=-0.01), False),
        (lambda: methods.ViCropConfig(), True),
        (lambda: methods.ViCropConfig(layer=-1), False),
        (lambda: methods.ViCropConfig(bbox_size=-1), False),
    ],
)
def test_settings_are_refused_exactly_outside_their_ranges(make, ok):
    if ok:
        make()
    else:
        with pytest.raises(methods.MethodConfigError, match="out of range"):
            make()


def fake_adapter(n_layers=4, size=None, fixed_grid=True, defaults=(2, 0)):
    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=n_layers)))
    processor = SimpleNamespace(image_processor=SimpleNamespace(crop_size={"height": 336, "width": 336}))
    adapter = SimpleNamespace(model=model, processor=processor, name="tiny", fixed_grid=fixed_grid, vicrop_defaults=defaults)
    if size is not None:
        adapter.size = size
    return adapter


def test_layers_are_checked_against_the_model_at_their_last_index():
    adapter = fake_adapter(n_layers=4)
    methods.PaiConfig(start_layer=3).check(adapter)
    with pytest.raises(methods.MethodConfigError, match="start_layer=4 but tiny has 4 text layers"):
        methods.PaiConfig(start_layer=4).check(adapter)
    assert methods.ViCropConfig(layer=3).resolved(adapter) == (3, 336)
    with pytest.raises(methods.MethodConfigError, match="layer=4 but tiny has 4 text layers"):
        methods.ViCropConfig(layer=4).check(adapter)


def test_vicrops_crop_size_is_the_setting_the_familys_default_the_adapters_size_or_the_processors():
    assert methods.ViCropConfig(bbox_size=100).resolved(fake_adapter(size=448, defaults=(2, 224))) == (2, 100)
    assert methods.ViCropConfig().resolved(fake_adapter(size=448, defaults=(2, 224))) == (2, 224)
    assert methods.ViCropConfig().resolved(fake_adapter(size=448)) == (2, 448)
    assert methods.ViCropConfig().resolved(fake_adapter()) == (2, 336)
    with pytest.raises(methods.MethodConfigError, match="fixed-grid models only"):
        methods.ViCropConfig(high_res=True).resolved(fake_adapter(fixed_grid=False))


def test_settings_are_parsed_by_their_fields_types():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        count: int = 1
        scale: float = 0.5
        flag: bool = False
        limit: int | None = None
        name: str = "x"

    args = {"limit": None, "count": "3", "scale": "2", "flag": "true", "name": "7"}
    parsed = parse_settings(Settings, args, "m")
    assert parsed == Settings(count=3, scale=2.0, flag=True, limit=None, name="7")
    assert type(parsed.scale) is float and type(parsed.count) is int
    assert parse_settings(Settings, {"limit": "4", "count": None, "scale": 1}, "m") == Settings(limit=4, scale=1.0)

    @dataclasses.dataclass(frozen=True)
    class Listed:
        ids: list[int] = dataclasses.field(default_factory=list)

    assert parse_settings(Listed, {"ids": "3"}, "m").ids == "3"  # only int, float and bool (or None) are parsed
    with pytest.raises(ValueError, match="count"):
        parse_settings(Settings, {"count": "2.5"}, "m")


# ---------------------------------------------------------------- AdaptVis's confidence


class FixedLogits(torch.nn.Module):
    """A model whose first-token logits are given; it records what it was asked to keep."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.kept, self._lmms_vg_layers = logits, [], []

    def forward(self, logits_to_keep=None, **batch):
        self.kept.append(logits_to_keep)
        return SimpleNamespace(logits=self.logits[:, None, :])


def test_adaptvis_rounds_the_top_probability_to_two_places_before_the_threshold():
    """Its code: ``np.round(max(softmax(logits)), 2)`` against the threshold; top probabilities 0.4449 and 0.3951."""
    top = torch.tensor([0.4449, 0.3951])
    rest = (1 - top) / 9
    logits = torch.log(torch.cat([top[:, None], rest[:, None].expand(2, 9)], 1))
    model = FixedLogits(logits)
    confidence, weights = methods.adaptvis_weights(SimpleNamespace(model=model), {}, methods.AdaptVisConfig(threshold=0.4))
    assert confidence.tolist() == pytest.approx([0.44, 0.40])
    assert weights.tolist() == [1.5, 1.5]  # 0.3951 rounds up to the threshold: not below it
    _, weights = methods.adaptvis_weights(SimpleNamespace(model=model), {}, methods.AdaptVisConfig(threshold=0.41))
    assert weights.tolist() == [1.5, 0.5]
    assert model.kept == [1, 1]  # only the last position's logits are computed


# ---------------------------------------------------------------- ViCrop's blocks and search


@pytest.mark.parametrize("size", [(2500, 1300), (1100, 1500), (700, 1025), (3000, 900)])
def test_high_res_blocks_equal_its_split_and_the_default_limit_is_1024(size):
    """Blocks as its ``high_res_split_threshold`` cuts them (row-major, ceil'd sizes); a 1025-px side makes two rows."""
    image = Image.fromarray((np.arange(size[0] * size[1]).reshape(size[1], size[0]) % 251).astype(np.uint8))
    blocks, rows, cols = methods.high_res_blocks(image)
    expected, erows, ecols = reference_high_res_blocks(image)
    assert (rows, cols) == (erows, ecols) and len(blocks) == rows * cols > 1
    for got, want in zip(blocks, expected):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_high_res_blocks_of_an_image_taller_than_its_rows_are_one_column():
    blocks, rows, cols = methods.high_res_blocks(Image.new("L", (300, 2100)))
    assert (rows, cols) == (3, 1) and [b.size for b in blocks] == [(300, 700)] * 3


@pytest.mark.parametrize(
    ("att", "size", "bbox"),
    [
        (np.ones((6, 6)), (600, 600), 150),  # every window ties: the first in its column-major scan
        (np.ones((6, 6)), (600, 720), 600),  # columns all covered, one row to slide: searched, not the whole image
        (np.full((6, 8), np.nan), (800, 600), 200),  # a map of 0/0 (no reference attention): its scan keeps (0, 0)
    ],
)
def test_vicrop_box_on_ties_edges_and_undefined_maps(att, size, bbox):
    got = methods.vicrop_box(att, size, bbox)
    assert got == pytest.approx(vicrop_reference_box(att, size, bbox))
    assert tuple(got) != (0, 0, *size)


def test_vicrop_box_default_base_size_is_336():
    rng = np.random.default_rng(1)
    for _ in range(4):  # the fourth map of this seed is one where 336 and 337 px crop differently
        att, size = rng.random((6, 8)) ** 4, (int(rng.integers(300, 1000)), int(rng.integers(300, 1000)))
    assert vicrop_reference_box(att, size, 336) != vicrop_reference_box(att, size, 337)
    assert methods.vicrop_box(att, size) == pytest.approx(vicrop_reference_box(att, size, 336))


# ---------------------------------------------------------------- what each method passes on and logs


@pytest.mark.parametrize("name", ["pai", "adaptvis", "vicrop"])
def test_each_method_passes_the_generation_settings_on_and_says_when_it_does_not_apply(name, llava_dir, images):
    model, processor = load_llava(llava_dir)
    adapter = LlavaAdapter(model, processor)
    settings = {"pai": methods.PaiConfig(start_layer=1), "adaptvis": methods.AdaptVisConfig(), "vicrop": methods.ViCropConfig(layer=1)}
    method = methods.METHODS[name](adapter, settings[name])
    short = [f"{q} Answer the question using a single word or phrase." for q in QUESTIONS[:2]]
    asked = methods.Asked([[images[0]], [images[1]]], list(QUESTIONS[:2]), [None, None], short)
    outcome = method.answer(asked, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert outcome.tokens.shape == (2, 3)
    if name == "vicrop":
        assert [d["vicrop_attention_prompt"] for d in outcome.details] == short
    label = {"pai": "PAI", "adaptvis": "AdaptVis", "vicrop": "ViCrop"}[name]
    why = "no: 2 images (ViCrop crops one)" if name == "vicrop" else f"no: 2 images ({label} is defined for one)"
    assert method.not_applied(2) == {"method": {"name": name, "applied": why}}
    assert methods.METHODS[name] is type(method)
    assert method.record() == dataclasses.asdict(settings[name])


def test_a_methods_record_lists_its_tuples():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        layers: tuple[int, ...] = (1, 3)
        scale: float = 0.5

    record = methods.Method.record(SimpleNamespace(settings=Settings()))
    assert record == {"layers": [1, 3], "scale": 0.5} and type(record["layers"]) is list  # as JSON writes it


def test_vicrop_joins_each_images_block_maps_in_a_batch_of_three(monkeypatch):
    """With high_res the blocks of every image are scored in one list; each image's map is its own blocks, joined row-major."""
    images = [Image.new("L", size) for size in [(1100, 1500), (900, 2100), (2500, 1300)]]  # 2, 3 and 6 blocks
    tiles_made, boxes_asked = [], []

    def attention(adapter, blocks, texts, layer):
        tiles_made.extend(np.full((2, 2), float(i)) for i in range(len(blocks)))
        return tiles_made

    def box(grid, size, bbox_size):
        boxes_asked.append(grid)
        return (0, 0, 10, 10)

    monkeypatch.setattr(methods.vicrop, "relative_attention", attention)
    monkeypatch.setattr(methods.vicrop, "vicrop_box", box)
    monkeypatch.setattr(methods.vicrop, "generate_new_tokens", lambda model, encoded, **kw: (torch.zeros(3, 1), None))
    adapter = fake_adapter()
    adapter.encode = lambda pairs, texts: None
    methods.vicrop_generate(adapter, images, ["q"] * 3, methods.ViCropConfig(layer=1, high_res=True))
    counts, at = [], 0
    for image in images:
        blocks, rows, cols = methods.high_res_blocks(image)
        tiles = [np.full((2, 2), float(i)) for i in range(at, at + len(blocks))]
        counts.append(np.block([tiles[r * cols : (r + 1) * cols] for r in range(rows)]))
        at += len(blocks)
    assert len(boxes_asked) == 3
    for got, expected in zip(boxes_asked, counts):
        assert np.array_equal(got, expected)
