"""`rayhorde run`: what `make run` starts. It runs `serve run CONFIG` on a fresh local Ray
(whose metrics agent exports Prometheus metrics on `--metrics-port`, printed at start) and makes
SIGTERM stop it the way Ctrl-C does. Once the API answers its heartbeat it prints where the API,
its docs, the web page and the Ray dashboard are.

`serve run` shuts Serve down (which also stops its HAProxy ingress) only on Ctrl-C; a SIGTERM
(what systemd and container runtimes send to the whole process group) killed it on the spot
and left HAProxy holding the API's port. So `serve run` gets a session of its own, where no
group-wide signal reaches it, and this process turns SIGTERM, SIGINT and SIGHUP into the one
clean path: SIGINT to `serve run` (Ctrl-C's shutdown), a grace period, then whatever of this
run is left — the processes of `serve run`'s session, and every process that names this run's
own folder on its command line (Ray's daemons and workers through RAY_TMPDIR, HAProxy through
its config file) — gets SIGTERM, then SIGKILL. A second signal, a second or more after the
first, skips the grace period.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

GRACE_SECONDS = 60.0  # for `serve run` to shut Serve and Ray down after SIGINT
SWEEP_SECONDS = 10.0  # for leftovers to go after SIGTERM, before SIGKILL
REPEAT_SECONDS = 1.0  # a second signal sooner than this is the same request
# Where Ray's metrics agent serves Prometheus metrics (`ray start --metrics-export-port`'s
# example port); another port when it is taken, since Ray does not start on a taken one.
DEFAULT_METRICS_PORT = 8080
READY_POLL_SECONDS = 1.0  # how often the API is asked whether it is up yet
# serve_run writes the Ray dashboard's address here, in the run's folder, for the "up" lines.
DASHBOARD_FILE = "dashboard-url"


def run_processes(session_id: int, marker: str) -> list[int]:
    """Live processes of this run: in `serve run`'s session, or naming `marker` (the run's
    folder) on their command line."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        if p.info["pid"] == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            in_session = os.getsid(p.info["pid"]) == session_id
        except OSError:
            continue
        if in_session or any(marker in a for a in p.info["cmdline"] or []):
            found.append(p.info["pid"])
    return found


def sweep(session_id: int, marker: str) -> list[int]:
    """Stop what is left of the run: SIGTERM, then SIGKILL after SWEEP_SECONDS. Returns the
    ids that had to be stopped."""
    left = run_processes(session_id, marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in run_processes(session_id, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + SWEEP_SECONDS
        while time.monotonic() < deadline and run_processes(session_id, marker):
            time.sleep(0.2)
    return left


def _default_signals() -> None:
    """In the child: Ctrl-C's path must work even when this process was started with SIGINT
    ignored (as a shell's background job is), which the child would otherwise inherit."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def supervise(cmd: list[str], env: dict[str, str], marker: str,
              grace_seconds: float = GRACE_SECONDS,
              announce: Callable[[threading.Event], object] | None = None) -> int:
    """Run `cmd` in a session of its own until it exits or this process is told to stop;
    then leave nothing of it running. Returns its exit status (0 when stopped by a signal
    and it shut down cleanly). `announce(ended)` runs in a thread beside it (ended: set once
    the run is stopping or over)."""
    child: subprocess.Popen | None = None
    first_signal: float | None = None
    escalated = False
    ended = threading.Event()

    def stop(sig: int) -> None:
        """SIGINT to `serve run` itself; SIGKILL to its whole session's group."""
        if child is None:
            return
        try:
            if sig == signal.SIGKILL:
                os.killpg(child.pid, sig)
            else:
                os.kill(child.pid, sig)
        except ProcessLookupError:
            pass

    def on_signal(signum, _frame):
        nonlocal first_signal, escalated
        now = time.monotonic()
        if first_signal is None:
            first_signal = now
            ended.set()
            print(f"rayhorde run: {signal.Signals(signum).name}: shutting down (again to stop "
                  "at once)", file=sys.stderr, flush=True)
            stop(signal.SIGINT)  # Ctrl-C's path: serve.shutdown()
        # A signal to the process group reaches this process twice (make forwards SIGTERM
        # to its children): only a later one means "stop at once".
        elif now - first_signal > REPEAT_SECONDS and not escalated:
            escalated = True
            stop(signal.SIGKILL)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, on_signal) for s in handled}
    try:
        child = subprocess.Popen(cmd, env=env, start_new_session=True,
                                 preexec_fn=_default_signals)
        if first_signal is not None:  # told to stop while starting it
            stop(signal.SIGINT)
        if announce is not None:
            threading.Thread(target=announce, args=(ended,), daemon=True).start()
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if (first_signal is not None and not escalated
                    and time.monotonic() - first_signal > grace_seconds):
                print("rayhorde run: no clean shutdown in time; stopping it", file=sys.stderr,
                      flush=True)
                escalated = True
                stop(signal.SIGKILL)
        left = sweep(child.pid, marker)
        if left:
            print(f"rayhorde run: stopped {len(left)} leftover processes", file=sys.stderr,
                  flush=True)
    finally:
        ended.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if first_signal is not None and code in (0, -signal.SIGINT) else code


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def metrics_port(requested: int | None) -> int:
    """The port for Ray's Prometheus export: `requested` (0: any free one), else
    DEFAULT_METRICS_PORT, or any free port while that is taken."""
    if requested is None:
        requested = DEFAULT_METRICS_PORT if port_free(DEFAULT_METRICS_PORT) else 0
    elif requested and not port_free(requested):
        raise SystemExit(f"rayhorde run: --metrics-port {requested} is taken")
    if requested == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            requested = s.getsockname()[1]
    return requested


