"""Selection hygiene: the toy world's ``test`` and ``novel`` records are opened only to report.

Every choice — thresholds, budgets, learning rates, which build ships — is made on ``val``. A grep
cannot tell a report from a choice, so the rule is kept at run time: the code that produces ``test`` or
``novel`` records (drawing them, or locating their files) calls :func:`check_report_split`, which looks
up the call stack for one of the evaluation entry points below and raises :class:`SelectionError` when
none is there. A new place that must read these splits for a report joins the allowlist, in review.
"""

from __future__ import annotations

import fnmatch
import sys

REPORT_ONLY_SPLITS: tuple[str, ...] = ("test", "novel")

# ``module.qualname`` patterns of the functions that may open test/novel records: each scores a finished
# model or backbone and writes the figures into a report, and decides nothing from them.
EVALUATION_ENTRY_POINTS: tuple[str, ...] = (
    "blip2.toyworld.corpus.write_toyworld",  # writes every split to disk; reading them back is guarded
    "blip2.backbones.build.evaluate_backbones",  # the backbones' report (probe on test and novel)
    "pipelines.evaluate.resolve_files",  # `blip2 evaluate` (and training's eval sets) on a toy world's copy
    "pipelines.demo._serve",  # the demo's served requests, shown in its report
    "tests.*",  # tests score models against fixed bars; they choose nothing at run time
)


class SelectionError(RuntimeError):
    """``test`` or ``novel`` records were opened where something could be chosen from them."""


def _callers() -> list[str]:
    frame, names = sys._getframe(2), []
    while frame is not None:
        names.append(f"{_module_name(frame.f_globals)}.{frame.f_code.co_qualname}")
        frame = frame.f_back
    return names


def _module_name(namespace: dict) -> str:
    """The module a frame's code belongs to. A module run as ``python -m pipelines.evaluate`` (as
    ``ray job submit`` runs the jobs) is named ``__main__``; its spec still says which module it is."""
    name = namespace.get("__name__", "?")
    spec = namespace.get("__spec__")
    if name == "__main__" and getattr(spec, "name", None):
        return spec.name
    return name


def check_report_split(split: str) -> None:
    """Raise :class:`SelectionError` if ``split`` is report-only and no evaluation entry point is on the
    call stack."""
    if split not in REPORT_ONLY_SPLITS:
        return
    callers = _callers()
    if any(fnmatch.fnmatchcase(name, pattern) for name in callers for pattern in EVALUATION_ENTRY_POINTS):
        return
    caller = next((name for name in callers if not name.startswith("blip2.toyworld.")), callers[0])
    raise SelectionError(
        f"the toy world's {split!r} records are read only for reports, by the evaluation entry points "
        f"(blip2.toyworld.selection.EVALUATION_ENTRY_POINTS); {caller} opened them. Make choices "
        f"(thresholds, budgets, training data) on 'val'."
    )
