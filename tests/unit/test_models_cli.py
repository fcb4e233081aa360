"""`rayhorde models` (cluster/models_cli.py) through the command line: `refresh` from a local
HTTP server standing in for raw.githubusercontent.com, `pull` by URL from a server that can
cut a transfer short (resumed with a Range request) and serve the wrong bytes (refused by
SHA256), `pull` of Hugging Face files and repositories from a local stand-in for the Hub
(HF_ENDPOINT), and `list`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cluster.cli import main
from models.reference import load_reference

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB
HUB_WEIGHTS = b"hub weights " * 1000
COMMIT = "c" * 40


class FileServer:
    """Files by path, answering Range requests with 206; `cut_next` makes the next file
    transfer stop after that many bytes, as a dropped connection does. Hugging Face routes
    (`resolve`, a repository's info and file tree) serve `hub` files as the Hub would."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.hub: dict[tuple[str, str], bytes] = {}
        self.cut_next: int | None = None
        self.ranges: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self):  # noqa: N802
                self._answer(head=True)

            def do_GET(self):  # noqa: N802
                self._answer(head=False)

            def _answer(self, head: bool):
                path = self.path.split("?")[0]
                if path.startswith("/api/models/"):
                    return self._hub_api(path.split("/")[3:])
                if "/resolve/" in path:
                    repo, _, rest = path.lstrip("/").partition("/resolve/")
                    data = server.hub.get((repo, rest.partition("/")[2]))
                    extra = {"X-Repo-Commit": COMMIT,
                             "ETag": f'"{hashlib.sha256(data or b"").hexdigest()}"'}
                else:
                    data, extra = server.files.get(path), {}
                if data is None:
                    return self._send(404, b"", {})
                start, status = 0, 200
                wanted = self.headers.get("Range")
                server.ranges.append((path, wanted))
                if wanted:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    status = 206
                    extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                body = data[start:]
                cut, server.cut_next = (server.cut_next, None) if not head else (None, server.cut_next)
                self._send(status, b"" if head else body, extra, length=len(body), cut=cut)

            def _hub_api(self, parts: list[str]):
                repo = "/".join(parts[:2])
                files = {f: d for (r, f), d in server.hub.items() if r == repo}
                if len(parts) > 2 and parts[2] == "tree":
                    body = [{"type": "file", "path": f, "size": len(d),
                             "oid": hashlib.sha1(d).hexdigest()} for f, d in files.items()]
                else:
                    body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

            def _send(self, status, body, headers, length=None, cut=None):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body[:cut] if cut is not None else body)
                if cut is not None:
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @contextmanager
    def running(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        try:
            yield self
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()


@pytest.fixture
def server():
    with FileServer().running() as s:
        yield s


PROSE = "Prose of the reference that rayhorde does not copy"


def image_model(name: str, url: str, sha256: str, file_name: str = "model.safetensors") -> dict:
    return {"name": name, "baseline": "stable diffusion 1", "type": "ckpt", "inpainting": False,
            "description": PROSE, "version": "1", "style": "generalist", "nsfw": False,
            "download_all": True, "size_on_disk_bytes": len(WEIGHTS),
            "config": {"files": [{"path": file_name, "sha256sum": sha256}],
                       "download": [{"file_name": file_name, "file_path": "", "file_url": url}]}}


def reference_files(server: FileServer) -> None:
    """A small reference on the server: models by URL, one with a wrong SHA256, a Hub file
    (uppercase SHA256, as some reference entries have), a Hub text model."""
    good = hashlib.sha256(WEIGHTS).hexdigest()
    image = {
        "Local Model": image_model("Local Model", f"{server.url}/files/model.safetensors", good),
        "Bad Hash": image_model("Bad Hash", f"{server.url}/files/model.safetensors", "0" * 64),
        "Hub Model": image_model(
            "Hub Model", "https://huggingface.co/org/repo/resolve/main/sub/hub.safetensors?download=true",
            hashlib.sha256(HUB_WEIGHTS).hexdigest().upper(), "hub.safetensors"),
    }
    text = {"org/llm": {"name": "org/llm", "model_name": "llm", "baseline": "", "parameters": 1,
                        "description": PROSE, "version": "1", "style": "generalist", "nsfw": False,
                        "display_name": "llm", "url": "https://huggingface.co/org/llm", "tags": []}}
    server.files["/ref/image.json"] = json.dumps(image).encode()
    server.files["/ref/text.json"] = json.dumps(text).encode()
    server.files["/files/model.safetensors"] = WEIGHTS
    server.hub[("org/repo", "sub/hub.safetensors")] = HUB_WEIGHTS
    server.hub[("org/llm", "config.json")] = b"{}"
    server.hub[("org/llm", "model.safetensors")] = b"llm weights"
    server.hub[("org/llm", "pytorch_model.bin")] = b"the same weights again"


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_process(*argv, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *argv], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, **env})


