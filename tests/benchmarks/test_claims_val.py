"""benchmarks/claims_val.py's probe of C5: an instruction-aware export copied with its Q-Former told to go
without the instruction; the run's own export is left as it was. (Scoring on `val` runs in
tests/pipelines/test_reproduce.py, over a real quick run's trials.)"""

import json

from blip2.models.instruct import instruction_aware
from tests.benchmarks import load_script


def test_the_probe_copies_the_export_with_the_qformer_instruction_switched_off(tmp_path):
    from transformers import AutoConfig

    model = tmp_path / "run" / "instruct-seed0-abc" / "model"
    model.mkdir(parents=True)
    original = {"model_type": "instructblip", "qformer_config": {}, "vision_config": {}, "text_config": {"model_type": "opt"}}
    (model / "config.json").write_text(json.dumps(original))
    (model / "model.safetensors").write_bytes(b"weights")
    copy = load_script("claims_val").without_qformer_instruction(model, tmp_path / "probe")
    assert copy != model and (copy / "model.safetensors").read_bytes() == b"weights"
    assert not instruction_aware(AutoConfig.from_pretrained(copy))  # what blip2 evaluate reads
    assert instruction_aware(AutoConfig.from_pretrained(model))
    assert json.loads((model / "config.json").read_text()) == original
