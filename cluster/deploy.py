"""Deploy a Serve config file (`configs/local.yaml`, `configs/cluster.yaml`) onto a running Ray,
the way `serve run CONFIG` does, with per-run overrides of the application's settings.

Tests, benchmarks and `rayhorde up` all go through here, so what they run is exactly what the
config file says (deployment sizes, autoscaling, actor resources), not a hand-built copy of it.
"""

from __future__ import annotations

import copy
import os
import time
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


# How long `deploy(wait=True)` waits for the applications to run. Serve's own blocking deploy
# gives up after a fixed 60 s, which a loaded 2-core machine exceeds while eight replicas
# load their models and warm up; RAYHORDE_DEPLOY_TIMEOUT_S overrides.
DEPLOY_TIMEOUT_S = float(os.environ.get("RAYHORDE_DEPLOY_TIMEOUT_S", "300"))


def deploy(config: dict, wait: bool = True, timeout_s: float = DEPLOY_TIMEOUT_S) -> None:
    """Start Serve (with the config's HTTP options) on the Ray this process is connected to and
    deploy the config's applications; with `wait`, return once they are running (and raise
    at once when one fails to deploy, with Serve's message)."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema, _blocking=False)
    if not wait:
        return
    names = {app.name for app in schema.applications}
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {s.name: s.app_status for s in client.list_serve_statuses() if s.name in names}
        failed = {n: st.message for n, st in statuses.items()
                  if st.status == ApplicationStatus.DEPLOY_FAILED}
        if failed:
            raise RuntimeError(f"Serve applications failed to deploy: {failed}")
        if len(statuses) == len(names) and all(
                st.status == ApplicationStatus.RUNNING for st in statuses.values()):
            break
        if time.monotonic() > deadline:
            pending = {n: st.status for n, st in statuses.items()}
            raise TimeoutError(f"Serve applications not running after {timeout_s:.0f} s: {pending}")
        time.sleep(0.5)
    client.wait_for_proxies_serving(wait_for_applications_running=True)