@pytest.fixture
def refreshed(server, tmp_path, capsys):
    reference_files(server)
    dest = tmp_path / "reference"
    code, out, err = cli(capsys, "models", "refresh", "--dest", str(dest),
                         "--image-url", f"{server.url}/ref/image.json",
                         "--text-url", f"{server.url}/ref/text.json")
    assert code == 0, err
    assert "image: 3 models" in out and "text: 1 models" in out
    return dest


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def refresh(capsys, dest: Path, image_url: str, text_url: str) -> tuple[int, str, str]:
    return cli(capsys, "models", "refresh", "--dest", str(dest), "--image-url", image_url,
               "--text-url", text_url)


def test_refresh_writes_the_reference_and_refuses_what_it_cannot_read(server, refreshed, capsys):
    image_url, text_url = f"{server.url}/ref/image.json", f"{server.url}/ref/text.json"
    manifest = json.loads((refreshed / "pinned.json").read_text())
    assert manifest["image"]["url"] == image_url
    assert manifest["text"]["sha256"] == hashlib.sha256(server.files["/ref/text.json"]).hexdigest()
    written = files_in(refreshed)
    assert sorted(written) == ["image_models.json", "pinned.json", "text_models.json"]
    assert all(PROSE.encode() not in data for data in written.values())
    assert manifest["image"]["file_sha256"] == hashlib.sha256(written["image_models.json"]).hexdigest()
    reference = load_reference(refreshed)
    assert sorted(reference.image) == ["Bad Hash", "Hub Model", "Local Model"]
    local = reference.get("Local Model", "image")
    assert (local.baseline, local.size_on_disk_bytes, local.downloads[0].url) == \
        ("stable_diffusion_1", len(WEIGHTS), f"{server.url}/files/model.safetensors")
    assert reference.get("Hub Model").sha256_of("hub.safetensors") == \
        hashlib.sha256(HUB_WEIGHTS).hexdigest()
    text = reference.get("org/llm", "text")
    assert (text.hub_repo, text.parameters) == ("org/llm", 1)
    # The same sources again: the same bytes, and what the manifest knew of them kept.
    manifest["image"]["commit"] = COMMIT
    (refreshed / "pinned.json").write_text(json.dumps(manifest))
    assert refresh(capsys, refreshed, image_url, text_url)[0] == 0
    again = files_in(refreshed)
    assert {n: d for n, d in again.items() if n != "pinned.json"} == \
        {n: d for n, d in written.items() if n != "pinned.json"}
    assert json.loads(again["pinned.json"]) == {**manifest, "image": {**manifest["image"], "commit": COMMIT}}
    before = again
    server.files["/ref/broken.json"] = b'{"Local Model": {"name": "Local Model"'
    for url, why in ((f"{server.url}/ref/broken.json", "not JSON"),
                     (f"{server.url}/ref/missing.json", "HTTP 404"),
                     ("http://127.0.0.1:9/ref.json", "cannot download")):
        code, _, err = refresh(capsys, refreshed, url, text_url)
        assert code == 1 and why in err and "unchanged" in err, err
        assert files_in(refreshed) == before
    # A source that changed: its commit is no longer known.
    image = json.loads(server.files["/ref/image.json"])
    del image["Bad Hash"]
    server.files["/ref/image.json"] = json.dumps(image).encode()
    code, out, err = refresh(capsys, refreshed, image_url, text_url)
    assert code == 0 and "image: 2 models" in out, err
    assert "commit" not in json.loads((refreshed / "pinned.json").read_text())["image"]
    assert sorted(load_reference(refreshed).image) == ["Hub Model", "Local Model"]


