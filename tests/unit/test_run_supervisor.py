"""`rayhorde run` (cluster/run_cli.py, what `make run` starts): SIGTERM to its process group
stops everything it started, as Ctrl-C does. A stand-in for `serve run` plays Serve's part: on
SIGINT it shuts down cleanly (and says so), but like a killed proxy it leaves behind an
"HAProxy" in a session of its own holding a port, and a daemon in its own session that ignores
SIGINT; neither may survive."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

HOLDER = textwrap.dedent("""
    import signal, socket, sys, time
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    open(sys.argv[1], "w").write(str(s.getsockname()[1]))
    while True:
        time.sleep(1)
""")

SERVE_RUN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    holder, run_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    # "HAProxy": its own session, the run's folder on its command line.
    subprocess.Popen([sys.executable, holder, os.path.join(out, "haproxy.port"),
                      os.path.join(run_dir, "haproxy.cfg")], start_new_session=True)
    # A daemon in serve run's session that ignores SIGINT.
    subprocess.Popen([sys.executable, holder, os.path.join(out, "daemon.port")])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(3))  # what SIGTERM did to serve run
    try:  # like serve run: Ctrl-C's KeyboardInterrupt (none when started with SIGINT ignored)
        while True:
            time.sleep(0.1)
    except KeyboardInterrupt:
        open(os.path.join(out, "clean-shutdown"), "w").close()
        sys.exit(0)
""")


def wait_for(what, check, timeout=30):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def holders_of(run_dir: Path, out: Path) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if p.info["status"] != psutil.STATUS_ZOMBIE
            and any(str(out) in a for a in p.info["cmdline"] or [])]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_stops_everything_the_run_started(tmp_path, signum):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    out.mkdir()
    (tmp_path / "holder.py").write_text(HOLDER)
    (tmp_path / "serve_run.py").write_text(SERVE_RUN)
    cmd = [sys.executable, str(tmp_path / "serve_run.py"), str(tmp_path / "holder.py"),
           str(run_dir), str(out)]
    code = ("import sys; from cluster.run_cli import supervise; "
            f"sys.exit(supervise({cmd!r}, dict(__import__('os').environ), {str(run_dir)!r}, "
            "grace_seconds=20))")
    # Its own process group, as `make run` has in a terminal or under systemd; started with
    # SIGINT ignored, as a shell starts a background job.
    wrapper = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        ports = [int(wait_for(f"{name} to listen", lambda n=name: (out / n).exists()
                              and (out / n).read_text()))
                 for name in ("haproxy.port", "daemon.port")]
        assert all(port_in_use(p) for p in ports)
        os.killpg(wrapper.pid, signum)
        os.kill(wrapper.pid, signum)  # again at once, as make forwards SIGTERM to its children
        assert wrapper.wait(timeout=60) == 0
        assert (out / "clean-shutdown").exists()  # serve run got Ctrl-C's path, not a kill
        assert not any(port_in_use(p) for p in ports)
        assert holders_of(run_dir, out) == []
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
        for pid in holders_of(run_dir, out):
            os.kill(pid, signal.SIGKILL)
