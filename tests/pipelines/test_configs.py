"""Every shipped config, as a user with a fresh clone meets it: it loads through its job's own parser, it
says only what differs from the job's defaults, and every local path it reads either exists (or the job
makes it) or running the job with it fails at once with an error naming the path and the command that
writes it (for a cluster path, the path alone)."""

import importlib
import json
from pathlib import Path

import pytest
import yaml

from blip2.capfilt.config import CapFiltConfig
from blip2.config import from_dict, load_config, to_dict
from blip2.training.config import InstructConfig, Stage1Config, Stage2Config
from pipelines.backbones import BackbonesJobConfig
from pipelines.common import CONFIG_DIR
from pipelines.demo import DemoConfig
from pipelines.evaluate import EvaluateConfig
from pipelines.reproduce import ReproduceConfig
from pipelines.serve import ServeConfig
from pipelines.toyworld import ToyWorldJobConfig

# config file -> (job module, arguments before the options, typed config)
JOBS = {
    "backbones.yaml": ("backbones", [], BackbonesJobConfig),
    "capfilt_gpu.yaml": ("capfilt", [], CapFiltConfig),
    "capfilt_toy.yaml": ("capfilt", [], CapFiltConfig),
    "demo.yaml": ("demo", [], DemoConfig),
    "evaluate_toy.yaml": ("evaluate", [], EvaluateConfig),
    **{f"evaluate/{task}.yaml": ("evaluate", [], EvaluateConfig)
       for task in ("coco_captions", "coco_retrieval", "gqa", "nocaps", "okvqa", "vqav2")},
    "instruct_gpu.yaml": ("train", ["instruct"], InstructConfig),
    "instruct_toy.yaml": ("train", ["instruct"], InstructConfig),
    "reproduce.yaml": ("reproduce", [], ReproduceConfig),
    "serve_toy.yaml": ("serve", [], ServeConfig),
    "stage1_gpu.yaml": ("train", ["stage1"], Stage1Config),
    "stage1_toy.yaml": ("train", ["stage1"], Stage1Config),
    "stage2_gpu.yaml": ("train", ["stage2"], Stage2Config),
    "stage2_toy.yaml": ("train", ["stage2"], Stage2Config),
    "toyworld.yaml": ("toyworld", [], ToyWorldJobConfig),
}
SERVE_DEPLOY = "serve_deploy.yaml"  # Ray Serve's own format: tests/pipelines/test_serve_deploy.py checks it
# what a job writes, or (training's `toyworld`) writes itself when it is missing: never a missing input
OUTPUTS = {"out", "output", "storage_path", "toyworld"}


def test_every_shipped_config_is_checked_here():
    assert {str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml")} == {*JOBS, SERVE_DEPLOY}


def input_paths(config: dict, top_level_only: bool = False, prefix: str = "") -> list[tuple[str, str]]:
    """(key, path) for every value of the resolved config that names a local file or directory."""
    found = []
    for key, value in config.items():
        if key in OUTPUTS:
            continue
        if isinstance(value, dict):
            if not top_level_only:
                found += input_paths(value, prefix=f"{prefix}{key}.")
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and "/" in item and item != "/" and not any(c.isspace() for c in item):
                found.append((prefix + key, item))
    return found


def _run(job: str, argv: list[str]):
    module = importlib.import_module(f"pipelines.{job}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    return exit_info.value.code


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_shipped_config_runs_from_a_fresh_clone_or_names_what_it_needs(name, tmp_path, monkeypatch, capsys):
    job, prefix, _ = JOBS[name]
    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/ yet
    assert _run(job, [*prefix, "--config", str(CONFIG_DIR / name), "--print-config"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    # the demo makes every input of its steps itself; only its own top-level paths are inputs
    missing = [(key, path) for key, path in input_paths(resolved, top_level_only=job == "demo")
               if not Path(path).exists()]
    if not missing:
        return  # every input ships with the repository (or the job writes it): it runs
    code = _run(job, [*prefix, "--config", str(CONFIG_DIR / name)])  # must stop before any work
    error = capsys.readouterr().err
    assert code not in (0, None), error
    named = [(key, path) for key, path in missing if path in error]
    assert named, f"{name}: the error names none of {missing}: {error}"
    key, path = named[0]
    assert Path(path).is_absolute() or "`blip2 " in error or "`make " in error, \
        f"{name}: {key}={path} is missing and the error names no command that writes it: {error}"


def _restated(data: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys whose YAML value equals the dataclass default: a second place for the same setting."""
    same = []
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            same += _restated(value, defaults[key], f"{prefix}{key}.")
        elif key in defaults and from_dict_value(value) == defaults[key]:
            same.append(prefix + key)
    return same


def from_dict_value(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_shipped_config_holds_only_what_differs_from_the_defaults(name):
    _, _, config_cls = JOBS[name]
    data = yaml.safe_load((CONFIG_DIR / name).read_text()) or {}
    defaults = to_dict(from_dict(config_cls, {}))
    assert _restated(data, defaults) == [], f"{name} restates the defaults of {config_cls.__name__}"


def test_the_demos_stage1_padding_holds_every_toy_caption_whole():
    """demo.yaml pads stage-1 captions to a short fixed length for speed: that gives the same losses only
    while no caption is cut, so every text the toy world writes (the alt-texts of every split, junk and
    wrong ones included) fits it with its special tokens."""
    from transformers import AutoTokenizer

    from blip2.backbones.build import find_backbones
    from blip2.toyworld.corpus import SPLITS, ToyWorldConfig, generate_split

    demo = load_config(DemoConfig, CONFIG_DIR / "demo.yaml")
    tokenizer = AutoTokenizer.from_pretrained(find_backbones("").qformer_tokenizer)
    world = ToyWorldConfig(web_size=600, clean_size=300, val_size=50, test_size=50, novel_size=50)
    texts = {r.alt_text for split in SPLITS for r in generate_split(world, split)}
    longest = max(len(ids) for ids in tokenizer(sorted(texts))["input_ids"])
    for section in (demo.bootstrap_filter, demo.stage1):
        assert longest <= section.model.max_text_length < 32, (longest, section.model.max_text_length)
