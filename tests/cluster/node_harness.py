"""A real multi-process rayhorde cluster on loopback, started the way an operator and a
volunteer do it (`rayhorde up`, `rayhorde join`, `rayhorde down`), for tests and benchmarks.
Everything runs under the test's own Ray folder; nothing here ever runs `ray stop`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
API = "http://127.0.0.1:8000/api/v2"


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=ROOT)


def small_config(path: Path) -> Path:
    """configs/local.yaml serving only tiny-sd15, one image in flight per replica, one head
    replica: so a second job goes to a volunteer's node while the head is busy."""
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    app = config["applications"][0]
    app["args"]["settings"]["served_models"] = ["tiny-sd15"]
    app["args"]["families"] = {"stable_diffusion_1": {"max_in_flight": 1}}
    app["args"]["poll_seconds"] = 0.3
    app["deployments"] = [d for d in app["deployments"]
                          if d["name"] in ("api", "dispatcher", "postprocess", "alchemy", "sd15")]
    sd15 = next(d for d in app["deployments"] if d["name"] == "sd15")
    sd15["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
    path.write_text(yaml.safe_dump(config))
    return path


def raylet_of(node_id: str) -> int:
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("raylet") and f"--node_id={node_id}" in cmd:
            return p.info["pid"]
    raise LookupError(f"no raylet for node {node_id}")


def haproxy_count() -> int:
    return sum(1 for p in psutil.process_iter(["name", "status"])
               if p.info["name"] == "haproxy" and p.info["status"] != psutil.STATUS_ZOMBIE)


@contextmanager
def horde_up(workdir: Path):
    """`rayhorde up` on a free port with a small config; yields what tests need, then
    `rayhorde down`."""
    port = free_port()
    # Short: Ray's Unix sockets live under it, and their paths may not pass 107 bytes.
    ray_dir = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
    db_url = f"sqlite:///{workdir}/rayhorde.db"
    env = {"RAYHORDE_DATABASE_URL": db_url}
    made = cli("users", "create", "volunteer", env=env)
    assert made.returncode == 0, made.stderr
    key = re.search(r"API key: (\S+)", made.stdout).group(1)
    started = cli("up", "--config", str(small_config(workdir / "config.yaml")), "--port", str(port),
                  "--ray-dir", str(ray_dir), "--num-cpus", "2",
                  "--set", f"database_url={db_url}", "--set", f"storage_dir={workdir}/objects",
                  "--set", f"catalog_path={ROOT}/configs/models.yaml")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        token = re.search(r"--token (\S+)", started.stdout).group(1)
        yield {"port": port, "ray_dir": ray_dir, "db_url": db_url, "key": key, "token": token,
               "up_output": started.stdout, "http": httpx.Client(timeout=30)}
    finally:
        cli("down", "--ray-dir", str(ray_dir), "--port", str(port))


def node_worker(http: httpx.Client) -> dict | None:
    return next((w for w in http.get(f"{API}/workers").json() if w["name"].startswith("node-")),
                None)


def wait_for(what: str, check, timeout: float = 180, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
