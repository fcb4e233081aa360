"""Call the endpoints AI Horde clients use beside generating through horde-sdk's own request
classes, in strict mode: one model's status, the news, the stats, the workers by type, and
a shared key's whole life (create, read, change, generate with it, delete).

Run it with the python of the horde-sdk venv (see README.md beside this file):

    AI_HORDE_URL=http://127.0.0.1:8000/api/ \
        .cache/horde-sdk-venv/bin/python tests/compat/horde_sdk_clients_endpoints.py --apikey KEY

KEY is a registered user's API key: the shared key is made on its account, and the image
request made with the shared key (tiny-sd15, 512x512, 10 steps) is queued and left there.
Every call must come back as the SDK's success type; on success it prints one JSON line
{"ok": true, ...} with what the answers said, on failure {"ok": false, "error": ...,
"sdk_error_response": {...}} and exits 1. The environment handling and diagnostics are the
text client's (same folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any

from horde_sdk_text_client import _configure_env, _fail, _install_diagnostics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--apikey", required=True, help="a registered user's API key")
    ap.add_argument("--model", default="tiny-sd15", help="an image model the server serves")
    args = ap.parse_args()
    _configure_env()
    try:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")
        from horde_sdk.ai_horde_api import apimodels as m
        from horde_sdk.ai_horde_api.ai_horde_clients import AIHordeAPIManualClient
        from horde_sdk.generic_api.apimodels import RequestErrorResponse
    except Exception as e:  # noqa: BLE001
        _fail(f"cannot import horde_sdk (run this with the horde-sdk venv's python): {e!r}", code=2)

    diag: dict[str, Any] = {}
    _install_diagnostics(diag)
    client = AIHordeAPIManualClient()

    def call(request):  # noqa: ANN001, ANN202
        response = client.submit_request(request, request.get_default_success_response_type())
        if isinstance(response, RequestErrorResponse):
            raise AssertionError(f"{type(request).__name__}: {response.message}")
        return response

    try:
        (model,) = call(m.HordeStatusModelsSingleRequest(model_name=args.model)).root
        unknown = call(m.HordeStatusModelsSingleRequest(model_name="no-such-model")).root
        news = call(m.NewsRequest()).root
        stats = {state: call(m.ImageStatsModelsRequest(model_state=state))
                 for state in ("all", "known", "custom")}
        img_totals = call(m.ImageStatsModelsTotalRequest())
        text_models = call(m.TextStatsModelsRequest())
        text_totals = call(m.TextStatsModelsTotalRequest())
        workers = {kind: call(m.AllWorkersDetailsRequest(type=kind)).root
                   for kind in ("image", "text", "interrogation")}
        settings = dict(max_image_pixels=-1, max_image_steps=-1, max_text_tokens=-1)
        created = call(m.SharedKeyCreateRequest(apikey=args.apikey, kudos=50, name="SDK test",
                                                **settings))
        key_id = str(created.sharedkey_id)
        modified = call(m.SharedKeyModifyRequest(apikey=args.apikey, id=key_id,
                                                 kudos=60, name="SDK key", **settings))
        read = call(m.SharedKeyDetailsRequest(id=key_id))
        generated = call(m.ImageGenerateAsyncRequest(
            apikey=key_id, prompt="a lighthouse", models=[args.model],
            params=m.ImageGenerationInputPayload(width=512, height=512, steps=10, n=1)))
        deleted = call(m.SharedKeyDeleteRequest(apikey=args.apikey, id=key_id))

        def key(details) -> dict:  # noqa: ANN001
            return {"id": str(details.sharedkey_id), "username": details.username,
                    "name": details.name, "kudos": details.kudos, "utilized": details.utilized,
                    "expiry": details.expiry}

        out = {
            "ok": True,
            "model": {"name": model.name, "type": str(model.type_)},
            "unknown_model": [a.name for a in unknown],
            "news": len(news),
            "img_models_total": stats["all"].total, "img_models_custom": stats["custom"].total,
            "img_totals_images": img_totals.total.images if img_totals.total else None,
            "text_models_total": text_models.total,
            "text_totals_periods": len(text_totals.model_dump()),
            "workers": {kind: sorted(w.name for w in found) for kind, found in workers.items()},
            "text_worker_limits": [[w.max_length, w.max_context_length]
                                   for w in workers["text"]][0] if workers["text"] else None,
            "shared_key": {"created": key(created), "modified": key(modified), "read": key(read),
                           "generate_answer": type(generated).__name__,
                           "generate_id": str(generated.id_), "generate_kudos": generated.kudos,
                           "deleted": deleted.message},
        }
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        _fail(f"{type(e).__name__}: {e}", sdk_error_response=diag.get("last_error_response"))
    print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main()
