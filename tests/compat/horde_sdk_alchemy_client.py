"""Drive an alchemy request through the real `horde-sdk` simple client, in strict mode.

Run it with the python of the horde-sdk venv (see README.md beside this file):

    AI_HORDE_URL=http://127.0.0.1:8000/api/ \
        .cache/horde-sdk-venv/bin/python tests/compat/horde_sdk_alchemy_client.py IMAGE.png \
        caption nsfw interrogation RealESRGAN_x2plus

`AIHordeAPISimpleClient().alchemy_request(...)` does POST /v2/interrogate/async, then polls
GET /v2/interrogate/status/{id} until every form is done. On success it prints one JSON line:
    {"ok": true, "captions": [...], "nsfw": [...], "interrogations": [...], "upscales": [...]}
(an upscale as {"upscaler": name, "url": url}); on failure {"ok": false, "error": ...} and exit 1.
The environment handling and diagnostics are the text client's (same folder).
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import traceback
from typing import Any

from horde_sdk_text_client import ANON_KEY, _configure_env, _fail, _install_diagnostics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", help="a PNG/JPEG/WebP file to send as the source image")
    ap.add_argument("forms", nargs="+", help="form names")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--apikey", default=ANON_KEY)
    args = ap.parse_args()
    _configure_env()
    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
        from horde_sdk.ai_horde_api.ai_horde_clients import AIHordeAPISimpleClient
        from horde_sdk.ai_horde_api.apimodels import AlchemyAsyncRequest, AlchemyAsyncRequestFormItem
    except Exception as e:  # noqa: BLE001
        _fail(f"cannot import horde_sdk (run this with the horde-sdk venv's python): {e!r}", code=2)

    diag: dict[str, Any] = {}
    _install_diagnostics(diag)
    with open(args.image, "rb") as f:
        source = base64.b64encode(f.read()).decode()
    try:
        request = AlchemyAsyncRequest(
            apikey=args.apikey, source_image=source,
            forms=[AlchemyAsyncRequestFormItem(name=name) for name in args.forms])
        status, job_id = AIHordeAPISimpleClient().alchemy_request(request, timeout=args.timeout)
        if not status.is_job_complete(len(args.forms)):
            _fail(f"not complete: {status.model_dump(mode='json')}")
        out = {
            "ok": True, "id": str(job_id), "state": str(status.state),
            "captions": [r.caption for r in status.all_caption_results],
            "nsfw": [r.nsfw for r in status.all_nsfw_results],
            "interrogations": [r.model_dump(mode="json") for r in status.all_interrogation_results],
            "upscales": [{"upscaler": str(r.upscaler_used), "url": r.url} for r in status.all_upscale_results],
        }
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        _fail(f"{type(e).__name__}: {e}", sdk_error_response=diag.get("last_error_response"))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