def test_pull_by_url_resumes_an_interrupted_download(server, refreshed, tmp_path, capsys):
    models = tmp_path / "models"
    args = ("models", "pull", "Local Model", "--reference-dir", str(refreshed), "--dir", str(models))
    half = len(WEIGHTS) // 2
    server.cut_next = half
    code, _, err = cli(capsys, *args)
    assert code == 1 and "interrupted" in err and "resume" in err, err
    part = models / "Local_Model" / "model.safetensors.part"
    assert part.stat().st_size == half and not (models / "Local_Model" / "model.safetensors").exists()
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert server.ranges[-1] == ("/files/model.safetensors", f"bytes={half}-")
    assert (models / "Local_Model" / "model.safetensors").read_bytes() == WEIGHTS
    assert not part.exists()
    assert "model.safetensors" in err and "100%" in err  # tqdm's bar
    assert "pulled 1 file" in out
    code, out, _ = cli(capsys, "models", "list", "--json", "--pulled", "--reference-dir", str(refreshed),
                       "--dir", str(models))
    listed = json.loads(out)
    assert [(r["name"], r["known"], r["pulled"], r["served"]) for r in listed] == \
        [("Local Model", True, True, False)]


def test_pull_refuses_a_file_whose_hash_is_wrong(server, refreshed, tmp_path, capsys):
    models = tmp_path / "models"
    code, _, err = cli(capsys, "models", "pull", "Bad Hash", "--reference-dir", str(refreshed),
                       "--dir", str(models))
    assert code == 1 and "SHA256" in err and "removed" in err, err
    assert [p.name for p in (models / "Bad_Hash").iterdir()] == []  # no file, no part, no marker
    code, _, err = cli(capsys, "models", "pull", "No Such Model", "--reference-dir", str(refreshed),
                       "--dir", str(models))
    assert code == 1 and "No Such Model" in err


def test_pull_from_the_hub(server, refreshed, tmp_path):
    models = tmp_path / "models"
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1"}
    done = cli_process("models", "pull", "Hub Model", "--reference-dir", str(refreshed),
                       "--dir", str(models), env=env)
    assert done.returncode == 0, done.stderr
    folder = models / "Hub_Model"
    assert (folder / "hub.safetensors").read_bytes() == HUB_WEIGHTS
    assert not (folder / "sub").exists()  # the repository's folder, left empty, is gone
    assert json.loads((folder / "rayhorde-pull.json").read_text())["files"][0]["sha256"] == \
        hashlib.sha256(HUB_WEIGHTS).hexdigest()
    text = cli_process("models", "pull", "org/llm", "--reference-dir", str(refreshed),
                       "--dir", str(models), env=env)
    assert text.returncode == 0, text.stderr
    assert (models / "org_llm" / "model.safetensors").read_bytes() == b"llm weights"
    assert not (models / "org_llm" / "pytorch_model.bin").exists()  # the same weights again
    server.hub[("org/repo", "sub/hub.safetensors")] = b"tampered"
    (folder / "rayhorde-pull.json").unlink()
    (folder / "hub.safetensors").unlink()
    bad = cli_process("models", "pull", "Hub Model", "--reference-dir", str(refreshed),
                      "--dir", str(models), env={**env, "HF_HOME": str(tmp_path / "hf2")})
    assert bad.returncode == 1 and "SHA256" in bad.stderr, bad.stderr
    assert not (folder / "hub.safetensors").exists()


def test_list_shows_known_and_served_models(capsys, monkeypatch):
    monkeypatch.setenv("RAYHORDE_CATALOG_PATH", str(ROOT / "configs" / "models.yaml"))
    monkeypatch.setenv("RAYHORDE_SERVED_MODELS", '["tiny-sd15", "SDXL 1.0"]')
    code, out, _ = cli(capsys, "models", "list", "--json", "--type", "image")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert (rows["SDXL 1.0"]["known"], rows["SDXL 1.0"]["served"]) == (True, True)
    assert rows["SDXL 1.0"]["baseline"] == "stable_diffusion_xl"
    assert (rows["tiny-sd15"]["known"], rows["tiny-sd15"]["served"]) == (False, True)
    assert (rows["Deliberate"]["known"], rows["Deliberate"]["served"]) == (True, False)
    assert rows["stable_diffusion"]["served"] is False  # in the catalog, not served
    assert all(r["type"] == "image" for r in rows.values())
    code, out, _ = cli(capsys, "models", "list", "--served", "--config",
                       str(ROOT / "configs" / "local.yaml"))
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["NAME", "TYPE"] and "tiny-llm" in out
    assert lines[-1].startswith("5 models:") and "5 served here" in lines[-1]
    code, out, _ = cli(capsys, "models", "pull", "tiny-sd15")
    assert code == 0 and "nothing to download" in out
