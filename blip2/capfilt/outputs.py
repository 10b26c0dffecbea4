"""Per-shard outputs, written atomically, and the completion markers that make a run resumable.

Layout under the output directory (one file per input shard in each folder):
  kept/<shard>.parquet      key, image, image_ref, web_text, captions, caption_sources, caption_scores
  filtered/<shard>.parquet  key, image_ref, web_text, best_score  (valid, but no caption passed)
  rejected/<shard>.parquet  key, image_ref, reason, detail
  scores/<shard>.parquet    every valid record's scores (and ground truth, if the input had it): what
                            the report and evaluation read; never a training input
  _done/<shard>.json        the marker: written last, after the four files, with the shard's counts

A shard's files are written to temporary names and renamed into place, then its marker; a shard
without a marker is redone from scratch on the next run (its files are replaced, never appended to),
so an interrupted run leaves neither duplicates nor gaps.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from blip2.capfilt.models import FILTERED, KEPT, LIST_COLUMNS, decode_list
from blip2.capfilt.records import END, REJECTED

FOLDERS = ("kept", "filtered", "rejected", "scores")
MARKERS = "_done"

KEPT_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("image_ref", pa.string()), ("web_text", pa.string()),
    ("captions", pa.list_(pa.string())), ("caption_sources", pa.list_(pa.string())),
    ("caption_scores", pa.list_(pa.float32())),
])
FILTERED_SCHEMA = pa.schema([("key", pa.string()), ("image_ref", pa.string()), ("web_text", pa.string()),
                             ("best_score", pa.float32())])
REJECTED_SCHEMA = pa.schema([("key", pa.string()), ("image_ref", pa.string()), ("reason", pa.string()),
                             ("detail", pa.string())])
SCORES_SCHEMA = pa.schema([
    ("key", pa.string()), ("status", pa.string()), ("web_text", pa.string()), ("web_score", pa.float32()),
    ("synthetic", pa.list_(pa.string())), ("synthetic_scores", pa.list_(pa.float32())),
    ("caption_issue", pa.string()), ("ground_truth", pa.bool_()),
])


def completed_shards(out: str | Path) -> dict[str, dict]:
    """Markers of the shards already finished: name -> counts."""
    folder = Path(out) / MARKERS
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def prepare_output(out: str | Path) -> None:
    """Create the folders and remove temporary files an interrupted run left behind."""
    out = Path(out)
    for folder in (*FOLDERS, MARKERS):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for stale in (out / folder).glob(".*.tmp"):
            stale.unlink()


def _python(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_python(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _row(row: dict) -> dict:
    """Undo the transport encoding (see ``rows_to_batch`` and ``models.LIST_COLUMNS``)."""
    for name in LIST_COLUMNS:
        if name in row:
            row[name] = decode_list(row[name])
    row["web_text"] = row.get("web_text") or None
    row["image"] = row.get("image") or None
    truth = row.get("ground_truth")
    row["ground_truth"] = None if truth is None or truth < 0 else bool(truth) if not isinstance(truth, bool) else truth
    return row


def _nullable_floats(values: Iterable[Any]) -> list[float | None]:
    return [None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v) for v in values]


def _atomic_write(table: pa.Table, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def write_shard(out: str | Path, name: str, rows: list[dict], image_mode: str, duplicates: int = 0) -> dict:
    """Write one complete shard's four files, then its marker. Returns the marker's content."""
    out = Path(out)
    rows = sorted(rows, key=lambda r: r["index"])
    kept = [r for r in rows if r["status"] == KEPT]
    filtered = [r for r in rows if r["status"] == FILTERED]
    rejected = [r for r in rows if r["status"] == REJECTED]
    valid = kept + filtered
    unknown = len(rows) - len(valid) - len(rejected)
    if unknown:
        raise ValueError(f"shard {name}: {unknown} rows in no outcome (statuses {Counter(r['status'] for r in rows)})")
    tables = {
        "kept": pa.Table.from_pydict({
            "key": [r["key"] for r in kept],
            "image": [r["image"] if image_mode == "bytes" else None for r in kept],
            "image_ref": [r["image_ref"] for r in kept], "web_text": [r["web_text"] for r in kept],
            "captions": [list(r["captions"]) for r in kept],
            "caption_sources": [list(r["caption_sources"]) for r in kept],
            "caption_scores": [_nullable_floats(r["caption_scores"]) for r in kept]}, schema=KEPT_SCHEMA),
        "filtered": pa.Table.from_pydict({
            "key": [r["key"] for r in filtered], "image_ref": [r["image_ref"] for r in filtered],
            "web_text": [r["web_text"] for r in filtered],
            "best_score": _nullable_floats(r["best_score"] for r in filtered)}, schema=FILTERED_SCHEMA),
        "rejected": pa.Table.from_pydict({
            "key": [r["key"] for r in rejected], "image_ref": [r["image_ref"] for r in rejected],
            "reason": [r["reason"] for r in rejected], "detail": [r["detail"] for r in rejected]},
            schema=REJECTED_SCHEMA),
        "scores": pa.Table.from_pydict({
            "key": [r["key"] for r in valid], "status": [r["status"] for r in valid],
            "web_text": [r["web_text"] for r in valid], "web_score": _nullable_floats(r["web_score"] for r in valid),
            "synthetic": [list(r["synthetic"] or []) for r in valid],
            "synthetic_scores": [_nullable_floats(r["synthetic_scores"] or []) for r in valid],
            "caption_issue": [r["caption_issue"] or None for r in valid],
            "ground_truth": [r["ground_truth"] for r in valid]}, schema=SCORES_SCHEMA),
    }
    for folder, table in tables.items():
        _atomic_write(table, out / folder / f"{name}.parquet")
    marker = {"shard": name, "input": len(rows), "kept": len(kept), "filtered": len(filtered),
              "rejected": len(rejected), "reasons": dict(Counter(r["reason"] for r in rejected)),
              "caption_issues": dict(Counter(r["caption_issue"] for r in rows if r["caption_issue"])),
              "synthetic_kept": sum(s == "synthetic" for r in kept for s in r["caption_sources"]),
              "web_kept": sum(s == "web" for r in kept for s in r["caption_sources"]),
              "duplicates_dropped": duplicates}
    temporary = out / MARKERS / f".{name}.json.tmp"
    temporary.write_text(json.dumps(marker, indent=1))
    os.replace(temporary, out / MARKERS / f"{name}.json")
    return marker


class ShardCollector:
    """Gathers the rows of shards that arrive in any order and in any batching; writes a shard as soon
    as all of its rows are in (its END row says how many there are). A row seen twice — a retried task
    whose first attempt's output escaped — is dropped and counted, never written twice."""

    def __init__(self, out: str | Path, image_mode: str) -> None:
        self.out, self.image_mode = Path(out), image_mode
        self.rows: dict[str, dict[int, dict]] = {}
        self.totals: dict[str, int] = {}
        self.duplicates: Counter[str] = Counter()
        self.written: dict[str, dict] = {}

    def add(self, batch: dict[str, Any]) -> list[dict]:
        """Take one batch of final rows; returns the markers of the shards this batch completed."""
        columns = {name: list(values) for name, values in batch.items()}
        size = len(columns["shard"])
        touched = set()
        for i in range(size):
            row = _row({name: _python(values[i]) for name, values in columns.items()})
            shard, index = row["shard"], int(row["index"])
            if shard in self.written:
                self.duplicates[shard] += 1
                continue
            touched.add(shard)
            if row["status"] == END:
                self.totals[shard] = index
            elif index in self.rows.setdefault(shard, {}):
                self.duplicates[shard] += 1
            else:
                self.rows[shard][index] = row
        done = []
        for shard in sorted(touched):
            rows = self.rows.get(shard, {})
            if shard in self.totals and len(rows) == self.totals[shard]:
                marker = write_shard(self.out, shard, list(rows.values()), self.image_mode, self.duplicates[shard])
                self.written[shard] = marker
                self.rows.pop(shard, None)
                done.append(marker)
        return done

    def incomplete(self) -> dict[str, tuple[int, int | None]]:
        """Shards with rows still missing: name -> (rows received, expected or None if unknown)."""
        return {s: (len(r), self.totals.get(s)) for s, r in self.rows.items() if s not in self.written} | {
            s: (0, t) for s, t in self.totals.items() if s not in self.written and s not in self.rows}
