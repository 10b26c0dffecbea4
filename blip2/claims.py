"""The papers' claims in miniature: what each compares, how a verdict is reached, and the report.

A claim compares two *arms* (the paper's recipe and its ablation) over several *seeds*. A trial is one
training run (a stage's toy config with the arm's overrides) at one seed; its seed sets the data order,
the trainable parts' initialisation and every sampling draw, while the shipped backbones stay fixed. A
stage-2 or instruction-tuning trial starts from the recipe's trial of the stage before, at the same
seed. Every trial is scored by ``blip2 evaluate``'s code on the toy world's ``test`` split (the verdict)
and ``novel`` split (reported beside it); two arms may read two metrics of the same trial (C2).

The verdict rule, fixed before any run: take the paired difference (paper's arm minus ablation, seed by
seed) on ``test`` and its 95% confidence interval (Student's t over seeds).

- **holds**: the interval excludes 0 on the paper's side;
- **does not hold**: the interval excludes 0 on the other side;
- **inconclusive**: the interval contains 0;
- **not enough seeds**: fewer seeds than ``min_seeds`` (a quick run), whatever the interval;
- a claim without a direction (C8) is **reported**, not judged;
- a claim whose ablation switch (or harness step) does not exist yet is **not runnable**, with what it
  needs: it is listed, never silently dropped.

Plain Python: no Ray, no torch; ``pipelines/reproduce.py`` runs the trials.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t by degrees of freedom (above 30: the normal's 1.96 is within 4%).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042}
SPLITS = ("test", "novel")  # test decides; novel (colour x shape pairs in no training split) is reported

VERDICT_RULE = ("paired difference (paper's arm minus ablation, seed by seed) on `test`, 95% CI by Student's t "
                "over seeds: holds if the CI excludes 0 on the paper's side, does not hold if it excludes 0 on "
                "the other side, inconclusive if it contains 0; fewer seeds than min_seeds: not enough seeds; "
                "a claim without a direction is reported, not judged; a claim whose switch does not exist yet "
                "is not runnable")


@dataclass(frozen=True)
class Arm:
    """One side of a claim: a stage's toy config with ``overrides`` (``key=value``, as on the command
    line); ``metric``, when set, replaces the claim's metric for this arm (two rankings of one trial).
    ``data``, when set, is what the trial trains on instead of the config's ``train_split``: toy-world
    splits by name and ``capfilt:<decoding>``, the web split as the seed's CapFilt step keeps it (filter:
    the seed's stage-1 recipe trial; captioner: its stage-2 recipe trial; captions by ``nucleus``
    sampling or ``beam`` search). ``build``, when set, are overrides of the shipped set's LM pretraining
    config (``blip2/backbones/language.py``): the trial, and the stage-2 trial it starts from, use a
    backbone set whose LMs a build trial pretrained afresh under them (image encoder and tokenizers
    unchanged, so the stage-1 trial is the recipe's)."""

    name: str
    stage: str  # stage1, stage2 or instruct
    overrides: tuple[str, ...] = ()
    metric: str = ""
    data: tuple[str, ...] = ()
    build: tuple[str, ...] = ()


@dataclass(frozen=True)
class Claim:
    id: str
    source: str  # the paper and where in it
    statement: str
    paper_figure: str  # what the paper reports for it (its figures are not restated: see the table named)
    task: str  # the evaluation task (blip2 evaluate's) that scores it, on each split of SPLITS
    metric: str  # the key in that task's metrics
    metric_label: str
    arms: tuple[Arm, Arm]  # (the paper's recipe, the ablation)
    direction: int = 1  # +1: the paper's arm scores higher; 0: no direction (reported only)
    limit: int = 0  # the evaluation set's first N images / questions (0: all)
    prompt: str = ""  # the evaluation's prompt (captioning: text before the caption; questions: with {})
    needs: str = ""  # not empty: what is missing before the claim can run (reported as "not runnable")

    def metric_of(self, arm: Arm) -> str:
        return arm.metric or self.metric


RECIPE = "recipe"
_RETRIEVAL = {"task": "coco_retrieval", "limit": 100}
_HELD_OUT = {"task": "vqav2", "limit": 600, "metric": "accuracy/held_out",
             "metric_label": "accuracy on the held-out family (existence), zero-shot"}

CLAIMS: dict[str, Claim] = {c.id: c for c in (
    Claim("C1", "BLIP, Table 1 (CapFilt)",
          "Stage 1 on clean + CapFilt-kept web captions beats clean + raw web captions at equal steps.",
          ("captioner + filter raise fine-tuned COCO and zero-shot Flickr retrieval recall over no bootstrapping, at "
           "each pretraining size (the paper's figures are in the table, not restated here)"),
          metric="t2i_r1_attribute_itc", metric_label="text->image R@1 (attribute level, ITC ranking)",
          arms=(Arm("clean + CapFilt web", "stage1", data=("clean", "capfilt:nucleus")),
                Arm("clean + raw web", "stage1", data=("clean", "web"))), **_RETRIEVAL),
    Claim("C2", "BLIP-2, Sec. 4.4 (retrieval: ITC picks k candidates, ITM re-ranks them, as in BLIP)",
          "Re-ranking ITC's top k with ITM beats ITC's ranking alone (same trained model).",
          "the paper gives no ITC-only figure; BLIP re-ranks k=256 (COCO) for its reported recall",
          metric="t2i_r1_attribute", metric_label="text->image R@1 (attribute level)",
          arms=(Arm("ITC then ITM re-rank", "stage1"), Arm("ITC alone", "stage1", metric="t2i_r1_attribute_itc")),
          **_RETRIEVAL),
    Claim("C3", "BLIP-2, Sec. 3.2 (ITG ablation, Table 6)",
          "Stage 1 with ITC + ITM + ITG beats ITC + ITM alone on retrieval.",
          "adding ITG to ITC + ITM improves image-text retrieval (the paper's figures are in the table, not restated here)",
          metric="t2i_r1_attribute_itc", metric_label="text->image R@1 (attribute level, ITC ranking)",
          arms=(Arm("ITC+ITM+ITG", "stage1"), Arm("ITC+ITM", "stage1", ("loss.itg_weight=0",))), **_RETRIEVAL),
    Claim("C4", "BLIP-2, Fig. 5 (effect of representation learning)",
          "Stage 2 from the stage-1 Q-Former beats stage 2 from a fresh Q-Former at equal stage-2 steps.",
          "zero-shot VQAv2 far lower without representation learning, for OPT and FlanT5 (a plot, no table)",
          task="coco_captions", limit=200, metric="caption_accuracy",
          metric_label="caption attribute accuracy (every attribute right)",
          arms=(Arm("from stage 1", "stage2"), Arm("fresh Q-Former", "stage2", ("qformer_from_stage1=false",)))),
    Claim("C5", "InstructBLIP, Table 3 (instruction-aware visual features)",
          "The instruction-aware Q-Former beats an instruction-unaware one (the instruction to the LLM only) "
          "on the held-out family.",
          "held-out average falls without instruction-aware visual features",
          arms=(Arm("instruction-aware", "instruct"), Arm("instruction-unaware", "instruct",
                                                          ("qformer_instruction=false",))),
          **_HELD_OUT),
    Claim("C6", "BLIP, Table 2 (synthetic captions: nucleus sampling vs beam search)",
          "CapFilt with nucleus-sampled synthetic captions beats beam search downstream.",
          ("nucleus-sampled captions beat beam-search ones on every downstream task although the filter finds more "
           "of them noisy (the paper's figures are in the table, not restated here)"),
          metric="t2i_r1_attribute_itc", metric_label="text->image R@1 (attribute level, ITC ranking)",
          arms=(Arm("nucleus", "stage1", data=("clean", "capfilt:nucleus")),
                Arm("beam search", "stage1", data=("clean", "capfilt:beam"))), **_RETRIEVAL),
    Claim("C7", "InstructBLIP, Sec. 4 (instruction tuning vs BLIP-2 zero-shot on held-in sets)",
          "Instruction tuning beats prompting the stage-2 model on the held-in families.",
          "held-in tasks: InstructBLIP above BLIP-2 zero-shot on every reported set",
          task="vqav2", limit=600, metric="accuracy/held_in", metric_label="accuracy on the held-in families",
          arms=(Arm("instruction-tuned", "instruct"), Arm("stage 2, prompted", "stage2"))),
    Claim("C8", "This project (what InstructBLIP's 'held out' leaves open)",
          "With `existence` removed from the toy LM's pretraining text too, what does the held-out figure become?",
          "no paper figure: reported, no direction",
          arms=(Arm("LM pretrained with existence", "instruct"),
                Arm("LM without existence", "instruct", build=("excluded_tasks=[existence]",))),
          direction=0, **_HELD_OUT),
)}


@dataclass(frozen=True)
class Factor:
    """Not a claim: how far one setting moves a figure, beside the training seeds' spread. The first arm
    is the reference, trained at every seed of the run; the others at ``seeds`` only. Reported, never
    judged."""

    id: str
    statement: str
    task: str
    metric: str
    metric_label: str
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] = (0,)
    limit: int = 0
    prompt: str = ""


