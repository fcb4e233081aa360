"""Deploy a Serve config file (`configs/local.yaml`, `configs/cluster.yaml`) onto a running Ray,
the way `serve run CONFIG` does, with per-run overrides of the application's settings.

Tests, benchmarks and `rayhorde up` all go through here, so what they run is exactly what the
config file says (deployment sizes, autoscaling, actor resources), not a hand-built copy of it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

APP_NAME = "rayhorde"


def load_config(path: str | Path, settings: dict | None = None, families: dict | None = None,
                args: dict | None = None, http_port: int | None = None) -> dict:
    """The config file as a dict, with `settings` merged into the rayhorde application's
    `args.settings`, `families` replacing its `args.families` and `args` its other arguments
    (such as `poll_seconds`), when given."""
    with open(path) as f:
        config = yaml.safe_load(f)
    config = copy.deepcopy(config)
    app = next(a for a in config["applications"] if a["name"] == APP_NAME)
    app_args = app.setdefault("args", {})
    app_args.setdefault("settings", {}).update(settings or {})
    app_args.update(args or {})
    if families is not None:
        app_args["families"] = families
    if http_port is not None:
        config.setdefault("http_options", {})["port"] = http_port
    return config


def deploy(config: dict, wait: bool = True) -> None:
    """Start Serve (with the config's HTTP options) on the Ray this process is connected to and
    deploy the config's applications; with `wait`, return once they are running."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema, _blocking=wait)
