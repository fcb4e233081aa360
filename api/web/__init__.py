"""The web page at `/` and the API docs, served by the cluster itself: nothing the page or the
docs load comes from another host, so both work on a machine without internet.

The page (static/: HTML, CSS and ES modules, no build step) speaks only the public API with
the user's key kept in the browser. The docs are FastAPI's Swagger UI page with its files
from the `fastapi-offline` package instead of a CDN. There is no ReDoc page: ReDoc's bundle
loads its logo from redoc.ly whatever its options.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).parent / "static"
DOCS_ASSET_DIR = Path(str(files("fastapi_offline") / "static"))
PAGE_ASSETS = "/web"  # the page's own files
DOCS_ASSETS = "/api/docs-assets"  # Swagger UI's files
DOCS_URL = "/api/docs"
# The page is plain files: browsers revalidate them (ETag) rather than run a stale copy.
REVALIDATE = {"Cache-Control": "no-cache"}


class _Revalidated(StaticFiles):
    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.setdefault("Cache-Control", REVALIDATE["Cache-Control"])
        return response


def install_web(app: FastAPI, openapi_url: str) -> None:
    """Serve the page at `/` and the docs at DOCS_URL. The app must be created with
    `docs_url=None, redoc_url=None` (FastAPI's own pages load from a CDN)."""
    app.mount(PAGE_ASSETS, _Revalidated(directory=PAGE_DIR), name="web")
    app.mount(DOCS_ASSETS, StaticFiles(directory=DOCS_ASSET_DIR), name="docs-assets")
    title = app.title

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=REVALIDATE)

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{title} API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            # Swagger UI otherwise sends the schema to validator.swagger.io for a badge.
            swagger_ui_parameters={"validatorUrl": None})

