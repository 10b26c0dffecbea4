"""The run's report: counts and the accounting invariant, score summary, filter quality, histogram.

Built from what is on disk (markers and output files), not from the last run's memory, so a run that
resumed reports the whole corpus exactly like one that never stopped.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from blip2.capfilt.outputs import completed_shards
from blip2.metrics import filter_precision_recall


class AccountingError(RuntimeError):
    """input != kept + filtered + rejected somewhere: a record was lost or written twice."""


def _rows_on_disk(out: Path, folder: str, shard: str) -> int:
    path = out / folder / f"{shard}.parquet"
    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


def check_accounting(out: str | Path, shards: list[str]) -> dict:
    """Every listed shard has a marker, and per shard input = kept + filtered + rejected, both in its
    marker and in the files on disk; kept keys are unique. Raises AccountingError otherwise."""
    out = Path(out)
    markers = completed_shards(out)
    missing = [s for s in shards if s not in markers]
    if missing:
        raise AccountingError(f"{len(missing)} shard(s) not finished: {', '.join(missing[:5])}")
    totals = Counter()
    for shard in shards:
        marker = markers[shard]
        on_disk = {f: _rows_on_disk(out, f, shard) for f in ("kept", "filtered", "rejected")}
        if marker["input"] != marker["kept"] + marker["filtered"] + marker["rejected"]:
            raise AccountingError(f"shard {shard}: marker does not add up: {marker}")
        if any(on_disk[f] != marker[f] for f in on_disk):
            raise AccountingError(f"shard {shard}: files hold {on_disk}, marker says {marker}")
        totals.update({k: marker[k] for k in ("input", "kept", "filtered", "rejected")})
    keys = [k for s in shards if (out / "kept" / f"{s}.parquet").exists()
            for k in pq.read_table(out / "kept" / f"{s}.parquet", columns=["key"]).column("key").to_pylist()]
    duplicated = [k for k, n in Counter(keys).items() if n > 1]
    if duplicated:
        raise AccountingError(f"{len(duplicated)} key(s) kept more than once, e.g. {duplicated[:3]}")
    return {k: totals[k] for k in ("input", "kept", "filtered", "rejected")}


def _summary(values: np.ndarray) -> dict:
    values = values[~np.isnan(values)]
    if not len(values):
        return {"count": 0}
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"count": int(len(values)), "mean": float(values.mean()), "min": float(values.min()),
            **{f"p{p}": float(v) for p, v in zip((5, 25, 50, 75, 95), q, strict=True)}, "max": float(values.max())}


def _scores(out: Path, shards: list[str]) -> dict[str, list]:
    columns: dict[str, list] = {"web_score": [], "synthetic_scores": [], "ground_truth": [], "status": []}
    for shard in shards:
        path = out / "scores" / f"{shard}.parquet"
        if path.exists():
            table = pq.read_table(path, columns=list(columns))
            for name in columns:
                columns[name] += table.column(name).to_pylist()
    return columns


def filter_quality(web_scores: list, ground_truth: list, threshold: float) -> dict | None:
    """Precision/recall of flagging wrong alt-texts ("wrong" is the positive class): a web caption is
    flagged when the filter scores it below ``threshold`` or it was unusable (missing/empty/...).
    None when no record carries ground truth."""
    pairs = [(s, g) for s, g in zip(web_scores, ground_truth, strict=True) if g is not None]
    if not pairs:
        return None
    flagged = [s is None or s < threshold for s, _ in pairs]
    return {"records": len(pairs), **filter_precision_recall(flagged, [not g for _, g in pairs])}


def build_report(out: str | Path, shards: list[str], threshold: float, extra: dict | None = None,
                 score: str = "itm") -> dict:
    """Check the accounting, summarise, write ``report.json`` and ``scores.png``; return the report."""
    out = Path(out)
    counts = check_accounting(out, shards)
    markers = completed_shards(out)
    reasons, issues = Counter(), Counter()
    web_kept = synthetic_kept = duplicates = 0
    for shard in shards:
        reasons.update(markers[shard]["reasons"])
        issues.update(markers[shard]["caption_issues"])
        web_kept += markers[shard]["web_kept"]
        synthetic_kept += markers[shard]["synthetic_kept"]
        duplicates += markers[shard]["duplicates_dropped"]
    scores = _scores(out, shards)
    web = np.array([np.nan if s is None else s for s in scores["web_score"]], dtype=float)
    synthetic = np.array([s for row in scores["synthetic_scores"] for s in row if s is not None], dtype=float)
    n = max(counts["input"], 1)
    report = {
        "counts": counts,
        "invariant": f"input {counts['input']} = kept {counts['kept']} + filtered {counts['filtered']} + "
                     f"rejected {counts['rejected']}",
        "invariant_holds": counts["input"] == counts["kept"] + counts["filtered"] + counts["rejected"],
        "rates": {k: counts[k] / n for k in ("kept", "filtered", "rejected")},
        "rejected_by_reason": dict(sorted(reasons.items())),
        "web_caption_issues": dict(sorted(issues.items())),
        "kept_captions": {"web": web_kept, "synthetic": synthetic_kept},
        "duplicates_dropped": duplicates,
        "score": score,
        "threshold": threshold,
        "scores": {"web": _summary(web), "synthetic": _summary(synthetic)},
        "filter_quality": filter_quality(scores["web_score"], scores["ground_truth"], threshold),
        "shards": len(shards),
        **(extra or {}),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_scores(web, synthetic, scores["ground_truth"], threshold, out / "scores.png", score)
    return report


def plot_scores(web: np.ndarray, synthetic: np.ndarray, ground_truth: list, threshold: float, path: Path,
                score: str = "itm") -> Path:
    """Histogram of ITM match probabilities: web captions (split by ground truth when known) and
    synthetic ones, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.concatenate([web[~np.isnan(web)], synthetic])
    low = min(0.0, float(np.floor(values.min() * 10) / 10)) if len(values) else 0.0  # ITC can be negative
    bins = np.linspace(low, 1, 41)
    figure, axis = plt.subplots(figsize=(7, 4))
    truth = np.array([g for g in ground_truth], dtype=object)
    known = np.array([g is not None for g in truth], dtype=bool)
    if known.any():
        right = np.array([g is True for g in truth])
        axis.hist(web[right & ~np.isnan(web)], bins, histtype="step", linewidth=1.5, label="web caption, right (ground truth)")
        axis.hist(web[known & ~right & ~np.isnan(web)], bins, histtype="step", linewidth=1.5, label="web caption, wrong (ground truth)")
    else:
        axis.hist(web[~np.isnan(web)], bins, histtype="step", linewidth=1.5, label="web captions")
    if len(synthetic):
        axis.hist(synthetic, bins, histtype="step", linewidth=1.5, linestyle=":", label="synthetic captions")
    axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    axis.set_xlabel("ITM match probability" if score == "itm" else "ITC similarity (cosine, max over queries)")
    axis.set_yscale("log")  # synthetic captions outnumber web ones K to 1; the tails are what matter
    axis.set_ylabel("captions (log scale)")
    axis.set_title("CapFilt filter scores")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def summary_lines(report: dict) -> list[str]:
    """What the job prints at the end."""
    lines = [f"accounting: {report['invariant']} -> {'OK' if report['invariant_holds'] else 'VIOLATED'}"]
    rates = report["rates"]
    lines.append(f"rates: kept {rates['kept']:.1%}, filtered {rates['filtered']:.1%}, rejected {rates['rejected']:.1%}; "
                 f"kept captions: {report['kept_captions']['web']} web, {report['kept_captions']['synthetic']} synthetic")
    if report["rejected_by_reason"]:
        lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in report["rejected_by_reason"].items()))
    if report["web_caption_issues"]:
        lines.append("web caption issues: " + ", ".join(f"{k} {v}" for k, v in report["web_caption_issues"].items()))
    web = report["scores"]["web"]
    if web.get("count"):
        lines.append(f"web caption {report.get('score', 'itm').upper()}: mean {web['mean']:.3f}, median {web['p50']:.3f} over {web['count']}")
    quality = report["filter_quality"]
    if quality:
        lines.append(f"filter (flagging wrong alt-texts, {report.get('score', 'itm')} >= {report['threshold']:g} kept, {quality['records']} "
                     f"records with ground truth): precision {quality['precision']:.3f}, recall {quality['recall']:.3f}, "
                     f"F1 {quality['f1']:.3f}")
    return lines
