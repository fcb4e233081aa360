"""Post-processing throughput and the NSFW check's cost, on the built-in tiny models (CPU).

    .venv/bin/python bench/postprocess_safety.py [--images 24] [--size 128]

- post-processing: images per second for each post-processor, called directly in this process
  (the registry's callable on a decoded image) and through the post-processing Serve deployment
  (WebP bytes in and out, one replica, `--concurrency` calls in flight), so the difference is
  the deployment's overhead (encoding, transfer, queueing);
- NSFW check: milliseconds per image of the safety checker, direct and through the alchemy
  deployment's `nsfw` (one image per call, as a batch of one image; and per image of a batch of
  8, as the dispatcher sends a request's images) — the latency censor_nsfw adds to a job.
Ray is started here with 2 CPUs and no dashboard, and shut down at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.alchemy.registry import AlchemyModelEntry  # noqa: E402
from models.alchemy.registry import load as load_alchemy  # noqa: E402
from models.postprocess.registry import PostProcessorEntry  # noqa: E402
from models.postprocess.registry import load as load_post  # noqa: E402

PROCESSORS = ("RealESRGAN_x2plus", "RealESRGAN_x4plus", "GFPGAN", "strip_background")


def images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def webp(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="WEBP", quality=95)
    return buf.getvalue()


def direct_rate(name: str, imgs: list[Image.Image]) -> float:
    run = load_post(PostProcessorEntry(name=name))
    run(imgs[0], 1.0)  # warm
    t = time.perf_counter()
    for im in imgs:
        run(im, 1.0)
    return len(imgs) / (time.perf_counter() - t)


async def deployment_rate(handle, name: str, data: list[bytes], concurrency: int) -> float:
    h = handle.options(multiplexed_model_id=name)
    await h.process.remote(name, data[0], 1.0)  # load and warm
    sem = asyncio.Semaphore(concurrency)

    async def one(d: bytes) -> None:
        async with sem:
            await h.process.remote(name, d, 1.0)

    t = time.perf_counter()
    await asyncio.gather(*(one(d) for d in data))
    return len(data) / (time.perf_counter() - t)


def ms_per_image(fn, n_images: int, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000 / n_images)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    imgs = images(args.images, args.size)
    data = [webp(im) for im in imgs]

    import ray
    from ray import serve

    from deployments.alchemy import AlchemyDeployment
    from deployments.postprocess import PostProcessDeployment

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        post = serve.run(PostProcessDeployment.options(ray_actor_options={"num_cpus": 1}).bind(
            [PostProcessorEntry(name=n).model_dump() for n in PROCESSORS]), name="bench-post",
            route_prefix=None)
        alchemy = serve.run(AlchemyDeployment.options(ray_actor_options={"num_cpus": 1}).bind(
            [AlchemyModelEntry(name="nsfw").model_dump()]), name="bench-alchemy", route_prefix=None)
        print(f"post-processing, {args.images} images of {args.size}x{args.size}, images/s:")
        print(f"  {'post-processor':<20} {'direct':>8} {'deployment':>11} {'ratio':>6}")
        for name in PROCESSORS:
            d = direct_rate(name, imgs)
            s = asyncio.run(deployment_rate(post, name, data, args.concurrency))
            print(f"  {name:<20} {d:8.1f} {s:11.1f} {s / d:6.2f}")

        checker = load_alchemy(AlchemyModelEntry(name="nsfw"))
        batch = imgs[:8]
        direct_one = ms_per_image(lambda: checker.check(imgs[:1]), 1, args.repeat)
        direct_batch = ms_per_image(lambda: checker.check(batch), len(batch), args.repeat)
        via_one = ms_per_image(lambda: alchemy.nsfw.remote(data[:1]).result(), 1, args.repeat)
        via_batch = ms_per_image(lambda: alchemy.nsfw.remote(data[:8]).result(), 8, args.repeat)
        print(f"NSFW check, ms per {args.size}x{args.size} image (median of {args.repeat}):")
        print(f"  direct, one image: {direct_one:.1f}   direct, batch of 8: {direct_batch:.1f}")
        print(f"  deployment, one image: {via_one:.1f}   deployment, batch of 8: {via_batch:.1f}")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
