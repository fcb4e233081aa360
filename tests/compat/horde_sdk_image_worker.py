"""Act as an AI Horde image worker through the real `horde-sdk`, in strict mode.

Run it with the python of the horde-sdk venv (see README.md beside this file); it imports nothing
from the project.

    AI_HORDE_URL=http://127.0.0.1:8000/api/ .cache/horde-sdk-venv/bin/python \
        tests/compat/horde_sdk_image_worker.py --apikey KEY --name my-worker tiny-sd15

It pops with `ImageGenerateJobPopRequest` until it gets a job (or `--timeout` passes), makes one
WebP per id with PIL (a worker's pipeline is not the point here: the protocol is), PUTs each to
its `r2_uploads` URL as the reGen worker does (raw body, no content type, 200 = success), and
submits each with `ImageGenerationJobSubmitRequest(generation="R2")`. Then it reads its own
record with `FindUserRequest` and `AllWorkersDetailsRequest`, all through strict models.

Prints one JSON line: {"ok": true, "ids": [...], "rewards": [...], "kudos": ..., ...}; exit 1
on failure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import urllib.request

ANON_KEY = "0000000000"


def _fail(error: str, **extra) -> None:
    print(json.dumps({"ok": False, "error": error, **extra}), flush=True)
    sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--apikey", required=True)
    ap.add_argument("--name", default="sdk-worker")
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args()
    url = os.environ.get("AI_HORDE_URL", "")
    if not url.endswith("/"):
        os.environ["AI_HORDE_URL"] = url + "/"
    os.environ.pop("AI_HORDE_DEV_URL", None)
    os.environ.pop("AI_HORDE_DEV_APIKEY", None)
    os.environ.setdefault("TESTS_ONGOING", "1")
    os.environ.setdefault("LOGFIRE_IGNORE_NO_CONFIG", "1")

    from loguru import logger

    logger.remove()
    from horde_sdk.ai_horde_api.ai_horde_clients import AIHordeAPIManualClient
    from horde_sdk.ai_horde_api.apimodels import (
        AllWorkersDetailsRequest,
        AllWorkersDetailsResponse,
        FindUserRequest,
        ImageGenerateJobPopRequest,
        ImageGenerateJobPopResponse,
        ImageGenerationJobSubmitRequest,
        UserDetailsResponse,
    )
    from horde_sdk.ai_horde_api.apimodels.base import JobSubmitResponse
    from horde_sdk.generic_api.apimodels import RequestErrorResponse
    from PIL import Image

    client = AIHordeAPIManualClient()

    def call(request, expected):
        response = client.submit_request(request, expected)
        if isinstance(response, RequestErrorResponse):
            _fail(f"{type(request).__name__}: {response.message}", rc=response.rc,
                  raw=str(response.object_data)[:2000])
        return response

    deadline = time.monotonic() + args.timeout
    pops = 0
    while True:
        job = call(ImageGenerateJobPopRequest(apikey=args.apikey, name=args.name,
                                              models=[args.model], max_pixels=1024 * 1024,
                                              amount=2, bridge_agent="horde-sdk-test:1:none"),
                   ImageGenerateJobPopResponse)
        pops += 1
        if job.ids:
            break
        if time.monotonic() > deadline:
            _fail("no job popped before the timeout", pops=pops, skipped=job.skipped.model_dump())
        time.sleep(0.5)

    payload = job.payload
    uploads = dict(zip(job.ids, job.r2_uploads or [job.r2_upload], strict=True))
    rewards = []
    for i, gen_id in enumerate(job.ids):
        buf = io.BytesIO()
        Image.new("RGB", (payload.width, payload.height), (40 * i, 120, 200)).save(buf, "WEBP")
        put = urllib.request.Request(uploads[gen_id], data=buf.getvalue(), method="PUT")
        with urllib.request.urlopen(put, timeout=30) as resp:
            if resp.status != 200:
                _fail(f"upload answered {resp.status}")
        done = call(ImageGenerationJobSubmitRequest(apikey=args.apikey, id=gen_id, generation="R2",
                                                    state="ok", seed=int(payload.seed) + i),
                    JobSubmitResponse)
        rewards.append(done.reward)
    me = call(FindUserRequest(apikey=args.apikey), UserDetailsResponse)
    workers = call(AllWorkersDetailsRequest(apikey=args.apikey), AllWorkersDetailsResponse)
    mine = [w for w in workers.root if w.name == args.name]
    print(json.dumps({
        "ok": True, "ids": [str(i) for i in job.ids], "rewards": rewards, "kudos": me.kudos,
        "prompt": payload.prompt, "seed": payload.seed, "model": job.model, "pops": pops,
        "worker_requests_fulfilled": mine[0].requests_fulfilled if mine else None,
        "workers_listed": len(workers.root),
    }), flush=True)


if __name__ == "__main__":
    main()
