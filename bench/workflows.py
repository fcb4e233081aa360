"""Each image workflow's whole path (HTTP submit -> database queue -> dispatcher -> replica ->
WebP in storage -> recorded done) against the same job run in this process by the replica's
own generator (`DiffusionGenerator.generate` + WebP encoding: diffusers and our task code,
without Serve, the database or HTTP), as a ratio.

    .venv/bin/python bench/workflows.py [--url sqlite|postgresql://...] [--runs 5]

Tiny models (configs/local.yaml), 512x512 (hires fix: 768x640 from a 512x512 first pass),
20 steps, k_euler, one image, one torch thread on both sides (the replicas run with
num_cpus 0.5, for which Ray sets OMP_NUM_THREADS=1). The cluster side is timed from the POST
until `check` says done, polled every 10 ms (included in the ratio).
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serve")]

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from api.db.migrate import reset  # noqa: E402
from serve_harness import running_cluster  # noqa: E402

API = "http://127.0.0.1:8000/api/v2"
HEADERS = {"apikey": "0000000000"}
PROMPT = "a lighthouse on a cliff ### fog"
BASE = {"width": 512, "height": 512, "steps": 20, "sampler_name": "k_euler"}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


SOURCE = Image.new("RGB", (512, 512), (30, 60, 90))
SOURCE.paste((240, 200, 40), (128, 128, 384, 320))
PADDED = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
PADDED.paste(SOURCE.resize((384, 384)).convert("RGBA"), (64, 64))

# name: (model, request fields, ImageJob fields for the direct call)
WORKFLOWS = {
    "txt2img": ("tiny-sd15", {}, {}),
    "img2img": ("tiny-sd15", {"source_image": SOURCE, "params": {"denoising_strength": 0.6}},
                {"workflow": "img2img", "source_image": _png(SOURCE), "denoising_strength": 0.6}),
    "inpainting": ("tiny-sd15-inpainting",
                   {"source_image": PADDED, "source_processing": "inpainting"},
                   {"workflow": "inpainting", "source_image": _png(PADDED)}),
    "outpainting": ("tiny-sd15", {"source_image": PADDED, "source_processing": "outpainting"},
                    {"workflow": "outpainting", "source_image": _png(PADDED)}),
    "hires_fix": ("tiny-sd15", {"params": {"hires_fix": True, "width": 768, "height": 640}},
                  {"workflow": "hires_fix", "width": 768, "height": 640}),
    "transparent": ("tiny-sd15", {"params": {"transparent": True}}, {"workflow": "transparent"}),
    "lora": ("tiny-sd15", {"params": {"loras": [{"name": "tiny-lora"}]}},
             {"loras": [{"name": "tiny-lora"}]}),
}


def direct(runs: int) -> dict[str, float]:
    import torch

    from deployments.diffusion.common import encode_webp
    from deployments.diffusion.deployment import SD15Generator
    from models.adapters import load_adapter_catalog
    from models.catalog import load_catalog

    catalog = load_catalog(ROOT / "configs" / "models.yaml")
    adapters = load_adapter_catalog(ROOT / "configs" / "adapters.yaml").model_copy(
        update={"cache_dir": tempfile.mkdtemp(prefix="rayhorde-bench-adapters-")})
    gen = SD15Generator([catalog.get("tiny-sd15"), catalog.get("tiny-sd15-inpainting")],
                        device="cpu", adapters=adapters)
    pipes = {m: gen.load(m) for m in ("tiny-sd15", "tiny-sd15-inpainting")}
    torch.set_num_threads(1)
    positive, negative = (p.strip() for p in PROMPT.split("###"))
    out = {}
    for name, (model, _, fields) in WORKFLOWS.items():
        times = []
        for i in range(runs + 1):
            job = {"model": model, "prompt": positive, "negative_prompt": negative, "seeds": [i],
                   **BASE, **fields}
            t0 = time.perf_counter()
            encode_webp(gen.generate(pipes[model], job)[0])
            if i:  # the first call warms up (and loads a LoRA or Layer Diffuse files once)
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def _body(model: str, request: dict, seed: int) -> dict:
    body = {"prompt": PROMPT, "models": [model], **{k: v for k, v in request.items() if k != "params"}}
    for key in ("source_image", "source_mask"):
        if key in body:
            body[key] = base64.b64encode(_png(body[key])).decode()
    body["params"] = {**BASE, **request.get("params", {}), "seed": str(seed)}
    return body


def through_cluster(runs: int, url: str | None) -> dict[str, float]:
    out = {}
    # Polling every 10 ms is over the embedded rate limits: lifted for the benchmark.
    unlimited = {"rate_limit_poll": "1000000/minute", "rate_limit_submit": "1000000/minute"}
    with running_cluster(Path(tempfile.mkdtemp(prefix="rayhorde-bench-")), database_url=url,
                         settings=unlimited), httpx.Client(timeout=60) as http:
        for name, (model, request, _) in WORKFLOWS.items():
            times = []
            for i in range(runs + 1):
                t0 = time.perf_counter()
                r = http.post(f"{API}/generate/async", headers=HEADERS, json=_body(model, request, i))
                assert r.status_code == 202, r.text
                rid = r.json()["id"]
                while not (chk := http.get(f"{API}/generate/check/{rid}").raise_for_status().json())["done"]:
                    assert not chk["faulted"], f"{name} faulted"
                    time.sleep(0.01)
                if i:  # the first one also loads the model (and adapters) into the replica
                    times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="sqlite", help="'sqlite' (a fresh file) or a PostgreSQL URL")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    url = None if args.url == "sqlite" else args.url
    if url:
        reset(url)
    cluster = through_cluster(args.runs, url)
    pipeline = direct(args.runs)
    print(f"tiny models, 512x512 (hires fix 768x640), 20 steps, 1 image; median of {args.runs}; "
          f"database: {'postgresql' if url else 'sqlite'}")
    print(f"{'workflow':<12} {'direct ms':>10} {'whole path ms':>14} {'ratio':>6}")
    for name in WORKFLOWS:
        print(f"{name:<12} {pipeline[name] * 1000:10.1f} {cluster[name] * 1000:14.1f} "
              f"{cluster[name] / pipeline[name]:6.2f}")


if __name__ == "__main__":
    main()
