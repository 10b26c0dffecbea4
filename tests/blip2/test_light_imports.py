"""What a Ray worker imports to run our code where no model runs — Ray Data's per-record functions, Serve's
HTTP ingress — and what a config parse imports: never torch or transformers. Ray imports the module a task's
function or an actor's class is defined in; a fresh worker process would otherwise spend seconds (and
hundreds of MB) importing them to decode a JPEG or to validate a request."""

import subprocess
import sys

from blip2.capfilt.records import decode_shards
from blip2.training.mixture import example_records, example_skip_counts
from blip2.training.records import kept_records, reason_counts, skip_counts, training_records, validated_records
from pipelines.instruct_data import _with_empty_examples
from pipelines.serve_gateway import Gateway

# every function the jobs pass to Ray Data's map_batches as a task (pipelines/train_data.py, instruct_data.py,
# capfilt.py's first stage); a worker imports the module each is defined in
UDFS = (validated_records, kept_records, reason_counts, skip_counts, training_records, example_records,
        example_skip_counts, _with_empty_examples, decode_shards)
CONFIGS = ("blip2.training.config", "blip2.capfilt.config", "blip2.config", "pipelines.serve_config")


def heavy_modules_after_importing(modules) -> list[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(' '.join(m for m in ('torch', 'transformers') if m in sys.modules))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_the_modules_ray_data_workers_import_for_our_functions_load_no_torch():
    modules = sorted({udf.__module__ for udf in UDFS})
    assert "blip2.training.records" in modules and "blip2.capfilt.records" in modules
    assert heavy_modules_after_importing(modules) == [], modules


def test_the_serve_ingress_replicas_import_no_torch():
    assert Gateway.func_or_class.__module__ == "pipelines.serve_gateway"  # the deployment's class, by reference
    assert heavy_modules_after_importing([Gateway.func_or_class.__module__]) == []


def test_the_typed_configs_parse_without_torch():
    assert heavy_modules_after_importing(CONFIGS) == []


def test_the_check_sees_torch_when_it_is_imported():  # the probe itself can fail
    assert heavy_modules_after_importing(["blip2.training.data"]) == ["torch", "transformers"]
