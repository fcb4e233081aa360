"""The whole image path (HTTP submit -> database queue -> dispatcher -> SD 1.5 replica -> WebP in
storage -> recorded done) against a direct pipeline call of the same tiny model, as a ratio.

    .venv/bin/python bench/whole_path.py [--url sqlite|postgresql://...] [--runs 10]

Both sides make the same image: tiny-sd15, 512x512, 30 steps, k_euler_a, one image. The direct
side is `SD15Generator.generate` + WebP encoding in this process; the cluster side is the
embedded cluster of configs/local.yaml, timed from the POST until `check` says done (polled
every 10 ms, which the ratio includes). Both use one CPU thread for torch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serve")]

import httpx  # noqa: E402

from api.db.migrate import reset  # noqa: E402
from serve_harness import running_cluster  # noqa: E402

API = "http://127.0.0.1:8000/api/v2"
HEADERS = {"apikey": "0000000000"}
PARAMS = {"width": 512, "height": 512, "steps": 30, "sampler_name": "k_euler_a", "n": 1}
PROMPT = "a lighthouse on a cliff ### fog"


def direct(runs: int) -> list[float]:
    import torch

    from deployments.diffusion.common import encode_webp
    from deployments.diffusion.deployment import SD15Generator
    from models.catalog import load_catalog

    entry = load_catalog(ROOT / "configs" / "models.yaml").get("tiny-sd15")
    gen = SD15Generator([entry.model_dump(mode="json")], device="cpu")
    pipe = gen.load("tiny-sd15")
    # The replica runs with num_cpus 0.5 (configs/local.yaml), for which Ray sets
    # OMP_NUM_THREADS=1: give the direct call the same single thread.
    torch.set_num_threads(1)
    positive, negative = PROMPT.split("###")
    job = {"model": "tiny-sd15", "prompt": positive.strip(), "negative_prompt": negative.strip(),
           "seeds": [0], **{k: v for k, v in PARAMS.items() if k != "n"}}
    out = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        encode_webp(gen.generate(pipe, {**job, "seeds": [i]})[0])
        if i:  # the first call warms up
            out.append(time.perf_counter() - t0)
    return out


def through_cluster(runs: int, url: str | None) -> list[float]:
    out = []
    with running_cluster(Path(tempfile.mkdtemp(prefix="rayhorde-bench-")), database_url=url), \
            httpx.Client(timeout=60) as http:
        for i in range(runs + 1):
            t0 = time.perf_counter()
            r = http.post(f"{API}/generate/async", headers=HEADERS, json={
                "prompt": PROMPT, "models": ["tiny-sd15"], "params": {**PARAMS, "seed": str(i)}})
            rid = r.json()["id"]
            while not http.get(f"{API}/generate/check/{rid}").json()["done"]:
                time.sleep(0.01)
            if i:  # the first one also loads the model into the replica
                out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="sqlite", help="'sqlite' (a fresh file) or a PostgreSQL URL")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    url = None if args.url == "sqlite" else args.url
    if url:
        reset(url)
    cluster = statistics.median(through_cluster(args.runs, url))
    pipeline = statistics.median(direct(args.runs))
    print(f"tiny-sd15 512x512, 30 steps, 1 image; median of {args.runs}; "
          f"database: {'postgresql' if url else 'sqlite'}")
    print(f"direct pipeline call + webp: {pipeline * 1000:8.1f} ms")
    print(f"submit -> image stored:      {cluster * 1000:8.1f} ms")
    print(f"ratio whole path / direct:   {cluster / pipeline:8.2f}")


if __name__ == "__main__":
    main()
