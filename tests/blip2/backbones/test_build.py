"""The shipped toy backbones load through the real checkpoint path and meet their quality bars, and the
builder reproduces them."""

import json

import numpy as np
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Blip2VisionModel,
    OPTForCausalLM,
    T5ForConditionalGeneration,
)

from blip2.backbones.build import (
    PACKAGED_BACKBONES,
    BackbonesConfig,
    build_backbones,
    evaluate_backbones,
    file_digests,
    find_backbones,
)
from blip2.backbones.language import LanguagePretrainConfig
from blip2.backbones.vision import VisionPretrainConfig, pixel_values

PROBE_BAR = 0.95  # the shipped backbones' bar: mean attribute accuracy of a linear probe on `test`
CONTEXT_BAR = 0.9  # greedy decoding states what the LM's context says


@pytest.fixture(scope="module")
def shipped():
    return find_backbones()


def test_shipped_set_is_complete_and_small(shipped):
    assert shipped.root == PACKAGED_BACKBONES
    sizes = shipped.report()["safetensors_bytes"]
    on_disk = sum(p.stat().st_size for p in shipped.root.rglob("*.safetensors"))
    assert sum(sizes.values()) == on_disk <= 10 * 2**20


def test_every_part_loads_through_from_pretrained(shipped):
    vision = Blip2VisionModel.from_pretrained(shipped.vision)
    opt = AutoModelForCausalLM.from_pretrained(shipped.opt)
    t5 = AutoModelForSeq2SeqLM.from_pretrained(shipped.t5)
    assert isinstance(opt, OPTForCausalLM) and isinstance(t5, T5ForConditionalGeneration)
    for model in (vision, opt, t5):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert vision.config.initializer_range == 0.02 and vision.config.image_size == 64
    qformer = AutoTokenizer.from_pretrained(shipped.qformer_tokenizer)
    assert "[DEC]" in qformer.all_special_tokens
    lm = AutoTokenizer.from_pretrained(shipped.opt)
    assert lm.get_vocab() == AutoTokenizer.from_pretrained(shipped.t5).get_vocab()
    assert opt.config.vocab_size >= len(lm) and t5.config.vocab_size >= len(lm)
    # the saved image processor feeds the encoder exactly what training fed it
    image = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    processed = AutoImageProcessor.from_pretrained(shipped.vision)(images=[image], return_tensors="pt")
    assert torch.allclose(processed.pixel_values, pixel_values(image[None]), atol=1e-6)


def test_shipped_report_records_the_files_that_ship(shipped):
    """The shipped set is a build's output as written: its provenance names every file's sha256."""
    provenance = shipped.report()["provenance"]
    assert provenance["sha256"] == file_digests(shipped.root)
    assert provenance["deterministic_algorithms"] and provenance["seeds"]["vision"] == BackbonesConfig().vision.seed


def test_build_report_meets_the_bars(shipped):
    quality = shipped.report()["quality"]
    assert quality["vision"]["probe"]["test"]["mean"] >= PROBE_BAR
    for name in ("opt", "t5"):
        assert quality[name]["context_accuracy"] >= CONTEXT_BAR


def test_fresh_measurement_of_the_shipped_set_meets_the_bars(shipped):
    """Not the stored numbers: a new probe on newly drawn images, new LM evaluation draws."""
    quality = evaluate_backbones(shipped, toyworld_seed=1, probe_train_size=2000, probe_steps=300, seed=5)
    assert quality["vision"]["probe"]["test"]["mean"] >= PROBE_BAR, quality["vision"]
    for name in ("opt", "t5"):
        assert quality[name]["context_accuracy"] >= CONTEXT_BAR, quality[name]


def test_builder_writes_a_complete_loadable_set(tmp_path):
    config = BackbonesConfig(
        vision=VisionPretrainConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, batch_size=16,
                                    steps=3, warmup_steps=1, probe_train_size=64, probe_steps=5),
        language=LanguagePretrainConfig(hidden_size=32, num_layers=1, num_heads=2, ffn_size=64, batch_size=8,
                                        steps=3, warmup_steps=1),
    )
    built = build_backbones(config, tmp_path / "set", log=lambda _: None)
    assert find_backbones(tmp_path / "set") == built
    report = json.loads((built.root / "report.json").read_text())
    assert report["config"]["vision"]["steps"] == 3
    assert {"test", "novel"} <= report["quality"]["vision"]["probe"].keys()
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no staging directory left behind
    assert report["provenance"]["sha256"] == file_digests(built.root)
    assert not torch.are_deterministic_algorithms_enabled()  # deterministic mode is the build's only
    Blip2VisionModel.from_pretrained(built.vision)
    again = build_backbones(config, tmp_path / "again", log=lambda _: None)  # same config, seeds, machine:
    assert file_digests(again.root) == file_digests(built.root)  # every file byte for byte, weights included


def test_missing_set_names_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="blip2 backbones --out"):
        find_backbones(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_builder_reproduces_the_shipped_set(tmp_path, shipped):
    """The full default build, from the seed: every file byte for byte what ships (tokenizers anywhere;
    weights on a machine like the one that built the set: same CPU kind, thread count and libraries; model
    configs up to their ``transformers_version`` stamp), and the same quality."""
    built = build_backbones(BackbonesConfig(), tmp_path / "rebuilt", log=print)
    ours, theirs = built.report()["provenance"]["sha256"], file_digests(shipped.root)
    assert ours.keys() == theirs.keys()
    differ = [p for p in ours if ours[p] != theirs[p] and not same_but_stamp(built.root / p, shipped.root / p)]
    assert [p for p in differ if "tokenizer" in p] == []
    assert differ == [], "weights differ: " + json.dumps(
        {"built on": shipped.report()["environment"], "here": built.report()["environment"]})
    assert built.report()["quality"] == shipped.report()["quality"]


def same_but_stamp(ours, theirs) -> bool:
    """Two model configs that differ only in ``transformers_version``, which ``save_pretrained`` stamps
    with the installed version (the one pyproject.toml allows may be newer than the shipping machine's)."""
    if not ours.name.endswith("config.json"):
        return False
    mine, shipped = json.loads(ours.read_text()), json.loads(theirs.read_text())
    mine.pop("transformers_version", None), shipped.pop("transformers_version", None)
    return mine == shipped


def test_a_config_differing_only_in_its_transformers_stamp_is_the_same(tmp_path):
    for name, stamp in (("a", "5.24.0"), ("b", "5.25.0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"hidden_size": 8, "transformers_version": stamp}))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"hidden_size": 16, "transformers_version": "5.24.0"}))
    assert same_but_stamp(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    assert not same_but_stamp(tmp_path / "a" / "config.json", tmp_path / "c" / "config.json")
