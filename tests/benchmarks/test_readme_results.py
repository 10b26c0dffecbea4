"""The README's figures equal the committed result files (RESULTS.md, demo_run.json): CI fails when they drift apart."""

import json
import re
from pathlib import Path

import pytest

from blip2.config import load_config
from blip2.training.config import Stage1Config
from pipelines.common import CONFIG_DIR
from pipelines.demo_record import run_record
from tests.benchmarks import load_script

ROOT = Path(__file__).resolve().parents[2]


def load():
    return load_script("readme_results")


def test_the_readme_benchmark_figures_equal_results_md(capsys):
    assert load().main(["--check"]) == 0, capsys.readouterr().err


def test_a_figure_that_differs_fails_the_check(tmp_path, monkeypatch, capsys):
    module = load()
    readme = tmp_path / "README.md"
    figure = module.first_table(module.RESULTS.read_text())[0]["result"]  # whatever the page measured last
    assert figure in module.README.read_text()
    readme.write_text(module.README.read_text().replace(figure, figure.replace("**", "**9", 1), 1))
    monkeypatch.setattr(module, "README", readme)
    assert module.main(["--check"]) == 1
    assert "readme_results.py" in capsys.readouterr().err
    assert module.main([]) == 0 and module.main(["--check"]) == 0  # regenerating puts it right


def test_the_readme_demo_block_is_the_committed_demo_record(tmp_path, monkeypatch, capsys):
    module = load()
    record = json.loads(module.DEMO_RUN.read_text())
    assert module.demo_block(record) in module.README.read_text()
    readme = tmp_path / "README.md"
    readme.write_text(module.README.read_text().replace(record["lines"][2], record["lines"][2].replace("0.", "9.", 1)))
    monkeypatch.setattr(module, "README", readme)
    assert module.main(["--check"]) == 1 and "demo_run.json" in capsys.readouterr().err


def test_a_demo_run_record_is_what_the_generator_reads_and_a_partial_run_is_refused(tmp_path, monkeypatch):
    """blip2 demo's <out>/demo_run.json has the committed record's schema; --demo-run copies a full run."""
    module = load()
    lines = ["toy world              10 images", "wall time (s)          toyworld 1"]
    monkeypatch.setattr(module, "DEMO_RUN", tmp_path / "demo_run.json")
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(run_record(lines, ["toyworld"], 61.4, 0.5)))
    with pytest.raises(SystemExit, match="reused"):
        module.record_demo_run(partial)
    full = tmp_path / "full.json"
    full.write_text(json.dumps(run_record(lines, [], 61.4, 0.5)))
    module.record_demo_run(full)
    block = module.demo_block(json.loads(module.DEMO_RUN.read_text()))
    assert "What `blip2 demo` printed" in block and "1 min 1 s wall" in block and lines[0] in block


def test_the_backbone_build_time_is_the_shipped_report_s():
    """One figure for the toy backbones' build, the one their report.json records, wherever it is quoted."""
    report = json.loads((ROOT / "blip2" / "assets" / "toy_backbones" / "report.json").read_text())
    seconds = f"{sum(report['train_seconds'].values()):.0f} s"
    assert seconds in (ROOT / "docs" / "toy-world-and-backbones.md").read_text()
    assert re.findall(r"(\d+) s of training", (ROOT / "README.md").read_text()) in ([], [seconds[:-2]])


def test_the_readme_toy_config_block_is_the_committed_toy_runs_record(tmp_path, monkeypatch, capsys):
    """The shipped toy configs' figures (benchmarks/toy_runs.py's record) are the README's, row for row."""
    module = load()
    record = json.loads(module.TOY_RUNS.read_text())
    block = module.toy_block(record)
    assert block in module.README.read_text()
    assert {run["stage"] for run in record["runs"]} == {"stage1", "stage2", "instruct"}
    for run in record["runs"]:  # every job's row, with its own held-out headline figure
        figure = {"stage1": "t2i_r1_attribute_itc", "stage2": "caption_accuracy", "instruct": "accuracy/held_out"}
        name = {"stage1": "coco_retrieval/test", "stage2": "coco_captions/test", "instruct": "vqav2/test"}
        value = run["benchmarks"][name[run["stage"]]][figure[run["stage"]]]
        assert f"{value:.2f}" in block or f"{value:.3f}" in block
    shipped = load_config(Stage1Config, CONFIG_DIR / "stage1_toy.yaml", [])  # the record scored as it says
    for run in (r for r in record["runs"] if r["stage"] == "stage1"):
        for split in ("test", "novel"):
            scored = run["benchmarks"][f"coco_retrieval/{split}"]
            assert (scored["rerank_k"], scored["rerank_itc_scale"]) == (shipped.rerank_k, shipped.rerank_itc_scale)
    held_out = record["runs"][-1]["benchmarks"]["vqav2/test"]["accuracy/held_out"]
    readme = tmp_path / "README.md"
    readme.write_text(module.README.read_text().replace(f"(zero-shot) {held_out:.3f}", "(zero-shot) 0.123", 1))
    monkeypatch.setattr(module, "README", readme)
    assert module.main(["--check"]) == 1 and "toy_runs.json" in capsys.readouterr().err


