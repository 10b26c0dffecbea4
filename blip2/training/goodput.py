"""Where a training job's wall time goes, and its goodput: the job's samples/s over its own step's.

The worker's loop times its phases (:class:`blip2.training.loop.LoopClock`) and, once its last checkpoint
is saved, its own step alone (:meth:`blip2.training.loop.StepRunner.time_own_step`: same model, batch,
text lengths, cached features or pixels, same process). The driver adds what happens around the loop.
:func:`time_split` puts both together for ``report.json``; :func:`describe_goodput` is the summary line's.
"""

from __future__ import annotations

from collections.abc import Mapping

LOOP_PHASES = ("data_wait", "batch_prep", "step_compute", "checkpointing")
# paid once per job, whatever its number of steps
FIXED_COSTS = ("startup", "input_check", "feature_cache", "materialize", "shutdown", "evaluation", "export")


def time_split(driver: Mapping[str, float], worker: Mapping[str, float]) -> dict:
    """``driver``: ``started``, ``fit_returned`` and ``finished`` (wall clock), and the seconds of
    ``input_check``, ``feature_cache``, ``materialize`` (optional), ``evaluation`` and ``export``.
    ``worker``: rank 0's loop clock (``loop_started`` wall clock, ``loop`` and :data:`LOOP_PHASES`
    seconds, ``samples``, and from the probe ``step_samples_per_s``, ``probe_steps``, ``probe``).

    Returns ``{"seconds": {phase: s, ..., "wall": s}, "fractions": {phase: share of wall},
    "goodput": {...}}``. Phases: ``startup`` (Ray, the worker group, building the model: up to the first
    batch request), ``input_check`` (counting and validating the input), ``feature_cache``,
    ``materialize`` (the prepared records into the object store), the loop's ``data_wait`` /
    ``batch_prep`` / ``step_compute`` / ``checkpointing`` / ``loop_other`` (logging, bookkeeping),
    ``probe`` (timing the step alone), ``shutdown`` (the last checkpoint's upload, the worker group's
    end), ``evaluation`` and ``export`` (loading the checkpoint, export, curve, report)."""
    loop = worker["loop"]
    probe = worker.get("probe", 0.0)
    seconds = {
        "startup": (worker["loop_started"] - driver["started"] - driver["input_check"] - driver["feature_cache"]
                    - driver.get("materialize", 0.0)),
        "input_check": driver["input_check"], "feature_cache": driver["feature_cache"],
        "materialize": driver.get("materialize", 0.0),
        **{phase: worker[phase] for phase in LOOP_PHASES},
        "loop_other": loop - sum(worker[phase] for phase in LOOP_PHASES),
        "probe": probe,
        "shutdown": driver["fit_returned"] - worker["loop_started"] - loop - probe,
        "evaluation": driver["evaluation"], "export": driver["export"],
    }
    wall = driver["finished"] - driver["started"]
    seconds = {k: round(max(v, 0.0), 2) for k, v in seconds.items()} | {"wall": round(wall, 2)}
    job_rate = worker["samples"] / loop if loop > 0 else 0.0
    step_rate = worker.get("step_samples_per_s")
    goodput = {"samples_per_s": round(job_rate, 2),
               "step_samples_per_s": round(step_rate, 2) if step_rate else None,
               "ratio": round(job_rate / step_rate, 3) if step_rate else None,
               "probe_steps": int(worker.get("probe_steps", 0)),
               "fixed_fraction": round(sum(seconds[k] for k in FIXED_COSTS) / wall, 3) if wall > 0 else None}
    return {"seconds": seconds, "fractions": {k: round(v / wall, 3) for k, v in seconds.items() if k != "wall"}
            if wall > 0 else {}, "goodput": goodput}


def describe_goodput(split: Mapping) -> str:
    """``"goodput 0.62 (48 of 78 samples/s); 120s: step 55%, data 20%, start-up 12%, ..."`` — the
    loop's samples/s over its own step's, then the largest shares of the wall time."""
    goodput, fractions = split["goodput"], split["fractions"]
    head = (f"goodput {goodput['ratio']:.2f} ({goodput['samples_per_s']:.0f} of "
            f"{goodput['step_samples_per_s']:.0f} samples/s)" if goodput["ratio"] is not None else
            f"{goodput['samples_per_s']:.0f} samples/s")
    names = {"step_compute": "step", "data_wait": "data wait", "batch_prep": "batch prep", "startup": "start-up",
             "input_check": "input check", "feature_cache": "feature cache", "loop_other": "loop other"}
    largest = sorted(((v, k) for k, v in fractions.items() if v >= 0.02), reverse=True)
    shares = ", ".join(f"{names.get(k, k)} {v:.0%}" for v, k in largest)
    return f"{head}; {split['seconds']['wall']:.0f}s: {shares}"