FACTORS: dict[str, Factor] = {f.id: f for f in (
    Factor("F1", "The backbone build: the held-out figure over three fresh LM builds (build seeds 1, 2, 3; image "
                 "encoder and tokenizers the shipped ones) at training seed 0, beside the shipped set's spread "
                 "over the run's training seeds.",
           arms=(Arm("shipped set", "instruct"),
                 *(Arm(f"LM build seed {b}", "instruct", build=(f"seed={b}",)) for b in (1, 2, 3))), **_HELD_OUT),
)}


def t95(df: int) -> float:
    if df < 1:
        raise ValueError("a confidence interval needs at least two values")
    return _T95.get(df, 1.96)


def mean_ci(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation and 95% confidence interval (Student's t) of ``values``; one
    value: no spread, no interval."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return {"mean": mean, "sd": None, "ci": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci": [mean - half, mean + half], "n": n}


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """``a - b`` over the seeds both have, with its 95% CI and the seeds it used."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("the arms share no seed")
    return {**mean_ci([a[s] - b[s] for s in seeds]), "seeds": seeds}


def verdict(difference: dict, direction: int, min_seeds: int) -> str:
    """The rule in the module docstring, applied to a :func:`paired_difference`."""
    if direction == 0:
        return "reported"
    if difference["n"] < min_seeds or difference["ci"] is None:
        return "not enough seeds"
    low, high = sorted(d * direction for d in difference["ci"])
    if low > 0:
        return "holds"
    if high < 0:
        return "does not hold"
    return "inconclusive"


def summarise(claim: Claim, trials: Sequence[Mapping], min_seeds: int) -> dict:
    """Per arm and split the mean, spread and CI over seeds, the paired difference and the verdict on
    ``test``. ``trials``: every finished trial of this claim, ``{"arm", "seed", "values": {split: v}}``."""
    if claim.needs:
        return {"arms": {}, "difference": {}, "verdict": f"not runnable: needs {claim.needs}", "holds": False}
    by_arm: dict[str, dict[str, dict[int, float]]] = {arm.name: {s: {} for s in SPLITS} for arm in claim.arms}
    for trial in trials:
        for split in SPLITS:
            if trial["values"][split] is not None:  # None: the set had nothing to score (a cut evaluation set)
                by_arm[trial["arm"]][split][trial["seed"]] = trial["values"][split]
    paper, ablation = (arm.name for arm in claim.arms)
    summary: dict = {"arms": {}, "difference": {}}
    for name, splits in by_arm.items():
        summary["arms"][name] = {split: mean_ci(list(v.values())) if v else None for split, v in splits.items()}
    for split in SPLITS:
        if by_arm[paper][split] and by_arm[ablation][split]:
            summary["difference"][split] = paired_difference(by_arm[paper][split], by_arm[ablation][split])
    test = summary["difference"].get("test")
    summary["verdict"] = verdict(test, claim.direction, min_seeds) if test else "not run"
    summary["holds"] = summary["verdict"] == "holds"
    return summary


def summarise_factor(factor: Factor, trials: Sequence[Mapping]) -> dict:
    """Per arm and split the mean, spread and CI over its seeds, and the two spreads side by side: across
    the non-reference arms (their values at the factor's seeds) and across the reference arm's seeds."""
    by_arm: dict[str, dict[str, list[float]]] = {arm.name: {s: [] for s in SPLITS} for arm in factor.arms}
    for trial in trials:
        for split in SPLITS:
            if trial["values"][split] is not None:
                by_arm[trial["arm"]][split].append(trial["values"][split])
    reference = factor.arms[0].name
    others = [arm.name for arm in factor.arms[1:]]
    return {"arms": {name: {split: mean_ci(v) if v else None for split, v in splits.items()}
                     for name, splits in by_arm.items()},
            "spread": {split: {"across_arms": mean_ci([v for name in others for v in by_arm[name][split]])
                               if any(by_arm[name][split] for name in others) else None,
                               "across_seeds": mean_ci(by_arm[reference][split]) if by_arm[reference][split] else None}
                       for split in SPLITS},
            "verdict": "reported"}


def _fmt(stat: Mapping | None) -> str:
    if stat is None:
        return "–"
    if stat["ci"] is None:
        return f"{stat['mean']:.3f} (n=1)"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f} [{stat['ci'][0]:.3f}, {stat['ci'][1]:.3f}] (n={stat['n']})"


def _wall_lines(report: Mapping) -> list[str]:
    """A resumed run's whole wall time, invocation by invocation (empty for a run in one invocation)."""
    invocations = report.get("invocations") or []
    if len(invocations) < 2:
        return []
    parts = [f"{i['started']}: {i['wall_seconds']:.0f} s, {i['trials_run']} trials run"
             + ("" if i.get("finished", True) else ", stopped (the time to its last finished trial)")
             for i in invocations]
    return [f"The whole run, over {len(invocations)} invocations (a stopped run resumes: finished trials are kept, "
            f"those in flight rerun): **{report['total_wall_seconds']:.0f} s** of wall time ({'; '.join(parts)}).", ""]


def render_markdown(report: Mapping) -> str:
    """``CLAIMS.md`` from a ``claims.json`` report (``pipelines/reproduce.py`` writes both)."""
    lines = ["# The papers' claims, reproduced in the toy world", "",
             f"Written by `{report['command']}` on {report['finished']} in {report['wall_seconds']:.0f} s "
             f"({len(report['trials'])} trials: {report['trials_run']} run, {report['trials_reused']} reused "
             f"from an earlier run). Seeds {report['seeds']} (listed in the config before the run); "
             f"machine: {report['machine']}.", "", *_wall_lines(report),
             f"Code: commit {report.get('commit', 'unknown')}; the trials ran at "
             f"{', '.join(report.get('trial_commits', ['unknown']))} (a resumed run may span commits).", "",
             f"Verdict rule (fixed before the run): {report['verdict_rule']}. `min_seeds` = {report['min_seeds']}.",
             "", "Figures: mean ± sd [95% CI] over seeds. `test` decides; `novel` (colour x shape pairs in no "
             "training split) is reported beside it.", ""]
    for claim_id, entry in report["claims"].items():
        claim, summary = entry["claim"], entry["summary"]
        lines += [f"## {claim_id}: {claim['statement']}", "", f"Paper: {claim['source']}: {claim['paper_figure']}.",
                  "", f"Metric: {claim['metric_label']} (`{claim['task']}` `{claim['metric']}`). "
                  f"**Verdict: {summary['verdict']}.**", ""]
        lines += ["| arm | stage | overrides | test | novel |", "|---|---|---|---|---|"]
        for arm in claim["arms"]:
            stats = summary["arms"].get(arm["name"]) or {}
            overrides = (f"`{' '.join(arm['overrides']) or RECIPE}`" + (f", metric `{arm['metric']}`" if arm["metric"] else "")
                         + (f", data `{' + '.join(arm['data'])}`" if arm.get("data") else "")
                         + (f", LMs built with `{' '.join(arm['build'])}`" if arm.get("build") else ""))
            lines.append(f"| {arm['name']} | {arm['stage']} | {overrides} | {_fmt(stats.get('test'))} "
                         f"| {_fmt(stats.get('novel'))} |")
        for split, difference in summary["difference"].items():
            cells = [_fmt(difference) if s == split else "" for s in SPLITS]
            lines.append(f"| difference ({split}) | | paired over seeds {difference['seeds']} | {' | '.join(cells)} |")
        if entry.get("capfilt"):
            lines += ["", "The CapFilt steps its arms trained on (web split; threshold chosen on `val`; how well the "
                      "filter flagged the wrong web alt-texts):", "",
                      "| seed | decoding | kept images | kept captions (web / synthetic) | threshold | "
                      "flagging precision / recall | trial |", "|---|---|---|---|---|---|---|"]
            for step in sorted(entry["capfilt"], key=lambda c: (c["seed"], c["report"]["decoding"])):
                r = step["report"]
                lines.append(f"| {step['seed']} | {r['decoding']} | {r['kept']} of {r['input']} | {r['kept_captions']} "
                             f"({r['web_captions_kept']} / {r['synthetic_captions_kept']}) | {r['threshold']:.3f} | "
                             f"{r['web_filter_quality']['precision']:.3f} / {r['web_filter_quality']['recall']:.3f} "
                             f"| {step['key']} |")
        if entry.get("builds"):
            lines += ["", "The LM builds its arms ran on (the shipped image encoder and tokenizers; the LMs asked every "
                      "family alone, from the attribute words):", "",
                      "| LMs' text without | OPT answers, all / existence | T5 answers, all / existence | trial |",
                      "|---|---|---|---|"]
            for build in entry["builds"]:
                q = build["quality"]
                cells = [f"{q[n]['answer_accuracy']:.3f} / {q[n].get('answer_accuracy/existence', float('nan')):.3f}"
                         for n in ("opt", "t5")]
                lines.append(f"| {', '.join(build['language']['excluded_tasks']) or 'nothing'} | {cells[0]} | {cells[1]} "
                             f"| {build['key']} |")
        if entry["trials"]:
            lines += ["", f"Every trial ({entry['seconds']:.0f} s of training and scoring, the trials they "
                      "started from included):", "",
                      "| arm | seed | test | novel | seconds | node | trial |", "|---|---|---|---|---|---|---|"]
            for trial in sorted(entry["trials"], key=lambda t: (t["arm"], t["seed"])):
                values = [f"{v:.3f}" if v is not None else "–" for v in (trial["values"][s] for s in SPLITS)]
                lines.append(f"| {trial['arm']} | {trial['seed']} | {' | '.join(values)} | {trial['seconds']:.0f} | "
                             f"{trial['node'][:8]} | {trial['key']} |")
        lines.append("")
    for factor_id, entry in report.get("factors", {}).items():
        factor, summary = entry["factor"], entry["summary"]
        lines += [f"## {factor_id}: {factor['statement']}", "",
                  f"Metric: {factor['metric_label']} (`{factor['task']}` `{factor['metric']}`). Reported, not judged.", "",
                  "| arm | LM build | seeds | test | novel |", "|---|---|---|---|---|"]
        for arm in factor["arms"]:
            stats = summary["arms"].get(arm["name"]) or {}
            seeds = sorted({t["seed"] for t in entry["trials"] if t["arm"] == arm["name"]})
            lines.append(f"| {arm['name']} | `{' '.join(arm['build']) or 'shipped'}` | {seeds} | "
                         f"{_fmt(stats.get('test'))} | {_fmt(stats.get('novel'))} |")
        for label, key in (("across the fresh builds", "across_arms"), ("across training seeds, shipped set", "across_seeds")):
            cells = [_fmt(summary["spread"][s][key]) for s in SPLITS]
            lines.append(f"| spread {label} | | | {' | '.join(cells)} |")
        lines += ["", f"Its trials took {entry['seconds']:.0f} s (the trials they started from included).", ""]
    return "\n".join(lines)
