"""The Ray task graphs on the tiny models (configs/local.yaml's cluster, serving tiny-sd15 and
tiny-cascade, the latter on 2 replicas so independent nodes can run side by side):

- QR code and remix: the graph's wall time over the sum of its nodes' own times (what
  composing them costs; parallel nodes make the sum exceed the wall);
- remix with 6 images: encoding them all at once (the graph) over one after another;
- QR code: of `--qr` requests with different seeds and texts through the HTTP API, the share
  that scanned on the first attempt, after the retry, and after blending.

    .venv/bin/python bench/workflow_graphs.py [--qr 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

API = "http://127.0.0.1:8000/api/v2"
HEADERS = {"apikey": "0000000000"}


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def start(workdir: Path) -> None:
    import ray

    from cluster.deploy import deploy, load_config

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    config = load_config(ROOT / "configs" / "local.yaml", settings={
        "database_url": f"sqlite:///{workdir}/rayhorde.db", "storage_dir": str(workdir / "objects"),
        "served_models": ["tiny-sd15", "tiny-cascade"],
        "rate_limit_poll": "1000000/minute", "rate_limit_submit": "1000000/minute",
        "max_waiting_per_user": 1000},
        args={"poll_seconds": 0.2})
    app = config["applications"][0]
    for d in app["deployments"]:
        if d["name"] == "cascade":
            d.pop("autoscaling_config", None)
            d["num_replicas"] = 2
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("api", "dispatcher", "sd15", "cascade")]
    deploy(config)


async def graph_overheads(runs: int) -> dict:
    from ray import serve

    from deployments import workflows
    from deployments.jobs import ImageJob

    sd15, cascade = (serve.get_deployment_handle(n, "rayhorde") for n in ("sd15", "cascade"))
    images = [_png(Image.new("RGB", (96, 96), (40 * i, 255 - 40 * i, 90))) for i in range(6)]
    qr = ImageJob.parse({"model": "tiny-sd15", "prompt": "a garden", "seeds": [1], "width": 512,
                         "height": 512, "steps": 8, "workflow": "qr_code",
                         "extra_texts": [{"reference": "qr_code", "text": "https://aihorde.net"}]})
    remix = ImageJob.parse({"model": "tiny-cascade", "prompt": "a cat", "seeds": [1], "width": 256,
                            "height": 256, "steps": 6, "workflow": "remix", "source_image": images[0],
                            "extra_source_images": [{"image": i, "strength": 1.0} for i in images[1:]]})
    out = {}
    for name, job, handle in (("qr_code", qr, sd15), ("remix", remix, cascade)):
        ratios = []
        for i in range(runs + 1):
            reply = await workflows.run(job.model_copy(update={"seeds": (i,)}), handle)
            if i:  # the first run loads the models
                ratios.append(reply["graph_seconds"] / sum(reply["timings"].values()))
        out[name] = statistics.median(ratios)
    model = cascade.options(multiplexed_model_id="tiny-cascade")
    parallel, serial = [], []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        await asyncio.gather(*(model.encode_image.remote("tiny-cascade", img) for img in images))
        t1 = time.perf_counter()
        for img in images:
            await model.encode_image.remote("tiny-cascade", img)
        t2 = time.perf_counter()
        if i:
            parallel.append(t1 - t0)
            serial.append(t2 - t1)
    out["encode_parallel_ms"] = statistics.median(parallel) * 1000
    out["encode_serial_ms"] = statistics.median(serial) * 1000
    return out


def qr_scans(count: int) -> Counter:
    outcomes: Counter = Counter()
    words = ["horde", "kudos", "lighthouse", "rayhorde", "https://aihorde.net/", "volunteer"]
    with httpx.Client(timeout=60) as http:
        ids = []
        for i in range(count):
            text = f"{words[i % len(words)]}-{i}"
            r = http.post(f"{API}/generate/async", headers=HEADERS, json={
                "prompt": "a garden at dusk", "models": ["tiny-sd15"], "params": {
                    "width": 512, "height": 512, "steps": 8, "seed": str(1000 + i),
                    "workflow": "qr_code", "extra_texts": [{"reference": "qr_code", "text": text}]}})
            r.raise_for_status()
            ids.append(r.json()["id"])
        for rid in ids:
            while not (chk := http.get(f"{API}/generate/check/{rid}").raise_for_status().json())["done"]:
                assert not chk["faulted"], rid
                time.sleep(0.2)
            (g,) = http.get(f"{API}/generate/status/{rid}").json()["generations"]
            ref = g["gen_metadata"][0]["ref"]
            outcomes["blended" if "blended" in ref else ref.removeprefix("qr: scanned on ")] += 1
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qr", type=int, default=50)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    import ray
    from ray import serve

    async def measure() -> tuple[dict, Counter]:
        try:
            return await graph_overheads(args.runs), await asyncio.to_thread(qr_scans, args.qr)
        finally:
            # While this loop lives: the handles made on it shut down on it.
            await asyncio.to_thread(serve.shutdown)

    start(Path(tempfile.mkdtemp(prefix="rayhorde-bench-graphs-")))
    try:
        overheads, outcomes = asyncio.run(measure())
    finally:
        ray.shutdown()
    print(f"tiny models on the CPU; median of {args.runs} runs")
    for name in ("qr_code", "remix"):
        print(f"{name:<8} graph wall / sum of node times: {overheads[name]:.2f}")
    print(f"remix, 6 images, 2 replicas: encode all at once {overheads['encode_parallel_ms']:.1f} ms, "
          f"one after another {overheads['encode_serial_ms']:.1f} ms, speed-up "
          f"{overheads['encode_serial_ms'] / overheads['encode_parallel_ms']:.2f}x")
    total = sum(outcomes.values())
    print(f"QR codes, {total} requests (512x512, 8 steps, different seeds and texts):")
    for key in ("attempt 1", "attempt 2", "blended"):
        print(f"  {key:<10} {outcomes[key]:3d} ({100 * outcomes[key] / total:.0f}%)")
    print("  every one of them decodes (the graph checks each before it is stored)")


if __name__ == "__main__":
    main()
