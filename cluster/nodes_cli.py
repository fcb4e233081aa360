"""`rayhorde up`, `rayhorde join`, `rayhorde down`: form a Ray cluster that volunteers can join.

    rayhorde up [--config configs/local.yaml] [--port 6380]     start a head node and the app
    rayhorde join --address HOST:PORT --token T --api-key KEY  add a volunteer's node
    rayhorde down                                              stop what `up` started

The cluster uses Ray's token authentication (RAY_AUTH_MODE=token): `up` makes a token (or
takes --token), keeps it in the head's Ray folder (mode 600) and prints the join command with
it; a node without it cannot join. `join` wraps `ray start --address` and labels the node as a
volunteer's, owned by the API key's user (the key itself never leaves the machine: only its
node digest does, see api/auth.py) and offering the families of --models (cluster/bridge.py).
Everything `up` starts lives under its Ray folder (--ray-dir), which is how `down` finds it:
`ray stop` would stop every Ray on the machine, so it is never used.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from api import node_keys
from cluster.bridge import head_labels, node_labels
from cluster.node_proof import KEY_FILE_ENV, default_key_file, write_key
from models.catalog import Family, load_catalog

DEFAULT_PORT = 6380  # not 6379: that is Redis's
SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# Notice a dead node within about 5 s (Ray's default is about 15 s), so its jobs return soon.
HEAD_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def token_env(token: str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def parse_settings(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"rayhorde up: --set wants KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)  # numbers, lists, booleans
        except json.JSONDecodeError:
            out[key] = value
    return out


def up(args: argparse.Namespace) -> int:
    from cluster.deploy import APP_NAME, deploy, load_config

    ray_dir = Path(args.ray_dir).resolve()
    ray_dir.mkdir(parents=True, exist_ok=True)
    token = args.token or secrets.token_hex(32)
    token_file = ray_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {**os.environ, **SERVE_ENV, **token_env(token)}
    cmd = [ray_bin(), "start", "--head", "--port", str(args.port), "--temp-dir", str(ray_dir),
           "--include-dashboard=false", "--labels", json.dumps(head_labels(list(Family))),
           "--system-config", json.dumps(HEAD_SYSTEM_CONFIG)]
    if args.num_cpus is not None:
        cmd += ["--num-cpus", str(args.num_cpus)]
    if args.num_gpus is not None:
        cmd += ["--num-gpus", str(args.num_gpus)]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if started.returncode != 0:
        print(started.stdout + started.stderr, file=sys.stderr)
        print("rayhorde up: ray start --head failed", file=sys.stderr)
        return 1
    os.environ.update(SERVE_ENV)
    os.environ.update(token_env(token))
    import ray

    ray.init(address=f"127.0.0.1:{args.port}", include_dashboard=False,
             namespace="serve", log_to_driver=False)
    try:
        config = load_config(args.config, settings=parse_settings(args.set), http_port=args.http_port)
        # The API is served from the head only (unless the config says otherwise): a volunteer's
        # node must not take the cluster's HTTP traffic, and on one machine its proxy cannot
        # bind the head's port and is restarted every 2 s, starving the node's own replica.
        config.setdefault("proxy_location", "HeadOnly")
        deploy(config)
        http = config.get("http_options", {})
    finally:
        ray.shutdown()
    host = args.advertise or "HEAD_ADDRESS"
    print(f"rayhorde is up: API on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
          f"/api/v2/ (application {APP_NAME!r}), Ray head on port {args.port}, files in {ray_dir}")
    print("Volunteers join with:")
    print(f"  rayhorde join --address {host}:{args.port} --token {token} --api-key THEIR_KEY "
          "[--num-gpus N] [--models a,b]")
    print("or with plain Ray (rayhorde join --dry-run prints their exact labels):")
    print(f"  RAY_AUTH_MODE=token RAY_AUTH_TOKEN={token} ray start --address {host}:{args.port} "
          "--resources '{\"volunteer\": 1}' --labels '<rayhorde join --dry-run labels>'")
    print(f"Stop it with: rayhorde down --ray-dir {ray_dir}")
    return 0


def offered_families(models: list[str], catalog_path: str) -> list[Family]:
    """The families of the models a node offers; every family when none are named."""
    if not models:
        return list(Family)
    catalog = load_catalog(catalog_path)
    unknown = [m for m in models if catalog.get(m) is None]
    if unknown:
        raise SystemExit(f"rayhorde join: not in {catalog_path}: {', '.join(unknown)}")
    return sorted({catalog.get(m).family for m in models}, key=list(Family).index)


def join_command(args: argparse.Namespace, families: list[Family], public_key: str) -> list[str]:
    cmd = [ray_bin(), "start", "--address", args.address, "--resources", json.dumps({"volunteer": 1}),
           "--labels", json.dumps(node_labels(public_key, families))]
    for flag, value in (("--num-gpus", args.num_gpus), ("--num-cpus", args.num_cpus),
                        ("--node-manager-port", args.node_manager_port)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.block:
        cmd.append("--block")
    return cmd


def register_node_key(api_url: str, api_key: str) -> str:
    """PUT /node_key: the server stores the node key's public half for the key's user."""
    try:
        r = httpx.put(f"{api_url.rstrip('/')}/node_key", headers={"apikey": api_key}, timeout=30)
    except httpx.HTTPError as e:
        raise SystemExit(f"rayhorde join: could not register the node key at {api_url} "
                         f"({type(e).__name__}); give the API's address with --api-url") from None
    if r.status_code != 200:  # the answer names the problem, never the key
        raise SystemExit(f"rayhorde join: registering the node key failed: {r.status_code} "
                         f"{r.text[:300]}")
    return r.json()["node_public_key"]


def join(args: argparse.Namespace) -> int:
    families = offered_families(args.models.split(",") if args.models else [], args.catalog)
    key = node_keys.node_private_key(args.api_key)
    public_key = node_keys.public_key_text(key)
    cmd = join_command(args, families, public_key)
    key_file = Path(args.key_file).expanduser().resolve()
    if args.dry_run:
        print(f"{KEY_FILE_ENV}={shlex.quote(str(key_file))} RAY_AUTH_MODE=token "
              "RAY_AUTH_TOKEN=... " + shlex.join(cmd))
        return 0
    token = args.token or os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        raise SystemExit("rayhorde join: give the cluster's token (--token or RAY_AUTH_TOKEN)")
    api_url = args.api_url or f"http://{args.address.rpartition(':')[0]}:8000/api/v2"
    if register_node_key(api_url, args.api_key) != public_key:
        raise SystemExit("rayhorde join: the API stored another node key than this one derives")
    write_key(key_file, key)
    env = {**os.environ, **token_env(token), KEY_FILE_ENV: str(key_file)}
    env.pop("RAYHORDE_API_KEY", None)  # the node's processes inherit this environment
    done = subprocess.run(cmd, env=env)
    if done.returncode == 0 and not args.block:
        print(f"joined {args.address} offering {', '.join(f.value for f in families)}; the "
              "cluster's bridge registers this node as your worker within seconds")
    return done.returncode


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_of(ray_dir: Path) -> list[int]:
    """Ids of the processes that run with `ray_dir` (Ray's daemons and workers name their
    session folder on their command lines)."""
    import psutil

    marker = str(ray_dir)
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] != os.getpid() and any(marker in a for a in p.info["cmdline"] or []):
            out.append(p.info["pid"])
    return out


def down(args: argparse.Namespace) -> int:
    ray_dir = Path(args.ray_dir).resolve()
    token_file = ray_dir / "auth_token"
    if token_file.exists() and port_open(args.port):  # Serve first: that also stops HAProxy
        try:
            os.environ.update(token_env(token_file.read_text().strip()))
            import ray
            from ray import serve

            ray.init(address=f"127.0.0.1:{args.port}", include_dashboard=False, log_to_driver=False)
            serve.shutdown()
            ray.shutdown()
        except Exception as e:  # the head may already be gone; the processes go anyway
            print(f"rayhorde down: could not shut Serve down cleanly ({e})", file=sys.stderr)
    pids = processes_of(ray_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and (pids := processes_of(ray_dir)):
            time.sleep(0.3)
        if not pids:
            break
    print(f"rayhorde down: stopped the cluster in {ray_dir}")
    return 0


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("up", help="start a Ray head node and deploy a Serve config")
    p.add_argument("--config", default="configs/local.yaml")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="Ray's port (not 6379)")
    p.add_argument("--ray-dir", default="data/ray",
                   help="the head's Ray files and its token (a short path: Ray's sockets live "
                        "there and Unix socket paths hold at most 107 bytes)")
    p.add_argument("--token", help="the cluster token (default: a new random one)")
    p.add_argument("--num-cpus", type=int)
    p.add_argument("--num-gpus", type=int)
    p.add_argument("--http-port", type=int, help="the API's port (default: the config's)")
    p.add_argument("--advertise", help="the address volunteers reach this head at")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the config's application (repeatable)")
    p.set_defaults(func=up)

    j = subparsers.add_parser("join", help="join a volunteer node to a rayhorde cluster")
    j.add_argument("--address", required=True, help="HEAD:PORT")
    j.add_argument("--api-key", default=os.environ.get("RAYHORDE_API_KEY"),
                   help="the owner's API key (default $RAYHORDE_API_KEY)")
    j.add_argument("--token", help="the cluster's token (default $RAY_AUTH_TOKEN)")
    j.add_argument("--num-gpus", type=int)
    j.add_argument("--num-cpus", type=int)
    j.add_argument("--models", help="comma-separated catalog names; their families are offered")
    j.add_argument("--catalog", default="configs/models.yaml")
    j.add_argument("--node-manager-port", type=int)
    j.add_argument("--block", action="store_true", help="stay in the foreground")
    j.add_argument("--dry-run", action="store_true", help="print the plain ray start command")
    j.add_argument("--api-url", help="the cluster's API, where the node key is registered "
                                     "(default http://HEAD:8000/api/v2)")
    j.add_argument("--key-file", default=str(default_key_file()),
                   help="where the node key is kept (default $RAYHORDE_CONFIG_DIR/node_key.pem, "
                        "else ~/.config/rayhorde/node_key.pem)")

    def checked_join(args):
        if not args.api_key:
            j.error("give the owner's API key (--api-key or RAYHORDE_API_KEY)")
        return join(args)

    j.set_defaults(func=checked_join)

    d = subparsers.add_parser("down", help="stop the cluster `rayhorde up` started")
    d.add_argument("--ray-dir", default="data/ray")
    d.add_argument("--port", type=int, default=DEFAULT_PORT)
    d.set_defaults(func=down)
