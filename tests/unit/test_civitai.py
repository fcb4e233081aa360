"""models/civitai.py against a local stand-in for CivitAI's REST API (stdlib http.server on
127.0.0.1) that answers with the API's documented JSON shapes and serves real .safetensors
files: resolution by model id, version id and name, refusals (hash, size), the LRU cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from models.adapters import AdapterCatalog, AdapterMismatch, AdapterNotFound, AdapterRefused, AdapterResolver
from models.civitai import CivitaiClient, CivitaiNotFound, CivitaiRefused
from models.tiny_adapters import save_builtin

TOKEN = "s3cret-civitai-token"


class FakeCivitai:
    """The API's answers, built from real files. `versions[vid]` = (file bytes, extra)."""

    def __init__(self, tmp: Path):
        self.blobs: dict[str, bytes] = {}
        self.models: dict[int, dict] = {}
        self.requests: list[tuple[str, dict]] = []
        self.no_content_length = False
        for name in ("tiny-lora", "tiny-lora-2", "tiny-ti", "tiny-lora-xl"):
            self.blobs[name] = save_builtin(name, tmp / f"{name}.safetensors").read_bytes()

    def add(self, model_id: int, version_id: int, name: str, blob: str, *, type_="LORA", base="SD 1.5",
            nsfw=False, words=("tinystyle",), sha: str | None = None, size_kb: float | None = None) -> None:
        data = self.blobs[blob]
        version = {
            "id": version_id, "modelId": model_id, "name": "v1.0", "baseModel": base, "trainedWords": list(words),
            "downloadUrl": f"{{base}}/api/download/models/{version_id}",
            "files": [
                {"id": 1, "name": "preview.pt", "type": "Model", "sizeKB": 1.0, "primary": False,
                 "metadata": {"format": "PickleTensor"}, "hashes": {"SHA256": "0" * 64},
                 "downloadUrl": f"{{base}}/files/{blob}"},
                {"id": 2, "name": f"{blob}.safetensors", "type": "Model", "primary": True,
                 "sizeKB": size_kb if size_kb is not None else len(data) / 1024,
                 "metadata": {"format": "SafeTensor", "fp": "fp32"},
                 "hashes": {"AutoV2": "ABCDEF0123", "SHA256": sha or hashlib.sha256(data).hexdigest().upper()},
                 "downloadUrl": f"{{base}}/files/{blob}"},
            ],
        }
        model = self.models.setdefault(model_id, {"id": model_id, "name": name, "type": type_, "nsfw": nsfw,
                                                  "modelVersions": []})
        model["modelVersions"].insert(0, version)  # newest first, as the API lists them

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        self.requests.append((url.path, dict(h.headers)))
        base = f"http://{h.headers['Host']}"
        parts = url.path.strip("/").split("/")
        if parts[:1] == ["files"] and parts[1] in self.blobs:
            data = self.blobs[parts[1]]
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            if not self.no_content_length:
                h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        body = None
        if parts[:3] == ["api", "v1", "models"] and len(parts) == 4:
            body = self.models.get(int(parts[3]))
        elif parts[:3] == ["api", "v1", "model-versions"]:
            for m in self.models.values():
                for v in m["modelVersions"]:
                    if v["id"] == int(parts[3]):
                        body = {**v, "model": {"name": m["name"], "type": m["type"], "nsfw": m["nsfw"], "poi": False}}
        elif parts == ["api", "v1", "models"]:
            q = parse_qs(url.query)
            words = q["query"][0].lower().split()
            items = [m for m in self.models.values() if m["type"] == q["types"][0]
                     and all(w in m["name"].lower() for w in words)]
            body = {"items": items, "metadata": {"totalItems": len(items), "currentPage": 1, "pageSize": 20}}
        if body is None:
            h.send_response(404)
            h.end_headers()
            return
        raw = json.dumps(body).replace("{base}", base).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        h.wfile.write(raw)

    def hits(self, prefix: str) -> int:
        return sum(1 for p, _ in self.requests if p.startswith(prefix))


