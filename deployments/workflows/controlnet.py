"""The ControlNet workflow, as a Ray task graph:

    source image ─▶ [annotate]  Ray task (CPU): the source as a control map (canny, hed, depth,
                        │       normal, openpose, seg, scribble, fakescribbles, hough)
                        ▼       (skipped when image_is_control: the source is the map)
                   [guided pass]  the family deployment: txt2img guided by the catalog's
                                  ControlNet for the control type, at control_strength
    return_control_map: the map itself is the result, and no guided pass runs.

The map goes from the annotator to the guided pass as an object reference, so it stays in
Ray's object store; the graph only awaits the annotator's small status return. The annotator
task is retried by Ray when its worker or node dies; the guided pass is retried by `Graph`.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import ray

from deployments.jobs import ImageJob, JobRejected
from deployments.workflows.graph import Graph, reply_of


@ray.remote(num_returns=2, max_retries=2)
def annotate(image: bytes, control_type: str, weights: dict) -> tuple[str | None, bytes]:
    """(None, PNG of the control map), or (why the source cannot be annotated, b"")."""
    from PIL import Image

    from deployments.diffusion.common import decode_source
    from models.annotators import AnnotatorWeights, build_annotator

    try:
        source = decode_source(image, "source_image").convert("RGB")
    except JobRejected as e:
        return str(e), b""
    control = build_annotator(control_type, AnnotatorWeights(**weights))(source)
    buf = io.BytesIO()
    Image.Image.save(control, buf, format="PNG")
    return None, buf.getvalue()


async def run(job: ImageJob, handle: Any, options: dict) -> dict:
    """`options`: {"annotator_weights": AnnotatorWeights fields, "annotator_num_cpus": float}."""
    graph = Graph("controlnet")
    control: list = []
    if not job.image_is_control:
        status, control_map = annotate.options(num_cpus=options.get("annotator_num_cpus", 0)).remote(
            job.source_image, job.control_type, options.get("annotator_weights", {}))
        problem = await graph.node("annotate", lambda: status)
        if problem:
            raise JobRejected(f"controlnet node annotate: {problem}")
        control = [control_map]
    if job.return_control_map:
        from PIL import Image

        from deployments.diffusion.common import encode_webp, fit

        data = await control[0] if control else job.source_image
        image = fit(Image.open(io.BytesIO(data)).convert("RGB"), job.width, job.height)
        webp = await asyncio.to_thread(encode_webp, image)
        return graph.finish(reply_of([webp] * len(job.seeds), list(job.seeds)))
    result = await graph.node("guided pass", lambda: handle.options(
        multiplexed_model_id=job.model).generate_controlled.remote(job, control))
    return graph.finish(result)
