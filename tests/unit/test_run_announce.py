"""`rayhorde run` (cluster/run_cli.py) says where everything is once the cluster is up: a
stand-in for `serve run` starts answering the API's heartbeat after a while (and, as the real
one does through serve_run, leaves the Ray dashboard's address in the run's folder); the
supervisor prints the API, docs, web page and dashboard addresses then, not before, and not at
all for a run that ends first."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

SERVE_RUN = textwrap.dedent("""
    import os, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    port, run_dir, delay = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    if delay < 0:
        sys.exit(3)  # a run that fails before the API is up
    open(os.path.join(run_dir, "dashboard-url"), "w").write("127.0.0.1:18265")
    time.sleep(delay)  # "deploying"

    class Heartbeat(BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/api/v2/status/heartbeat"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b'{"message": "OK", "version": "2.5.0"}' if ok else b"")

        def log_message(self, *args):
            pass

    HTTPServer(("127.0.0.1", port), Heartbeat).serve_forever()
""")


def supervisor(tmp_path: Path, port: int, delay: float) -> subprocess.Popen:
    (tmp_path / "serve_run.py").write_text(SERVE_RUN)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"http_options: {{host: 0.0.0.0, port: {port}}}\napplications: []\n")
    cmd = [sys.executable, str(tmp_path / "serve_run.py"), str(port), str(run_dir), str(delay)]
    code = ("import os, sys; from cluster.run_cli import announce_when_ready, api_url, supervise; "
            f"sys.exit(supervise({cmd!r}, dict(os.environ), {str(run_dir)!r}, grace_seconds=10, "
            f"announce=announce_when_ready(api_url({str(config)!r}), {str(run_dir)!r})))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_addresses_are_printed_once_the_api_answers(tmp_path):
    port = free_port()
    started = time.monotonic()
    proc = supervisor(tmp_path, port, delay=2.0)
    lines = []
    while not any("Ray dashboard" in line for line in lines):
        line = proc.stdout.readline()
        assert line, f"the supervisor ended without the addresses: {proc.stderr.read()}"
        lines.append(line.rstrip())
    assert time.monotonic() - started >= 2.0  # not before the heartbeat answered
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    base = f"http://127.0.0.1:{port}"  # 0.0.0.0 in the config: reached on loopback
    assert lines[-5:] == [
        "rayhorde run: the cluster is up",
        f"  API            {base}/api/v2",
        f"  API docs       {base}/api/docs",
        f"  web page       {base}/",
        "  Ray dashboard  http://127.0.0.1:18265",
    ]


def test_a_run_that_ends_first_announces_nothing(tmp_path):
    proc = supervisor(tmp_path, free_port(), delay=-1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "the cluster is up" not in out