@pytest.fixture
def api(tmp_path):
    fake = FakeCivitai(tmp_path)
    fake.add(100, 201, "Tiny Style LoRA", "tiny-lora")
    fake.add(101, 202, "Tiny Style LoRA Extra", "tiny-lora-2")  # a search decoy listed before 100
    fake.models = {101: fake.models[101], 100: fake.models[100]}
    fake.add(102, 203, "Tiny Embedding", "tiny-ti", type_="TextualInversion", words=())
    fake.add(103, 204, "Tiny XL", "tiny-lora-xl", base="SDXL 1.0")
    fake.add(104, 205, "Bad Hash", "tiny-lora", sha="AB" * 32)
    fake.add(105, 206, "Some Checkpoint", "tiny-lora", type_="Checkpoint")
    fake.add(106, 207, "Spicy", "tiny-lora-2", nsfw=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            fake.handle(self)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


def client(api, tmp_path, **kw) -> CivitaiClient:
    return CivitaiClient(tmp_path / "cache", base_url=api.url, timeout=5, **kw)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_by_model_id_downloads_the_primary_safetensors(api, tmp_path):
    info, path = client(api, tmp_path).fetch("lora", "100")
    assert (info.model_id, info.version_id, info.baseline) == (100, 201, "stable_diffusion_1")
    assert info.trained_words == ("tinystyle",) and not info.nsfw
    assert path.read_bytes() == api.blobs["tiny-lora"] and path.name == f"{sha(path)}.safetensors"
    assert api.hits("/files/tiny-lora") == 1


def test_model_id_takes_the_newest_version(api, tmp_path):
    api.add(100, 299, "Tiny Style LoRA", "tiny-lora-2")
    info, path = client(api, tmp_path).fetch("lora", 100)
    assert info.version_id == 299 and path.read_bytes() == api.blobs["tiny-lora-2"]


def test_by_version_id(api, tmp_path):
    info, path = client(api, tmp_path).fetch("ti", "203", is_version=True)
    assert (info.model_id, info.kind) == (102, "ti") and path.read_bytes() == api.blobs["tiny-ti"]
    assert api.hits("/api/v1/model-versions/203") == 1 and api.hits("/api/v1/models") == 0


def test_by_name_prefers_the_exact_match(api, tmp_path):
    info, path = client(api, tmp_path).fetch("lora", "tiny style lora")
    assert info.model_id == 100 and path.read_bytes() == api.blobs["tiny-lora"]
    with pytest.raises(CivitaiNotFound):
        client(api, tmp_path).fetch("lora", "no such thing")
    with pytest.raises(CivitaiNotFound):  # a LoRA is not a textual inversion
        client(api, tmp_path).fetch("ti", "100")
    with pytest.raises(CivitaiNotFound):
        client(api, tmp_path).fetch("lora", "105")  # a checkpoint
    with pytest.raises(CivitaiNotFound):
        client(api, tmp_path).fetch("lora", "999")


def test_sha256_mismatch_is_refused_and_nothing_kept(api, tmp_path):
    c = client(api, tmp_path)
    with pytest.raises(CivitaiRefused, match="SHA256"):
        c.fetch("lora", "104")
    assert api.hits("/files/") == 1
    assert list(c.files_dir.iterdir()) == []


@pytest.mark.parametrize("content_length", [True, False])
def test_oversize_refused_while_streaming(api, tmp_path, content_length):
    api.no_content_length = not content_length
    api.add(110, 210, "Liar", "tiny-lora", size_kb=1.0)  # declares 1 KB, sends ~25 KB
    c = client(api, tmp_path, max_file_bytes=8 * 1024)
    with pytest.raises(CivitaiRefused, match="bytes"):
        c.fetch("lora", "110")
    assert list(c.files_dir.iterdir()) == []


def test_oversize_declared_is_refused_before_downloading(api, tmp_path):
    c = client(api, tmp_path, max_file_bytes=len(api.blobs["tiny-lora"]) - 1)
    with pytest.raises(CivitaiRefused, match="declared"):
        c.fetch("lora", "100")
    assert api.hits("/files/") == 0


def test_cache_hit_makes_no_http_call(api, tmp_path):
    c = client(api, tmp_path)
    for name, is_version in (("100", False), ("Tiny Style LoRA", False), ("201", True)):
        c.fetch("lora", name, is_version)
    calls = len(api.requests)
    for name, is_version in (("100", False), ("Tiny Style LoRA", False), ("201", True)):
        _, path = c.fetch("lora", name, is_version)
        assert path.read_bytes() == api.blobs["tiny-lora"]
    c2 = client(api, tmp_path)  # another process sharing the disk cache
    c2.fetch("lora", "201", is_version=True)
    assert len(api.requests) == calls and api.hits("/files/") == 1


def test_model_records_expire_but_files_are_reused(api, tmp_path):
    c = client(api, tmp_path, meta_ttl_s=0)
    c.fetch("lora", "100")
    c.fetch("lora", "100")
    assert api.hits("/api/v1/models/100") == 2 and api.hits("/files/") == 1


def test_lru_eviction_under_budget(api, tmp_path):
    sizes = {k: len(v) for k, v in api.blobs.items()}
    budget = sizes["tiny-lora"] + sizes["tiny-lora-2"] + sizes["tiny-ti"] - 1  # any two fit, not three
    c = client(api, tmp_path, budget_bytes=budget)
    _, a = c.fetch("lora", "201", is_version=True)
    _, b = c.fetch("lora", "202", is_version=True)
    os.utime(a, (1, 1))  # a is the older of the two, whatever the clock's resolution...
    os.utime(b, (2, 2))
    c.fetch("lora", "201", is_version=True)  # ...until it is used again: b is now the LRU
    _, t = c.fetch("ti", "203", is_version=True)
    assert a.exists() and t.exists() and not b.exists()
    assert c.cached_bytes() <= budget
    _, b2 = c.fetch("lora", "202", is_version=True)  # comes back by downloading again
    assert b2 == b and b2.exists() and api.hits("/files/tiny-lora-2") == 2
    with pytest.raises(CivitaiRefused, match="fit"):
        client(api, tmp_path / "small", budget_bytes=100).fetch("lora", "201", is_version=True)


def test_token_is_sent_as_bearer_and_never_logged(api, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    client(api, tmp_path, token=TOKEN).fetch("lora", "100")
    assert all(h.get("Authorization") == f"Bearer {TOKEN}" for _, h in api.requests)
    assert TOKEN not in caplog.text
    client(api, tmp_path / "anon").fetch("lora", "101")
    assert "Authorization" not in api.requests[-1][1]


def test_resolver_downloads_ad_hoc_names_only_when_allowed(api, tmp_path):
    catalog = AdapterCatalog(cache_dir=str(tmp_path / "adapters"), civitai_url=api.url, allow_downloads=True)
    r = AdapterResolver(catalog)
    res = r.resolve("lora", "100", baseline="stable_diffusion_1")
    assert res.path.read_bytes() == api.blobs["tiny-lora"] and res.triggers == ["tinystyle"]
    assert res.sha256 == sha(res.path)
    with pytest.raises(AdapterMismatch):  # an SDXL LoRA is never downloaded for an SD 1.5 job
        r.resolve("lora", "103", baseline="stable_diffusion_1")
    with pytest.raises(AdapterRefused, match="NSFW"):
        r.resolve("lora", "106", baseline="stable_diffusion_1", nsfw_ok=False)
    with pytest.raises(AdapterRefused, match="SHA256"):
        r.resolve("lora", "104", baseline="stable_diffusion_1")
    with pytest.raises(AdapterNotFound):
        r.resolve("lora", "nothing like it", baseline="stable_diffusion_1")
    assert api.hits("/files/tiny-lora-xl") == 0 and api.hits("/files/tiny-lora-2") == 0
    off = AdapterResolver(catalog.model_copy(update={"allow_downloads": False}))
    calls = len(api.requests)
    with pytest.raises(AdapterNotFound):
        off.resolve("lora", "100")
    assert len(api.requests) == calls
