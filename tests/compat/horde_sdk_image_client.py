"""Drive an image generation through the real `horde-sdk` simple client, in strict mode.

Run it with the python of the horde-sdk venv (see README.md beside this file), never with the
project's own interpreter; it imports nothing from the project.

    AI_HORDE_URL=http://127.0.0.1:8000/api/ \
        .cache/horde-sdk-venv/bin/python tests/compat/horde_sdk_image_client.py tiny-sd15

It submits one small request as the anonymous user with
`AIHordeAPISimpleClient().image_generate_request(...)`, which does POST /v2/generate/async, polls
GET /v2/generate/check/{id} every 4 s until `done`, then GET /v2/generate/status/{id}. It then
decodes every returned image (base64 or URL) into a PIL image through the SDK's own
`download_image_from_generation`.

On success it prints one JSON line to stdout and exits 0:
    {"ok": true, "images": [[w, h], ...], "seeds": [...], ...}
On any failure it prints {"ok": false, "error": ..., ...} to stdout, a message to stderr, and
exits 1 (2 for a usage or configuration error).

The SDK reads AI_HORDE_URL once, at import, and joins paths onto it with urljoin, so the URL has to
name the API root and end with a slash (`http://host:port/api/`); this script adds a missing
trailing slash before importing the SDK. TESTS_ONGOING=1 (set here unless already set) makes every
SDK response model forbid fields it does not know, which is the point of the check.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
import traceback
from typing import Any

ANON_KEY = "0000000000"


def _fail(error: str, code: int = 1, **extra: Any) -> None:
    print(json.dumps({"ok": False, "error": error, **extra}), flush=True)
    print(f"horde_sdk_image_client: FAILED: {error}", file=sys.stderr, flush=True)
    sys.exit(code)


def _configure_env() -> str:
    """Settle the environment the SDK reads at import time; returns the base URL it will use."""
    url = os.environ.get("AI_HORDE_URL", "").strip()
    if not url:
        _fail("AI_HORDE_URL is not set (want e.g. http://127.0.0.1:8000/api/)", code=2)
    if not url.startswith(("http://", "https://")):
        _fail(f"AI_HORDE_URL must start with http:// or https://, got {url!r}", code=2)
    if not url.endswith("/"):
        url += "/"  # urljoin would otherwise drop the last path segment ('/api')
    os.environ["AI_HORDE_URL"] = url
    # These override AI_HORDE_URL and the API key inside the SDK; never let a stray one redirect us.
    os.environ.pop("AI_HORDE_DEV_URL", None)
    os.environ.pop("AI_HORDE_DEV_APIKEY", None)
    os.environ.setdefault("TESTS_ONGOING", "1")
    os.environ.setdefault("LOGFIRE_IGNORE_NO_CONFIG", "1")  # the SDK imports logfire; keep stderr quiet
    return url


def _install_diagnostics(sink: dict[str, Any]) -> None:
    """Keep the reason behind an SDK 'response type doesn't match' error, which the SDK discards.

    Pure observation: the wrapped method's return value is passed through unchanged.
    """
    from horde_sdk.generic_api.apimodels import RequestErrorResponse
    from horde_sdk.generic_api.generic_clients import BaseHordeAPIClient

    original = BaseHordeAPIClient._after_request_handling

    def wrapped(self, *, raw_response_json, returned_status_code, expected_response_type):  # noqa: ANN001, ANN202
        result = original(
            self,
            raw_response_json=raw_response_json,
            returned_status_code=returned_status_code,
            expected_response_type=expected_response_type,
        )
        if isinstance(result, RequestErrorResponse):
            detail: dict[str, Any] = {
                "http_status": returned_status_code,
                "expected": expected_response_type.__name__,
                "message": result.message,
                "rc": result.rc,
                "raw_response": raw_response_json,
            }
            data = result.object_data
            exc = data.get("exception") if isinstance(data, dict) else None
            if exc is not None and hasattr(exc, "errors"):
                detail["validation_errors"] = [
                    {"loc": ".".join(str(p) for p in e["loc"]), "type": e["type"], "msg": e["msg"]}
                    for e in exc.errors()
                ]
            sink["last_error_response"] = detail
            print(f"horde_sdk_image_client: error response: {json.dumps(detail, default=str)}", file=sys.stderr)
        return result

    BaseHordeAPIClient._after_request_handling = wrapped  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="tiny-sd15")
    ap.add_argument("--prompt", default="a lighthouse ### fog")
    ap.add_argument("--width", type=int, default=64, help="a multiple of 64")
    ap.add_argument("--height", type=int, default=64, help="a multiple of 64")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("-n", "--n", type=int, default=2)
    ap.add_argument("--seed", default="42")
    ap.add_argument("--timeout", type=int, default=300, help="seconds the SDK may poll before giving up")
    ap.add_argument("--apikey", default=ANON_KEY)
    ap.add_argument("-v", "--verbose", action="store_true", help="let the SDK log at DEBUG to stderr")
    args = ap.parse_args()

    base_url = _configure_env()

    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="DEBUG" if args.verbose else "WARNING")

        from horde_sdk.ai_horde_api.ai_horde_clients import AIHordeAPISimpleClient
        from horde_sdk.ai_horde_api.apimodels import ImageGenerateAsyncRequest, ImageGenerationInputPayload
        from horde_sdk.ai_horde_api.endpoints import AI_HORDE_BASE_URL
    except Exception as e:  # noqa: BLE001
        _fail(f"cannot import horde_sdk (run this with the horde-sdk venv's python): {e!r}", code=2)

    if AI_HORDE_BASE_URL != base_url:  # pragma: no cover - only if the SDK changes how it reads the env
        _fail(f"SDK base URL is {AI_HORDE_BASE_URL!r}, expected {base_url!r}", code=2)

    diag: dict[str, Any] = {}
    _install_diagnostics(diag)
    checks: list[dict[str, Any]] = []
    started = time.monotonic()
    sdk_version = importlib.metadata.version("horde_sdk")

    try:
        request = ImageGenerateAsyncRequest(
            apikey=args.apikey,
            prompt=args.prompt,
            models=[args.model],
            params=ImageGenerationInputPayload(
                width=args.width,
                height=args.height,
                steps=args.steps,
                n=args.n,
                seed=args.seed,
            ),
        )
        client = AIHordeAPISimpleClient()
        status, gen_id = client.image_generate_request(
            request,
            timeout=args.timeout,
            check_callback=lambda check: checks.append(check.model_dump()),
        )
        if len(status.generations) != args.n:
            # The SDK stops polling at its timeout and still fetches /status; it does not raise.
            _fail(
                f"expected {args.n} generations, got {len(status.generations)} (done={status.done}, "
                f"faulted={status.faulted}, after {len(checks)} checks, timeout {args.timeout}s)",
                last_check=checks[-1] if checks else None,
            )

        images, seeds, details = [], [], []
        for gen in status.generations:
            img = client.download_image_from_generation(gen)  # PIL.Image.Image (lazy); base64 or URL
            img.load()  # force a full decode, not just the header
            images.append([img.width, img.height])
            seeds.append(gen.seed)
            details.append(
                {
                    "id": str(gen.id_),
                    "model": gen.model,
                    "state": str(gen.state),
                    "worker_name": gen.worker_name,
                    "censored": gen.censored,
                    "format": img.format,
                    "transport": "url" if gen.img.startswith(("http://", "https://")) else "base64",
                },
            )
        for size in images:
            if size != [args.width, args.height]:
                _fail(f"image is {size[0]}x{size[1]}, asked for {args.width}x{args.height}", images=images)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        _fail(f"{type(e).__name__}: {e}", sdk_error_response=diag.get("last_error_response"), checks=len(checks))

    print(
        json.dumps(
            {
                "ok": True,
                "images": images,
                "seeds": seeds,
                "id": str(gen_id),
                "kudos": status.kudos,
                "checks": len(checks),
                "generations": details,
                "seconds": round(time.monotonic() - started, 2),
                "sdk_version": sdk_version,
                "base_url": base_url,
                "strict": os.environ.get("TESTS_ONGOING") == "1",
            },
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
