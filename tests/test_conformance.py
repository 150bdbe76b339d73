"""The conformance battery on every registered family's tiny checkpoint, and on adapters broken on purpose.

Each family must pass every check it can have; a check is skipped only for the reason its family
gives (no full processor to compare with). The battery itself must fail an adapter that drops what
makes a family exact: its token types, its BOS rule, its geometry.
"""

import dataclasses

import pytest
import torch

from lmms_vg import conformance, geometry, presets

presets.load_families()
FAMILIES = sorted(presets.FAMILIES)
# the families whose checkpoints carry no full processor (a tokenizer and an image processor only): their prompts are
# held to their originals' conversation code in tests/test_templates.py instead
NO_PROCESSOR = {"vila", "internvl", "qwen2_vl"}  # Qwen's full processor needs torchvision (its video part)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {name: presets.FAMILIES[name].tiny(tmp_path_factory.mktemp(name)) for name in FAMILIES}


def test_every_family_ships_a_tiny_checkpoint():
    assert all(presets.FAMILIES[name].tiny is not None for name in FAMILIES), "a family without tiny= cannot be checked offline"
    assert {"llava", "qwen2_vl", "vila", "internvl", "gemma3"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_passes_the_battery(family, tiny_dirs):
    results = {r.name: r for r in conformance.run_checks(conformance.load_adapter(family, str(tiny_dirs[family])))}
    assert set(results) == set(conformance.CHECKS)
    failed = [r.line() for r in results.values() if r.passed is False]
    assert not failed, failed
    skipped = {name for name, r in results.items() if r.passed is None}
    assert skipped == ({"encoding"} if family in NO_PROCESSOR else set()), [results[n].line() for n in skipped]


def test_a_binding_sliding_window_runs_full_prompts_with_the_same_maps(tmp_path):
    """Gemma 3's sliding layer bound inside the prompt: the shared prefix steps aside, the maps still equal eager attention."""
    from lmms_vg.families import gemma3

    adapter = conformance.load_adapter("medgemma", str(gemma3.tiny(tmp_path / "narrow", window=24)))
    results = {r.name: r for r in conformance.run_checks(adapter)}
    assert results["shared_prefix"].passed is None and "sliding window (24)" in results["shared_prefix"].detail
    assert all(r.passed for n, r in results.items() if n != "shared_prefix"), [r.line() for r in results.values()]
    from lmms_vg.passes import FullPromptBatch, Passes

    assert isinstance(Passes(adapter, 0).batch(conformance.test_images()[:1], ["Where?"]), FullPromptBatch)


@pytest.fixture
def gemma(tiny_dirs):
    return conformance.load_adapter("medgemma", str(tiny_dirs["gemma3"]))


def test_the_battery_fails_an_adapter_without_token_types(gemma, monkeypatch):
    """Without token types Gemma 3's image attention is causal: the encoding and the maps (eager on the processor's inputs) say so."""
    monkeypatch.setattr(type(gemma), "prefix_inputs", lambda self, ids: {})
    results = {r.name: r for r in conformance.run_checks(gemma, ["encoding", "maps"])}
    assert results["encoding"].passed is False and "token_type_ids" in results["encoding"].detail
    assert results["maps"].passed is False


def test_the_battery_fails_a_doubled_bos(gemma, monkeypatch):
    from lmms_vg import adapters

    monkeypatch.setattr(adapters, "starts_with_bos", lambda tokenizer, prompt: False)
    result = conformance.run_checks(gemma, ["encoding"])[0]
    assert result.passed is False and "ids differ" in result.detail


def test_the_battery_fails_a_wrong_geometry(gemma, monkeypatch):
    """A geometry that pads to square when the model squashes: markers land elsewhere."""
    squash = geometry.squash_transform

    monkeypatch.setattr(geometry, "squash_transform", lambda *a, **k: squash(*a, **{**k, "pad_to_square": True}))
    assert conformance.run_checks(gemma, ["geometry"])[0].passed is False


def test_the_battery_fails_captured_maps_off_by_a_row(gemma, monkeypatch):
    """Maps captured one row above the last prompt token are not the eager maps."""
    from lmms_vg import engine

    capture = engine.Capture

    def early(*args, **kwargs):
        kwargs["rows"] = kwargs["rows"] - 1
        return capture(*args, **kwargs)

    monkeypatch.setattr(engine, "Capture", early)
    assert conformance.run_checks(gemma, ["maps"])[0].passed is False


def test_unknown_check_names_are_named(gemma):
    with pytest.raises(ValueError, match="unknown checks \\['mapz'\\]"):
        conformance.run_checks(gemma, ["mapz"])


def test_results_read_as_lines():
    lines = conformance.report([conformance.Result("maps", True, "x"), conformance.Result("encoding", None, "why")]).splitlines()
    assert lines == ["ok   maps: x", "skip encoding: why", "1 passed, 0 failed, 1 skipped"]
    assert dataclasses.is_dataclass(conformance.Result) and torch.__version__
