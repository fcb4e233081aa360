"""Post-processing, as graph nodes after any generation:

    image i ─▶ [face fixers] ─▶ [upscaler] ─▶ [strip_background] ─▶ stored
    (each image's chain runs at the same time as the others', on the post-processing
    deployment's replicas, apart from the diffusion replicas)

The AI Horde's order whatever the request's: face fixers first (facefixer_strength), at most
one upscaler, strip_background last (RGBA out).
"""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.workflows.graph import Graph
from models.postprocess.registry import order


async def run(images: list[bytes], names: list[str], strength: float, handle: Any) -> tuple[list[bytes], dict]:
    """The images post-processed, and the nodes' timings."""
    graph = Graph("post-processing")

    async def chain(i: int, image: bytes) -> bytes:
        for name in order(names):
            image = await graph.node(f"{name} {i}", lambda n=name, im=image: handle.options(
                multiplexed_model_id=n).process.remote(n, im, strength))
        return image

    out = await asyncio.gather(*(chain(i, image) for i, image in enumerate(images)))
    return list(out), graph.finish({})["timings"]