def test_a_record_with_novel_for_stage2_and_instruct_shows_it_beside_test():
    """The toy configs score `novel` at every stage: a record that has it puts it in the job's row."""
    module = load()
    record = json.loads(module.TOY_RUNS.read_text())
    for run in record["runs"]:
        if run["stage"] == "stage2":
            run["benchmarks"]["coco_captions/novel"] = {"num_images": 200, "caption_accuracy": 0.4321, "bleu4": 0.5,
                                                        "cider_d": 1.0}
        if run["stage"] == "instruct":
            run["benchmarks"]["vqav2/novel"] = {"accuracy/held_in": 0.877, "accuracy/held_out": 0.654}
    block = module.toy_block(record)
    assert "`novel` (200 images): attribute accuracy 0.43" in block
    assert "`novel`: held-in 0.877, held-out 0.654" in block


def test_the_readme_capfilt_table_is_the_committed_bootstrap_record_and_the_toy_config_uses_its_threshold(
        tmp_path, monkeypatch, capsys):
    """The two-round CapFilt table (benchmarks/capfilt_bootstrap.py's record) is the README's; the toy
    CapFilt config filters with the score and the `val` threshold that record chose for its round 2."""
    from blip2.capfilt.config import CapFiltConfig

    module = load()
    record = json.loads(module.CAPFILT_RUN.read_text())
    block = module.capfilt_block(record)
    assert block in module.README.read_text()
    rows = [(r["seed"], r["round"], score) for r in record["rounds"] for score in r["scores"]]
    assert len(block.splitlines()) == len(rows) + 6 and {r for _, r, _ in rows} == {1, 2}
    shipped = load_config(CapFiltConfig, CONFIG_DIR / "capfilt_toy.yaml", []).filter
    final = next(r for r in record["rounds"] if r["round"] == 2)  # the first seed's: the filter the config reads
    assert shipped.source.endswith("capfilt-boot-r2/model") and final["model"].endswith("capfilt-boot-r2/model")
    assert shipped.threshold == round(final["scores"][shipped.score]["val"]["threshold"], 3)
    web = final["scores"][shipped.score]["web"]
    readme = tmp_path / "README.md"
    readme.write_text(module.README.read_text().replace(f"| {web['precision']:.3f} | {web['recall']:.3f} |",
                                                        "| 0.123 | 0.456 |", 1))
    monkeypatch.setattr(module, "README", readme)
    assert module.main(["--check"]) == 1 and "capfilt_bootstrap.json" in capsys.readouterr().err


def test_the_readme_claims_table_is_the_committed_full_reproduce_run(tmp_path, monkeypatch, capsys):
    """benchmarks/claims.json is one full `blip2 reproduce` run (every claim, at least min_seeds seeds per
    arm, every trial listed); CLAIMS.md is its rendering and the README's claims table its summary."""
    from blip2.claims import CLAIMS, render_markdown

    module = load()
    record = json.loads(module.CLAIMS_RUN.read_text())
    assert (ROOT / "benchmarks" / "CLAIMS.md").read_text() == render_markdown(record)
    assert list(record["claims"]) == list(CLAIMS) and len(record["seeds"]) >= record["min_seeds"] >= 5
    assert "--quick" not in record["command"]
    for claim_id, entry in record["claims"].items():
        assert entry["runnable"], claim_id
        for arm in entry["claim"]["arms"]:
            seeds = {t["seed"] for t in entry["trials"] if t["arm"] == arm["name"]}
            assert seeds == set(record["seeds"]), (claim_id, arm["name"])
    block = module.claims_block(record)
    assert block in module.README.read_text()
    for claim_id, entry in record["claims"].items():  # a row per claim, with its verdict
        assert any(row.startswith(f"| {claim_id}: ") and f"**{entry['summary']['verdict']}**" in row
                   for row in block.splitlines())
    first = next(iter(record["claims"].values()))["summary"]["verdict"]
    readme = tmp_path / "README.md"
    readme.write_text(module.README.read_text().replace(f"**{first}**", "**holds, trust me**", 1))
    monkeypatch.setattr(module, "README", readme)
    assert module.main(["--check"]) == 1 and "claims.json" in capsys.readouterr().err
