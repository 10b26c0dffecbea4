"""The serving config, the application builder and the shipped `serve deploy` file, without a cluster."""

import json

import pytest
import yaml

from blip2.config import ConfigError, load_config
from pipelines.common import CONFIG_DIR
from pipelines.serve import DEFAULT_CONFIG, ServeConfig, build_app, main

DEPLOY_FILE = CONFIG_DIR / "serve_deploy.yaml"


def built_schema(application) -> list[dict]:
    """What `serve build` writes for an application's deployments (the same two calls it makes)."""
    from ray.serve._private.build_app import build_app as serve_build_app
    from ray.serve.deployment import deployment_to_schema

    built = serve_build_app(application, name="app1")
    return [deployment_to_schema(d).model_dump(exclude_unset=True) for d in built.deployments]


def test_the_shipped_deploy_file_matches_the_application_and_validates():
    from ray.serve.schema import ServeDeploySchema

    shipped = yaml.safe_load(DEPLOY_FILE.read_text())
    ServeDeploySchema.model_validate(shipped)
    [app] = shipped["applications"]
    config = load_config(ServeConfig, CONFIG_DIR / DEFAULT_CONFIG)
    assert app["import_path"] == "pipelines.serve:app" and app["name"] == config.http.app_name
    assert app["deployments"] == built_schema(build_app({}))
    model = app["deployments"][0]
    assert model["autoscaling_config"]["target_ongoing_requests"] < model["max_ongoing_requests"]


def test_the_builder_takes_a_config_and_overrides():
    application = build_app({"config": str(CONFIG_DIR / DEFAULT_CONFIG), "autoscaling.max_replicas": 3,
                             "replica.num_gpus": 1, "replica.max_batch_size": 4})
    model = built_schema(application)[0]
    assert model["autoscaling_config"]["max_replicas"] == 3 and model["ray_actor_options"]["num_gpus"] == 1.0
    with pytest.raises(ConfigError, match="unknown key"):
        build_app({"replica.max_batchsize": 4})


@pytest.mark.parametrize("overrides, message", [
    (["autoscaling.target_ongoing_requests=32", "replica.max_ongoing_requests=32"], "below"),
    (["autoscaling.min_replicas=3", "autoscaling.max_replicas=2"], "min_replicas"),
    (["replica.max_batch_size=0"], "max_batch_size"),
    (["replica.batching=dynamic"], "continuous, serve_batch"),
    (["limits.default_max_new_tokens=100"], "default_max_new_tokens"),
    (["model.dtype=float64"], "dtype"),
    (["model.runtime.answer_prompt=no placeholder"], "instruction"),
])
def test_bad_serving_configs_fail_at_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ServeConfig, CONFIG_DIR / DEFAULT_CONFIG, overrides)


def test_job_help_and_print_config(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "/v1/chat/completions" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--print-config", "model.id=my-model", "http.port=9001"])
    printed = json.loads(capsys.readouterr().out)
    assert info.value.code == 0 and printed["model"]["id"] == "my-model" and printed["http"]["port"] == 9001
