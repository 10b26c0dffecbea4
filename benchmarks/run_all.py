"""Run every benchmark, one after the other, and write ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py [--quick] [--only train_step,capfilt] [--out benchmarks/RESULTS.md]

Each benchmark is its own script, run here as a subprocess with ``--out <json>``; the page quotes the
ratios each of them measures side by side in one run (these machines are noisy: ratios, not times, are
the result), the machine they ran on (CPU, cores, memory, load average before and after), and the
command that reproduces each figure. A benchmark that fails is reported as failed and the others
still run. ``--quick`` runs every benchmark on a small budget: a check that the page can be built, not a
measurement (the page says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    what: str
    args: tuple[str, ...]  # the measurement
    quick: tuple[str, ...]  # a small budget, for --quick

    def command(self, quick: bool) -> list[str]:
        return ["python", f"benchmarks/{self.name}.py", *(self.quick if quick else self.args)]


BENCHMARKS = (
    Benchmark("train_step", "training-step throughput and FLOP utilisation (no Ray)", (), ("--steps", "2")),
    Benchmark("train_ray", "Ray Train (2 workers) vs a plain PyTorch loop; frozen-feature cache vs pixels", (),
              ("--steps", "6", "--clean-size", "256")),
    Benchmark("goodput", "each training job's samples/s over its own step's (stage 1 from the cache, stage 2, "
              "instruct), and where its wall time goes", (), ("--steps", "3")),
    Benchmark("capfilt", "CapFilt on Ray Data vs a single-process loop over the same classes", ("--records", "3000"),
              ("--records", "200", "--captions", "1")),
    Benchmark("serve", "Ray Serve: continuous batching vs @serve.batch vs batch size 1; streaming; HTTP overhead",
              (), ("--requests", "16", "--rounds", "1", "--concurrency", "1,4", "--lengths", "2,6")),
)


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("torch", "ray", "transformers"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = "not installed"
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory": memory, "python": platform.python_version(),
            "platform": platform.platform(), **versions}


def run(benchmark: Benchmark, quick: bool, scratch: Path) -> dict:
    out = scratch / f"{benchmark.name}.json"
    command = benchmark.command(quick)
    print(f"== {benchmark.name}: {' '.join(command)}", flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    finished = subprocess.run([sys.executable, *command[1:], "--out", str(out)], cwd=HERE.parent)
    record = {"command": " ".join(command), "seconds": round(time.perf_counter() - start, 1),
              "load_before": round(load_before, 1), "load_after": round(os.getloadavg()[0], 1),
              "returncode": finished.returncode}
    if finished.returncode == 0 and out.is_file():
        record["results"] = json.loads(out.read_text())
    return record


# ---------------------------------------------------------------------------------------------------
# The page: a summary row per ratio, then each benchmark's own figures.


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"**{value:.2f}x**"


def summary_rows(records: dict[str, dict]) -> list[tuple[str, str, str, str, str]]:
    """(what, result, goal, figures, command) per measured ratio."""
    rows = []
    if "results" in records.get("train_step", {}):
        r = records["train_step"]["results"]
        for job, figures in r["results"].items():
            rows.append((f"training step, {job}: share of the fp32 matmul peak", f"**{figures['utilisation']:.0%}**", "—",
                         f"{figures['samples_per_s']:.0f} samples/s, {figures['gflop_per_step']:.1f} GFLOP/step, "
                         f"peak {r['peak_gflops']:.0f} GFLOP/s", records["train_step"]["command"]))
    if "results" in records.get("train_ray", {}):
        r = records["train_ray"]["results"]
        ray_plain, cache = r["ray_vs_plain"], r["feature_cache"]
        rows.append(("Ray Train (2 workers, DDP, Ray Data) / plain loop, samples/s", _x(ray_plain["ratio"]), ">= 0.9x",
                     f"{ray_plain['ray_samples_per_s']} vs {ray_plain['plain_samples_per_s']} samples/s, "
                     f"{ray_plain['stage']}, global batch {ray_plain['global_batch']}", records["train_ray"]["command"]))
        rows.append(("stage-1 epoch from pixels / from the frozen-feature cache", _x(cache["speedup_per_epoch"]), "> 1x",
                     f"{cache['epoch_s_pixels']} vs {cache['epoch_s_cached']} s per epoch; the cache costs "
                     f"{cache['cache_build_s']} s, paid back after {cache['break_even_epochs']} epochs",
                     records["train_ray"]["command"]))
    if "results" in records.get("goodput", {}):
        step = records.get("train_step", {}).get("results", {}).get("results", {}).get("stage1")
        machine = f"; this machine's train_step.py stage 1: {step['samples_per_s']:.0f} samples/s" if step else ""
        for job, r in records["goodput"]["results"]["results"].items():
            rows.append((f"goodput, {job}: the job's samples/s / its own step's", _x(r["goodput"]), ">= 0.7x",
                         f"{r['job_samples_per_s']:.0f} vs {r['step_samples_per_s']:.0f} samples/s over {r['steps']} "
                         f"steps of {r['global_batch']}; fixed costs {r['fixed_fraction']:.0%} of the wall time "
                         f"({r['fixed_fraction_at_config_steps']:.0%} at the config's {r['config_steps']} steps; "
                         f"goal <= 25%){machine}", records["goodput"]["command"]))
    if "results" in records.get("capfilt", {}):
        r = records["capfilt"]["results"]
        rows.append(("CapFilt on Ray Data / single process, images/s", _x(r["ratio"]), ">= 1.0x",
                     f"{r['ray']['images_per_s']:.1f} vs {r['single_process']['images_per_s']:.1f} images/s over "
                     f"{r['ray']['records']} images", records["capfilt"]["command"]))
    if "results" in records.get("serve", {}):
        command = records["serve"]["command"]
        for preset, r in records["serve"]["results"]["presets"].items():
            at = str(r["compared_at"])
            apps = {name: r["apps"][name][at] for name in ("continuous", "serve_batch", "batch1")}
            tokens = " vs ".join(f"{apps[n]['tokens_per_s']:.0f}" for n in apps)
            rows.append((f"Serve, {preset}: continuous batching / batch size 1, tokens/s at concurrency {at}",
                         _x(r["continuous_vs_batch1"]), ">= 3x",
                         f"{tokens} tokens/s (continuous, @serve.batch, batch size 1); lengths 4-32 forced", command))
            rows.append((f"Serve, {preset}: continuous batching / @serve.batch, tokens/s at concurrency {at}",
                         _x(r["continuous_vs_serve_batch"]), ">= 1.3x",
                         f"p99 {apps['continuous']['p99_ms']:.0f} vs {apps['serve_batch']['p99_ms']:.0f} ms "
                         f"(goal: no worse)", command))
            first = r["first_token"]
            rows.append((f"Serve, {preset}: first streamed token / whole response, {first['tokens']}-token answers, "
                         "concurrency 1",
                         f"**{first['ratio']:.0%}**", "< 30%",
                         f"p50 {first['ttft_p50_ms']:.0f} vs {first['latency_p50_ms']:.0f} ms", command))
            rows.append((f"Serve, {preset}: HTTP overhead over the in-process call, p50",
                         f"**{r['http_overhead_p50_ms']:.1f} ms**", "<= 15 ms",
                         f"HTTP {r['http_p50_ms']:.1f} ms vs in process {r['direct_p50_ms']:.1f} ms; proxy + "
                         f"ingress alone {r['ingress_only_p50_ms']:.1f} ms", command))
    return rows


def serve_table(results: dict) -> list[str]:
    lines = []
    for preset, r in results["presets"].items():
        lines += [f"`{preset}`: req/s, new tokens/s, p50 / p99 ms, first token p50 ms", "",
                  "| concurrency | continuous batching | @serve.batch | batch size 1 |", "|---|---|---|---|"]
        for level in r["apps"]["continuous"]:
            cells = [r["apps"][name][level] for name in ("continuous", "serve_batch", "batch1")]
            lines.append(f"| {level} | " + " | ".join(
                f"{c['requests_per_s']:.1f}, {c['tokens_per_s']:.0f}, {c['p50_ms']:.0f} / {c['p99_ms']:.0f}, "
                f"{c['ttft_p50_ms']:.0f}" for c in cells) + " |")
        lines.append("")
    return lines


def render(records: dict[str, dict], host: dict, quick: bool, when: str) -> str:
    lines = ["# Benchmark results", "",
             "Written by `python benchmarks/run_all.py` (every benchmark, one after the other; each measures its "
             "two arms side by side in one run, so the ratios are the result, not the absolute times).", ""]
    if quick:
        lines += ["**Quick run (`--quick`): small budgets that check the page can be built. These figures are "
                  "not measurements; run without `--quick` for those.**", ""]
    lines += [f"Measured {when} on: {host['cpu']}, {host['cores']} cores, {host['memory']} memory, no GPU used; "
              f"Python {host['python']}, torch {host['torch']}, Ray {host['ray']}, transformers {host['transformers']} "
              f"({host['platform']}).", "",
              "| what | result | goal | figures | reproduce |", "|---|---|---|---|---|"]
    lines += [f"| {what} | {result} | {goal} | {figures} | `{command}` |"
              for what, result, goal, figures, command in summary_rows(records)]
    lines += ["", "## Runs", "", "| benchmark | what it measures | seconds | load average before / after | status |",
              "|---|---|---|---|---|"]
    for benchmark in BENCHMARKS:
        if benchmark.name in records:
            r = records[benchmark.name]
            status = "ok" if "results" in r else f"FAILED (exit {r['returncode']})"
            lines.append(f"| `{r['command']}` | {benchmark.what} | {r['seconds']} | {r['load_before']} / "
                         f"{r['load_after']} | {status} |")
    if "results" in records.get("serve", {}):
        lines += ["", "## Serving, every concurrency", "", *serve_table(records["serve"]["results"])]
    lines += ["", "The load average is the machine's, other jobs included: a high figure means the two arms of a "
              "ratio shared the cores with something else (both alike, since they alternate or run back to back).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small budgets: checks the page, measures nothing")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(b.name for b in BENCHMARKS)}")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="the page to write (default: %(default)s)")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [b.name for b in BENCHMARKS]
    unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(b.name for b in BENCHMARKS)}")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory() as scratch:
        records = {b.name: run(b, args.quick, Path(scratch)) for b in BENCHMARKS if b.name in names}
    Path(args.out).write_text(render(records, machine(), args.quick, when))
    failed = [name for name, r in records.items() if "results" not in r]
    print(f"wrote {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
