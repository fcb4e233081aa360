"""Multi-step image workflows as Ray task graphs, one readable file each: `controlnet.py`,
`remix.py`, `qr_code.py`. `graph.py` holds what they share: running a node with retries
on replica or node failure, its timing, and naming the node a graph failed at. `run` is what
the dispatcher and `rayhorde worker` call for a job whose workflow is a graph."""

from __future__ import annotations

from typing import Any

from deployments.jobs import ImageJob, JobRejected
from models.workflows import Workflow


def graph_options(settings: Any) -> dict:
    """What the graphs take from the settings (api/settings.py): the annotators' weights
    ("builtin" random ones, or the "published" files) and the CPUs an annotator task asks for."""
    return {"annotator_weights": {"kind": "builtin" if settings.annotator_weights == "builtin"
                                  else "huggingface"},
            "annotator_num_cpus": settings.annotator_num_cpus}


async def run(job: ImageJob, handle: Any, options: dict | None = None) -> dict:
    """Run `job`'s graph against the family deployment `handle`; the reply has the shape of
    the deployment's own `generate` (images, seeds, node_id, replica, seconds) plus
    `timings` ({node: seconds})."""
    if job.workflow is Workflow.controlnet:
        from deployments.workflows import controlnet

        return await controlnet.run(job, handle, options or {})
    if job.workflow is Workflow.remix:
        from deployments.workflows import remix

        return await remix.run(job, handle)
    if job.workflow is Workflow.qr_code:
        from deployments.workflows import qr_code

        return await qr_code.run(job, handle)
    raise JobRejected(f"params.workflow: the {job.workflow.value} workflow does not run here")
