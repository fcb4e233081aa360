"""Stable Cascade remix, as a Ray task graph:

    source image ───▶ [encode 0] ─┐   the family deployment: CLIP vision embedding of each
    extra image 1 ──▶ [encode 1] ─┤   image, all at once (on as many replicas as there are)
      ...                         │
    extra image 5 ──▶ [encode 5] ─┤
                                  ▼
                        [stage C + B]  each embedding scaled by its strength (the source 1),
                                       concatenated along the token axis as stage C's image
                                       conditioning, then stage B

The embeddings are a few kilobytes each; the images themselves travel only with the job.
"""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.jobs import ImageJob
from deployments.workflows.graph import Graph


async def run(job: ImageJob, handle: Any) -> dict:
    graph = Graph("remix")
    model = handle.options(multiplexed_model_id=job.model)
    images = [job.source_image, *(extra.image for extra in job.extra_source_images)]
    embeddings = await asyncio.gather(*(
        graph.node(f"encode {i}", lambda image=image: model.encode_image.remote(job.model, image))
        for i, image in enumerate(images)))
    result = await graph.node("stage C + B", lambda: model.remix.remote(job, *embeddings))
    return graph.finish(result)
