"""The toy CapFilt filter, bootstrapped in two rounds as BLIP does, and the record of how well it filters.

    python benchmarks/capfilt_bootstrap.py                        # what `make capfilt-bootstrap` runs
    python benchmarks/capfilt_bootstrap.py --seeds 0,1,2 --round2-seeds 0 --out benchmarks/capfilt_bootstrap.json
    # round 1 is stage1_toy.yaml on `clean`: --round1 takes benchmarks/toy_runs.py's runs instead of retraining
    python benchmarks/capfilt_bootstrap.py ... --round1 'S/runs/stage1-toy-seed{seed}'

Per seed, on one local Ray instance:

1. round 1: stage 1 with the shipped ``pipelines/configs/stage1_toy.yaml`` on the `clean` split;
2. its threshold for ITM and for ITC, each chosen on the toy world's `val` right / wrong caption pairs
   (``blip2.capfilt.calibrate``; never on `web`);
3. CapFilt (``pipelines/configs/capfilt_toy.yaml``: synthetic captions, then the filter) over the `web` split
   with round 1's ITM filter at its threshold, and the same filter scoring with ITC (web captions only: the
   web precision / recall do not depend on the synthetic captions);
4. round 2: stage 1 again, on `clean` + round 1's kept web records (`train_data`);
5. round 2's thresholds on `val` and its web precision / recall with ITM and with ITC (web captions only).

Precision / recall are of flagging the web alt-texts that are wrong; the web split's ground truth is read
only by CapFilt's report. The first seed's round 2 is ``<storage>/capfilt-boot-r2/model``: the filter that
``capfilt_toy.yaml`` reads when ``--storage`` is ``runs/capfilt`` (the default). Stage-1 overrides for every
round (``--set optim.max_steps=40`` for a quick try) make a record that is not the shipped config's.

The record (``--out``, default ``<storage>/capfilt_bootstrap.json``) holds per seed and round the model,
each score's val threshold and val precision / recall, and the web precision / recall and kept counts;
with the commit, date, machine and load. ``benchmarks/capfilt_bootstrap.json`` is the committed one, from
which ``python benchmarks/readme_results.py`` generates the README's CapFilt table (CI checks they agree).
Two stage-1 runs of about ten minutes each per seed on two idle cores; the CapFilt passes take seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run_all import machine  # noqa: E402
from benchmarks.toy_runs import _seeds, reuse_refusal  # noqa: E402
from blip2.capfilt.config import CapFiltConfig  # noqa: E402
from blip2.config import load_config  # noqa: E402
from blip2.training.config import Stage1Config  # noqa: E402
from pipelines.common import CONFIG_DIR, init_ray, quiet_progress_bars  # noqa: E402
from pipelines.demo_record import commit as git_commit  # noqa: E402
from pipelines.toyworld import ToyWorldJobConfig, ensure_toyworld  # noqa: E402
from pipelines.train import fit  # noqa: E402

SCORES = ("itm", "itc")


def _calibrate(model: Path, score: str, config: Stage1Config) -> dict:
    """``score``'s threshold for ``model``, chosen on the toy world's `val` pairs."""
    from blip2.capfilt.calibrate import calibrate
    from blip2.capfilt.config import FilterConfig
    from blip2.capfilt.models import CaptionFilter
    from blip2.toyworld.corpus import generate_split

    chosen = calibrate(CaptionFilter(FilterConfig(source=str(model), score=score), device="cpu"),
                       generate_split(config.world, "val"), seed=config.world.seed)
    return {k: chosen[k] for k in ("threshold", "precision", "recall", "f1", "pairs")}


def _capfilt(world: Path, model: Path, score: str, threshold: float, out: Path, captions: bool) -> dict:
    """CapFilt of the web split with ``model``'s ``score`` at ``threshold`` (the toy config's settings
    otherwise; ``captions=False``: no synthetic captions, the web captions are scored only)."""
    from pipelines import capfilt

    overrides = [f"input.path={world / 'webdataset' / 'web'}", f"output={out}", f"filter.source={model}",
                 f"filter.score={score}", f"filter.threshold={threshold}"]
    config = load_config(CapFiltConfig, CONFIG_DIR / "capfilt_toy.yaml", overrides)
    if not captions:
        config = dataclasses.replace(config, captioner=dataclasses.replace(config.captioner, num_captions=0))
    report = capfilt.run(config)
    quality = report["filter_quality"]
    return {"precision": quality["precision"], "recall": quality["recall"], "f1": quality["f1"],
            "records": quality["records"], "kept": report["counts"]["kept"],
            "kept_captions": report.get("kept_captions"), "synthetic_captions": captions, "output": str(out)}


def round_config(seed: int, round_: int, world: Path, storage: Path, train_data: list[str] = (),
                 extra: list[str] = ()) -> tuple[Stage1Config, list[str]]:
    """Round ``round_``'s stage-1 config for ``seed`` (``stage1_toy.yaml`` with the round's name, seed,
    paths and training data, then ``extra``), and the overrides that made it."""
    name = f"capfilt-boot-r{round_}" + (f"-seed{seed}" if seed else "")
    overrides = [f"seed={seed}", f"toyworld={world}", f"storage_path={storage}", f"name={name}", *extra]
    if train_data:
        overrides.append("train_data=[" + ",".join(train_data) + "]")
    return load_config(Stage1Config, CONFIG_DIR / "stage1_toy.yaml", overrides), overrides


def one_round(seed: int, round_: int, world: Path, storage: Path, train_data: list[str], extra: list[str],
              trained: Path | None = None, reuse: bool = False) -> dict:
    """Train round ``round_``'s filter (or take ``trained``, a run of the same config and seed), choose its
    thresholds on val, filter the web split with each score. ``reuse``: a finished run of this round
    already under ``storage`` is taken instead of trained again. Either must have trained exactly as the
    round's config says (``benchmarks/toy_runs.py``'s :func:`reuse_refusal`: seed, steps, training data and
    every other training setting)."""
    config, overrides = round_config(seed, round_, world, storage, train_data, extra)
    name = config.name
    if trained is None and reuse and not reuse_refusal(config):
        trained = config.output
    refusal = reuse_refusal(config, trained) if trained else ""
    if refusal:
        raise SystemExit(f"{trained} is not round {round_} of this run (seed {seed}, {config.optim.max_steps} steps, "
                         f"training data {list(config.train_data) or [config.train_split]}): {refusal}")
    start = time.perf_counter()
    run_dir = trained or fit("stage1", config)
    train_seconds, model = time.perf_counter() - start, run_dir / "model"
    report = json.loads((run_dir / "report.json").read_text())
    row = {"seed": seed, "round": round_, "model": str(model), "train_data": train_data or ["clean"],
           "reused": str(trained) if trained else None,
           "overrides": overrides, "steps": report["steps"], "train_seconds": round(train_seconds, 1),
           "headline": report["headline"], "scores": {}}
    for score in SCORES:
        chosen = _calibrate(model, score, config)
        # round 1's ITM pass is the one whose kept records round 2 trains on: with synthetic captions
        full = round_ == 1 and score == "itm"
        web = _capfilt(world, model, score, chosen["threshold"], storage / f"{name}-web-{score}", captions=full)
        row["scores"][score] = {"val": chosen, "web": web}
        print(f"== seed {seed} round {round_} {score}: val threshold {chosen['threshold']:.3f} -> web precision "
              f"{web['precision']:.3f}, recall {web['recall']:.3f}", flush=True)
    return row


def run(seeds: list[int], storage: Path, world: Path, extra: list[str], round1: str = "",
        round2_seeds: list[int] | None = None, round2: str = "", reuse: bool = False) -> list[dict]:
    import ray

    quiet_progress_bars()
    ensure_toyworld(ToyWorldJobConfig(out=str(world)))
    rows = []
    init_ray(include_dashboard=False)
    try:
        for seed in seeds:
            first = one_round(seed, 1, world, storage, [], extra, Path(round1.format(seed=seed)) if round1 else None,
                              reuse)
            rows.append(first)
            if round2_seeds is None or seed in round2_seeds:
                kept = Path(first["scores"]["itm"]["web"]["output"]) / "kept"
                rows.append(one_round(seed, 2, world, storage, [str(world / "webdataset" / "clean"), str(kept)], extra,
                                      Path(round2.format(seed=seed)) if round2 else None, reuse))
    finally:
        ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/capfilt_bootstrap.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=_seeds, default=[0], help="training seeds (default: 0); the first seed's "
                        "round 2 is <storage>/capfilt-boot-r2/model")
    parser.add_argument("--round2-seeds", type=_seeds, help="the seeds that go on to round 2 (default: every "
                        "seed; it must include the first)")
    parser.add_argument("--storage", default="runs/capfilt", help="where the rounds and CapFilt outputs go "
                        "(default: %(default)s, where capfilt_toy.yaml reads the filter)")
    parser.add_argument("--toyworld", default="runs/toyworld", help="the toy world (made if missing; default: "
                        "%(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a stage-1 override for every round (repeatable; the record says so)")
    parser.add_argument("--round1", default="", metavar="DIR", help="take round 1 from these runs of "
                        "stage1_toy.yaml on `clean` (e.g. benchmarks/toy_runs.py --storage S's "
                        "S/runs/stage1-toy-seed{seed}) instead of training it again; the record says so")
    parser.add_argument("--round2", default="", metavar="DIR", help="take round 2 from these runs (an "
                        "earlier run of this script with the same --storage: it must have trained on this run's "
                        "round-1 kept records)")
    parser.add_argument("--reuse", action="store_true", help="take a round whose run already finished under "
                        "--storage (trained exactly as the round's config says: an earlier or interrupted run of "
                        "this script) instead of training it again; the record says so")
    parser.add_argument("--out", help="the record to write (default: <storage>/capfilt_bootstrap.json)")
    args = parser.parse_args(argv)
    if args.round2_seeds is not None and args.seeds[0] not in args.round2_seeds:
        parser.error(f"--round2-seeds must include the first seed ({args.seeds[0]}): its round 2 is the toy filter")
    storage, world = Path(args.storage).resolve(), Path(args.toyworld).resolve()
    out = Path(args.out) if args.out else storage / "capfilt_bootstrap.json"
    commit, load_before = git_commit(), os.getloadavg()[0]
    started, start = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    rows = run(args.seeds, storage, world, args.set, args.round1, args.round2_seeds, args.round2, args.reuse)
    options = [f"--seeds {','.join(map(str, args.seeds))}"] if args.seeds != [0] else []
    options += [f"--round2-seeds {','.join(map(str, args.round2_seeds))}"] if args.round2_seeds is not None else []
    options += [f"--set {override}" for override in args.set] + (["--round1 DIR"] if args.round1 else []) + (
        ["--round2 DIR"] if args.round2 else []) + (["--reuse"] if args.reuse else [])
    record = {"command": " ".join(["python benchmarks/capfilt_bootstrap.py", *options]), "commit": commit,
              "date": started.strftime("%Y-%m-%d %H:%M UTC"), "wall_seconds": round(time.perf_counter() - start),
              "machine": machine(), "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
              "config": {"stage1": "pipelines/configs/stage1_toy.yaml", "capfilt": "pipelines/configs/capfilt_toy.yaml"},
              "rounds": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    final = next(r for r in rows if r["round"] == 2)  # the first seed's
    score = load_config(CapFiltConfig, CONFIG_DIR / "capfilt_toy.yaml", []).filter.score
    print(f"wrote {out}. The filter capfilt_toy.yaml reads: {final['model']}; its {score} threshold chosen on val: "
          f"{final['scores'][score]['val']['threshold']:.3f} (blip2 capfilt --config pipelines/configs/capfilt_toy.yaml "
          f"filter.threshold=<it> if it differs from the config's)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