def serve_run(config: str, metrics_port: int) -> None:
    """`serve run CONFIG` on a fresh local Ray whose metrics agent exports on `metrics_port`:
    `serve run` has no option for it, and uses the Ray its process already started."""
    import ray
    from ray.serve.scripts import cli

    info = ray.init(address="local", namespace="serve", _metrics_export_port=metrics_port)
    if info.dashboard_url and os.environ.get("RAY_TMPDIR"):  # for announce_when_ready
        with open(os.path.join(os.environ["RAY_TMPDIR"], DASHBOARD_FILE), "w") as f:
            f.write(info.dashboard_url)
    print(f"rayhorde run: Prometheus metrics at http://127.0.0.1:{metrics_port}/metrics "
          "(README: Metrics)", flush=True)
    cli(["run", config])


def api_url(config_path: str) -> str:
    """Where a Serve config's HTTP ingress answers (Serve's defaults: 127.0.0.1:8000)."""
    import yaml

    with open(config_path) as f:
        http = (yaml.safe_load(f) or {}).get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{http.get('port', 8000)}"


def announce_when_ready(base: str, run_dir: str) -> Callable[[threading.Event], bool]:
    """What supervise runs beside the cluster: once the API answers its heartbeat, print where
    the API, its docs, the web page and the Ray dashboard are. Returns (from the thread)
    whether it got that far before the run ended."""
    import httpx

    def announce(ended: threading.Event) -> bool:
        while not ended.is_set():
            try:
                if httpx.get(f"{base}/api/v2/status/heartbeat", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            ended.wait(READY_POLL_SECONDS)
        else:
            return False
        try:
            with open(os.path.join(run_dir, DASHBOARD_FILE)) as f:
                dashboard = f.read().strip()
            dashboard = dashboard if "://" in dashboard else f"http://{dashboard}"
        except OSError:
            dashboard = "not running (Ray started without its dashboard)"
        print("rayhorde run: the cluster is up\n"
              f"  API            {base}/api/v2\n"
              f"  API docs       {base}/api/docs\n"
              f"  web page       {base}/\n"
              f"  Ray dashboard  {dashboard}", flush=True)
        return True

    return announce


def run(args: argparse.Namespace) -> int:
    import yaml

    from cluster.deploy import load_config
    from cluster.nodes_cli import SERVE_ENV, parse_settings

    # A short folder of its own: Ray's sockets live under it (at most 107 bytes a path).
    run_dir = tempfile.mkdtemp(prefix="rayhorde-run-")
    try:
        config = args.config
        if args.set or args.http_port is not None:
            config = os.path.join(run_dir, "config.yaml")
            with open(config, "w") as f:
                yaml.safe_dump(load_config(args.config, settings=parse_settings(args.set),
                                           http_port=args.http_port), f)
        env = {**os.environ, **SERVE_ENV, "RAY_TMPDIR": run_dir,
               "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(run_dir, "haproxy", "haproxy.cfg")}
        port = metrics_port(args.metrics_port)
        return supervise([sys.executable, "-m", "cluster.run_cli", config, str(port)], env, run_dir,
                         announce=announce_when_ready(api_url(config), run_dir))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="start the embedded cluster (`serve run` of a config) in the foreground; "
                    "SIGTERM stops it as Ctrl-C does")
    p.add_argument("config", nargs="?", default="configs/local.yaml")
    p.add_argument("--http-port", type=int, help="the API's port (default: the config's)")
    p.add_argument("--metrics-port", type=int,
                   default=int(os.environ["RAYHORDE_METRICS_PORT"])
                   if os.environ.get("RAYHORDE_METRICS_PORT") else None,
                   help="where Ray exports Prometheus metrics (default: $RAYHORDE_METRICS_PORT, "
                        f"else {DEFAULT_METRICS_PORT}, or a free port while that is taken)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the config's application (repeatable)")
    p.set_defaults(func=run)


if __name__ == "__main__":  # what `rayhorde run` supervises: CONFIG METRICS_PORT
    serve_run(sys.argv[1], int(sys.argv[2]))
