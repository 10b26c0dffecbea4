"""The command line, called exactly as a user's shell would (console script and ``main(argv)``)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blip2.config import load_config
from blip2.training.config import InstructConfig, Stage1Config, Stage2Config
from pipelines import backbones, cli, demo, evaluate, reproduce, toyworld, train
from pipelines.common import CONFIG_DIR


def test_console_script_lists_every_subcommand():
    beside = Path(sys.executable).with_name("blip2")  # the venv's bin, whether or not it is on PATH
    exe = str(beside) if beside.exists() else shutil.which("blip2") or pytest.skip("console script not installed")
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for name in cli.SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", list(cli.SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"blip2 {name}" in capsys.readouterr().out


def test_unknown_subcommand_fails_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nope"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("module, config_cls, name", [
    (toyworld, toyworld.ToyWorldJobConfig, "toyworld.yaml"),
    (backbones, backbones.BackbonesJobConfig, "backbones.yaml"),
    (demo, demo.DemoConfig, "demo.yaml"),
    (train, Stage1Config, "stage1_toy.yaml"),
    (train, Stage2Config, "stage2_toy.yaml"),
    (train, InstructConfig, "instruct_toy.yaml"),
    (train, Stage1Config, "stage1_gpu.yaml"),
    (train, Stage2Config, "stage2_gpu.yaml"),
    (train, InstructConfig, "instruct_gpu.yaml"),
    (evaluate, evaluate.EvaluateConfig, "evaluate_toy.yaml"),
    (reproduce, reproduce.ReproduceConfig, "reproduce.yaml"),
    *[(evaluate, evaluate.EvaluateConfig, f"evaluate/{task}.yaml")
      for task in ("coco_retrieval", "coco_captions", "nocaps", "vqav2", "okvqa", "gqa")],
])
def test_shipped_configs_load_into_their_typed_config(module, config_cls, name, capsys):
    assert isinstance(load_config(config_cls, CONFIG_DIR / name), config_cls)
    stage = [s for s, (cls, _) in getattr(module, "TASKS", {}).items() if cls is config_cls]
    with pytest.raises(SystemExit) as exit_info:
        module.main([*stage, "--config", str(CONFIG_DIR / name), "--print-config"])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert (yaml.safe_load((CONFIG_DIR / name).read_text()) or {}).keys() <= printed.keys()


def test_toyworld_writes_then_reuses(tmp_path, capsys):
    out = tmp_path / "world"
    assert toyworld.main(["--out", str(out), "--size", "80"]) == 0
    first = capsys.readouterr().out
    assert "web        80 images" in first and "wrong: 28/80" in first
    assert first.splitlines()[-1].startswith("toy world done: ")  # one summary line ends the job
    assert len(list((out / "webdataset" / "web").glob("*.tar"))) == 1
    assert toyworld.main(["--out", str(out), "--size", "80"]) == 0
    assert "reusing" in capsys.readouterr().out


def test_bad_override_exits_2_with_a_reason(capsys):
    with pytest.raises(SystemExit) as exit_info:
        toyworld.main(["world.web_noise_rate=2"])
    assert exit_info.value.code == 2
    assert "web_noise_rate must be in [0, 1]" in capsys.readouterr().err


def test_module_entrypoint_runs_as_python_dash_m(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipelines.toyworld", "--out", str(tmp_path), "--size", "20"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "manifest.json").exists()
