"""The web page and the API docs as files (no browser, no Serve): `/` and every file it
references, module imports included, are served with the right content types; the page's code
calls only the public API; /api/docs and its files are all local (no CDN)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from conftest import make_ctx

pytestmark = pytest.mark.timeout(60)
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml", ".png": "image/png"}
# Where the page's code may send requests: the public API and its schema, and its own files.
PUBLIC_PREFIXES = ("/api/v2", "/v1/", "/api/openapi.json", "/web/", "/api/docs")
IMPORT = re.compile(r"""^\s*import\s[^;]*?from\s+["']([^"']+)["']""", re.M)


class References(HTMLParser):
    """The URLs an HTML document loads or links to (src, href)."""

    def __init__(self):
        super().__init__()
        self.urls: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append((tag, value))


def references(html: str) -> list[tuple[str, str]]:
    parser = References()
    parser.feed(html)
    return parser.urls


def content_type_of(path: str) -> str:
    return CONTENT_TYPES[path[path.rindex("."):]]


@pytest.fixture
def client(sqlite_db, tmp_path):
    with TestClient(create_app(make_ctx(sqlite_db, tmp_path))) as c:
        yield c


def fetch(client, path: str):
    r = client.get(path)
    assert r.status_code == 200, (path, r.status_code, r.text[:200])
    expected = content_type_of(path) if "." in path.rsplit("/", 1)[-1] else "text/html"
    assert r.headers["content-type"].split(";")[0] == expected, (path, r.headers["content-type"])
    return r


def test_page_and_every_file_it_loads_are_served(client):
    page = fetch(client, "/").text
    refs = references(page)
    loaded = [url for tag, url in refs if tag in ("script", "link")]
    assert "/web/app.js" in loaded and "/web/style.css" in loaded
    assert all(url.startswith("/") and not url.startswith("//") for _, url in refs), refs
    # Walk the ES module graph from the entry point: every import is served as JavaScript.
    seen, todo, sources = set(), [u for u in loaded if u.endswith(".js")], {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        sources[path] = fetch(client, path).text
        todo += [urljoin(path, spec) for spec in IMPORT.findall(sources[path])]
    assert {"/web/app.js", "/web/api.js", "/web/generate.js", "/web/chat.js", "/web/gallery.js",
            "/web/workers.js", "/web/account.js", "/web/store.js", "/web/ui.js"} <= seen
    for url in loaded:
        fetch(client, url)
    # The code sends requests only to the public API (and reads its own files): every
    # absolute path it names is one of those (paths given to v2() are under /api/v2), and it
    # names no other host.
    for path, source in sources.items():
        assert "://" not in source, path
        for literal in re.findall(r"""(?<!v2\()["'`](/[^"'`\s]+)""", source):
            assert literal.startswith(PUBLIC_PREFIXES), (path, literal)
    assert client.get("/web/missing.js").status_code == 404
    assert client.get("/web/../app.py").status_code == 404


def test_api_docs_load_only_local_files(client):
    html = fetch(client, "/api/docs").text
    assert "://" not in html  # no CDN, no validator.swagger.io, no external favicon
    refs = references(html)
    assert refs and all(url.startswith("/") for _, url in refs), refs
    for _, url in refs:
        fetch(client, url)
    scripts = re.findall(r'<script src="([^"]+)"', html)
    assert scripts == ["/api/docs-assets/swagger-ui-bundle.js"]
    fetch(client, scripts[0])
    assert "url: '/api/openapi.json'" in html and '"validatorUrl": null' in html
    assert client.get("/api/openapi.json").json()["info"]["title"] == "rayhorde"
    # FastAPI's own docs pages (CDN-loaded) are off.
    for path in ("/docs", "/redoc", "/api/redoc"):
        assert client.get(path).status_code == 404, path
