"""QR codes that always scan, as a Ray task graph:

    extra_texts ─▶ [render]  Ray task: the code's layers at the image size (models/qr.py:
                      │      whole code, modules, finders, the feathered finder mask)
                      ▼
                   [passes]  the family deployment: modules || finders split passes, merged
                      │      through the mask, then the whole-code pass (QR Code Monster)
                      ▼
                   [scan i]  Ray tasks, one per image, all at once: zxing-cpp decodes the
                      │      stored bytes (the WebP)
                      ▼
          none missed ─▶ done ("qr: scanned on attempt N")
          some missed ─▶ [passes] again for those, the code applied more strongly, from the
                         next seeds, up to ATTEMPTS; then
                         [blend i]  the last image blended with the code at the lowest
                                    strength that decodes ("qr: blended at strength S")

Beyond the AI Horde, which never checks: every image handed back decodes to the requested
text, and its gen_metadata says how (type information, value see_ref).
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import ray

from deployments.jobs import ImageJob, JobRejected
from deployments.workflows.graph import Graph

ATTEMPTS = 2  # diffusion attempts per image before it is blended


# Small CPU work (milliseconds): it reserves no CPU, so it never waits behind the replicas
# that hold every CPU of a small cluster.
@ray.remote(num_returns=2, max_retries=2, num_cpus=0)
def render(extra_texts: list[dict], prompt: str, width: int, height: int) -> tuple[str | None, Any]:
    """(None, models.qr.QrLayers for the request), or (the QrRequestError's text, None)."""
    from models.qr import QrRequest, QrRequestError, render_layers

    try:
        return None, render_layers(QrRequest.from_extra_texts(extra_texts, prompt), width, height)
    except QrRequestError as e:
        return str(e), None


@ray.remote(max_retries=2, num_cpus=0)
def scan(webp: bytes, content: str) -> bool:
    from PIL import Image

    from models.qr import scans

    return scans(Image.open(io.BytesIO(webp)), content)


@ray.remote(max_retries=2, num_cpus=0)
def blend(webp: bytes, layers: Any, content: str) -> tuple[bytes, float]:
    """The image blended with the code at the lowest strength whose stored WebP decodes."""
    from PIL import Image

    from deployments.diffusion.common import encode_webp
    from models.qr import blend_until_scans, scans

    image = Image.open(io.BytesIO(webp)).convert("RGB")
    blended, strength = blend_until_scans(image, layers.code, content)
    out = encode_webp(blended)
    while not scans(Image.open(io.BytesIO(out)), content) and strength < 1.0:
        # WebP's loss undid a marginal blend: a little more of the code.
        strength = min(1.0, strength + 0.05)
        out = encode_webp(Image.blend(image, layers.code.convert("RGB"), strength))
    return out, strength


def _note(ref: str) -> list[dict]:
    return [{"type": "information", "value": "see_ref", "ref": ref}]


async def run(job: ImageJob, handle: Any) -> dict:
    from models.qr import QrRequest, QrRequestError

    graph = Graph("qr_code")
    texts = [t.model_dump() for t in job.extra_texts]
    try:
        content = QrRequest.from_extra_texts(texts, job.prompt).content
    except QrRequestError as e:
        raise JobRejected(str(e)) from None
    status, layers = render.remote(texts, job.prompt, job.width, job.height)
    problem = await graph.node("render", lambda: status)  # the layers stay in the object store
    if problem:
        raise JobRejected(f"qr_code node render: {problem}")
    model = handle.options(multiplexed_model_id=job.model)
    n = len(job.seeds)
    images: list[bytes | None] = [None] * n
    seeds, notes = list(job.seeds), [[] for _ in range(n)]
    missing, reply = list(range(n)), {}
    for attempt in range(1, ATTEMPTS + 1):
        batch = job.model_copy(update={"seeds": tuple(job.seeds[i] for i in missing)})
        reply = await graph.node(f"passes {attempt}", lambda b=batch, a=attempt: model.generate_qr.remote(b, [layers], a))
        scanned = await asyncio.gather(*(
            graph.node(f"scan {attempt}.{i}", lambda w=w: scan.remote(w, content))
            for i, w in zip(missing, reply["images"])))
        for i, webp, seed, ok in zip(missing, reply["images"], reply["seeds"], scanned):
            images[i], seeds[i] = webp, seed
            if ok:
                notes[i] = _note(f"qr: scanned on attempt {attempt}")
        missing = [i for i in missing if not notes[i]]
        if not missing:
            break
    blended = await asyncio.gather(*(
        graph.node(f"blend {i}", lambda i=i: blend.remote(images[i], layers, content)) for i in missing))
    for i, (webp, strength) in zip(missing, blended):
        images[i] = webp
        notes[i] = _note(f"qr: blended with the code at strength {strength:.2f} after {ATTEMPTS} attempts")
    return graph.finish({**reply, "images": images, "seeds": seeds, "metadata": notes})
