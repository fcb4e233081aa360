"""A local Ray + Serve cluster running the rayhorde application, for tests and benchmarks.

Ray gets its own GCS port (6379 is Redis's here), Serve's HAProxy ingress is switched on the
way the configs do it, and on exit everything this started is stopped by `serve.shutdown()` and
`ray.shutdown()` (never `ray stop`), after which no HAProxy process of this node may remain.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from conftest import horde_sdk_python

ROOT = Path(__file__).resolve().parents[2]
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Ingress replicas otherwise wait 30 s for connections to drain on shutdown.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}


def haproxy_pids(node_id: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if (cmd and os.path.basename(cmd[0]) == "haproxy" and any(node_id in a for a in cmd)
                and p.info["status"] != psutil.STATUS_ZOMBIE):
            out.append(p.info["pid"])
    return out


def assert_served_by_haproxy(node_id: str, port: int = 8000) -> None:
    """The API answers on `port`, and what listens there is this node's HAProxy ingress (not
    a proxy left from elsewhere, nor Serve's own HTTP proxy)."""
    import httpx

    deadline, answer = time.time() + 60, None
    while time.time() < deadline:
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/api/v2/status/heartbeat", timeout=5)
            if answer.status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    assert answer is not None and answer.status_code == 200, answer
    # HAProxy reloads a new configuration by starting a new process, which listens beside the
    # old one until the old one has ended: a listener that is not (yet, or any longer) one of
    # this node's HAProxy processes gets a few seconds to settle.
    deadline = time.time() + 10
    while True:
        listeners = {c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        ours = set(haproxy_pids(node_id))
        if listeners and listeners <= ours:
            return
        assert time.time() < deadline, \
            f"port {port} is served by {listeners}, not this cluster's HAProxy {sorted(ours)}"
        time.sleep(0.2)


def wait_until_port_is_free(port: int = 8000, timeout: float = 60) -> None:
    """Wait for whatever still listens on `port` to end: the HAProxy of a cluster that has
    just shut down (a bench or test run right before) can hold it for a while after its
    node is gone, and the new cluster's ingress would then fail to bind."""
    deadline = time.time() + timeout
    while holders := {c.pid for c in psutil.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == port}:
        assert time.time() < deadline, f"port {port} is still held by {holders}"
        time.sleep(0.2)


def replica_actor(app: str, deployment: str):
    """A live replica of `deployment` (named SERVE_REPLICA::<app>#<deployment>#<id>)."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and a["name"].startswith(prefix):
            return ray.get_actor(a["name"], namespace="serve")
    return None


def settings_for(workdir: Path, database_url: str | None = None) -> dict:
    return {
        "database_url": database_url or f"sqlite:///{workdir}/rayhorde.db",
        "storage": "local",
        "storage_dir": str(workdir / "objects"),
        "catalog_path": str(ROOT / "configs" / "models.yaml"),
        "served_models": ["tiny-sd15", "tiny-sd15-inpainting", "tiny-sdxl", "tiny-cascade", "tiny-llm"],
    }


@contextmanager
def running_cluster(workdir: Path, database_url: str | None = None, families: dict | None = None,
                    dispatch: bool = True, config: Path = ROOT / "configs" / "local.yaml",
                    settings: dict | None = None, api_replicas: int | None = None):
    """`config` (the embedded cluster's own configs/local.yaml by default) deployed on a fresh
    local Ray, its settings pointed at `workdir` (and `settings` on top). `dispatch=False`: the
    API alone. `api_replicas`: that many API replicas instead of the config's (benches)."""
    import ray
    from ray import serve

    from api.db.models import Generation
    from api.db.session import get_database
    from cluster.deploy import APP_NAME, deploy, load_config

    wait_until_port_is_free()
    saved_env = {k: os.environ.get(k) for k in SERVE_ENV}
    os.environ.update(SERVE_ENV)
    with socket.socket() as s:  # Ray's Prometheus export (api/metrics.py), on a free port
        s.bind(("", 0))
        metrics_port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             _metrics_export_port=metrics_port)
    node_id = ray.get_runtime_context().get_node_id()
    settings = {**settings_for(workdir, database_url), **(settings or {})}
    try:
        app_config = load_config(config, settings=settings, families=families,
                                 args={"poll_seconds": 0.5, "dispatch": dispatch})
        for app in app_config["applications"]:
            if not dispatch:
                app["deployments"] = [d for d in app.get("deployments", []) if d["name"] == "api"]
            for d in app.get("deployments", []):
                if d["name"] == "api" and api_replicas is not None:
                    d.pop("autoscaling_config", None)
                    d["num_replicas"] = api_replicas
        deploy(app_config)
        assert_served_by_haproxy(node_id)
        db = get_database(settings["database_url"])

        def attempts(request_id: str) -> list[int]:
            with db.read() as s:
                return [g.attempts for g in s.query(Generation)
                        .filter(Generation.request_id == request_id)
                        .order_by(Generation.position)]

        yield {
            "url": "http://127.0.0.1:8000",
            "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics",
            "db": db,
            "replica_actor": lambda deployment: replica_actor(APP_NAME, deployment),
            "attempts": attempts,
            "horde_sdk_python": horde_sdk_python,
        }
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        deadline = time.time() + 30
        while haproxy_pids(node_id) and time.time() < deadline:
            time.sleep(0.5)
        for key, value in saved_env.items():  # later tests get this process's own env back
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        left = haproxy_pids(node_id)
        for pid in left:  # clean up for the next test, then fail this one
            os.kill(pid, signal.SIGKILL)
        assert not left, f"haproxy outlived the cluster: {left}"


def wait_done(http, rid: str, timeout: float = 240,
              api: str = "http://127.0.0.1:8000/api/v2") -> dict:
    """Poll an image request's check until it is done or faulted; its status then."""
    deadline = time.time() + timeout
    while not ((chk := http.get(f"{api}/generate/check/{rid}").json())["done"] or chk["faulted"]):
        assert time.time() < deadline, f"request {rid} not done after {timeout} s: {chk}"
        time.sleep(0.3)
    return http.get(f"{api}/generate/status/{rid}").json()
