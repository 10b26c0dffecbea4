"""The plan as a plain-text table (and the legend that says what each column is)."""

from __future__ import annotations

from collections.abc import Sequence

from blip2.planning.config import PlanConfig
from blip2.planning.plan import PlanRow

COLUMNS = ("preset", "stage", "GPUs", "params", "train", "batch", "micro x acc", "max", "mem GiB",
           "TFLOP/step", "step s", "steps", "days", "GPU-h", "cache TiB", "cache saves GPU-h/ep")


def _number(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _cells(row: PlanRow) -> list[str]:
    return [
        row.preset, row.stage, f"{row.workers}x {row.gpu}", f"{row.params / 1e9:.2f}B",
        f"{row.trainable_params / 1e6:.0f}M", str(row.batch), f"{row.micro_batch} x {row.accum}",
        str(row.max_batch), f"{row.memory_gib:.1f}", _number(row.tflop_per_step), f"{row.step_seconds:.3f}",
        "-" if row.steps is None else f"{row.steps:,}", _number(row.wall_days, 2), _number(row.gpu_hours, 0),
        _number(row.cache_tib), _number(row.cache_saves_gpu_hours_per_epoch, 0),
    ]


def format_table(rows: Sequence[PlanRow], config: PlanConfig) -> str:
    """Aligned columns, one row per job, and a legend below."""
    table = [list(COLUMNS), *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    gpu = config.device()
    serving = [f"{r.preset} serves {r.requests_per_second:,.1f} requests/s per replica at batch {r.batch}"
               for r in rows if r.requests_per_second is not None]
    lines += [
        "",
        f"{gpu.name}: {gpu.memory_gib:g} GiB ({config.memory_fraction:.0%} usable), {gpu.bf16_tflops:g} TFLOP/s "
        f"bf16 peak, MFU fixed at {config.mfu:.0%}. FLOPs counted by FlopCounterMode on fake tensors;",
        "memory = frozen weights bf16 + trainable fp32 with gradients and AdamW + the step's traced peak.",
        "batch: per worker per step (CapFilt: images per call; serve: concurrent requests); max: largest "
        "micro-batch that fits; days/GPU-h: the papers' schedules (CapFilt: one pass over the corpus).",
        f"cache: the image encoder's bf16 output for {config.dataset_images:,} images, and the encoder "
        "GPU-hours it saves each epoch.",
        *serving,
    ]
    return "\n".join(lines)
