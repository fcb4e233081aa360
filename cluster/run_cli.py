"""`rayhorde run`: what `make run` starts. It runs `serve run --address local CONFIG` (a fresh
local Ray with the config's application) and makes SIGTERM stop it the way Ctrl-C does.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRACE_SECONDS = 60.0  # for `serve run` to shut Serve and Ray down after SIGINT
SWEEP_SECONDS = 10.0  # for leftovers to go after SIGTERM, before SIGKILL
REPEAT_SECONDS = 1.0  # a second signal sooner than this is the same request


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
              grace_seconds: float = GRACE_SECONDS) -> int:
    """Run `cmd` in a session of its own until it exits or this process is told to stop;
    then leave nothing of it running. Returns its exit status (0 when stopped by a signal
    and it shut down cleanly)."""
    child: subprocess.Popen | None = None
    first_signal: float | None = None
    escalated = False

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
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if first_signal is not None and code in (0, -signal.SIGINT) else code


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
        serve = str(Path(sys.executable).with_name("serve"))
        return supervise([serve, "run", "--address", "local", config], env, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="start the embedded cluster (`serve run` of a config) in the foreground; "
                    "SIGTERM stops it as Ctrl-C does")
    p.add_argument("config", nargs="?", default="configs/local.yaml")
    p.add_argument("--http-port", type=int, help="the API's port (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the config's application (repeatable)")
    p.set_defaults(func=run)
