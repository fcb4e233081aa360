"""The image workflows of a request, on the API side: the AI Horde's rules about which
combinations are valid (each refusal a 400 naming the field, with the horde's rc), the source
image and mask (fetched or decoded with limits by api/sources.py, then stored once with the
request), the queue features a worker must allow, and the price factors.

Which workflow a request's jobs run is decided by models/workflows.py, the same code the
dispatcher and the deployments use.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from api import sources
from api.db import queue
from api.errors import HordeError
from api.schemas import ImageGenerateRequest
from api.settings import Settings
from api.storage import Storage
from models.adapters import AdapterCatalog
from models.adapters import check_request as check_adapters
from models.catalog import Catalog, Family
from models.postprocess.registry import UPSCALERS
from models.workflows import Workflow, choose_workflow, first_pass_size


@dataclass(frozen=True)
class StoredSources:
    """What a request's source image, mask and remix images became: an id for the request
    and the stored objects' keys (extras: [{key, strength}])."""

    request_id: str
    image_key: str | None = None
    mask_key: str | None = None
    extras: tuple[dict, ...] = ()

    def delete(self, storage: Storage) -> None:
        for key in (self.image_key, self.mask_key, *(e["key"] for e in self.extras)):
            if key is not None and storage.exists(key):
                storage.delete(key)


def check(catalog: Catalog, adapters: AdapterCatalog, body: ImageGenerateRequest,
          family: Family) -> None:
    """The rules that need no image decoded: cheap, so dry runs and refusals cost nothing."""
    p, source = body.params, body.source_image is not None
    if body.source_mask is not None and not source:
        raise HordeError(400, "SourceMaskUnnecessary",
                         "source_mask: a mask needs a source_image to apply to")
    remix = body.source_processing == "remix"
    if remix and family is not Family.stable_cascade:
        raise HordeError(400, "InvalidRemix", "source_processing: remix needs a Stable Cascade model")
    if not source and body.source_processing != "img2img":
        raise HordeError(400, "MissingSourceImage",
                         f"source_processing: {body.source_processing} needs a source_image")
    if body.extra_source_images and not remix:
        raise HordeError(400, "InvalidExtraSourceImages",
                         "extra_source_images: only the remix workflow takes them")
    if source and family is Family.stable_cascade and not remix:
        raise HordeError(400, "InvalidSourceProcessing",
                         f"source_processing: Stable Cascade models take source images only for "
                         f"remix, not {body.source_processing}")
    painting = source and body.source_processing in ("inpainting", "outpainting")
    inpainting_models = [m for m in body.models if catalog.get(m).inpainting]
    if inpainting_models and not painting:
        raise HordeError(400, "InpaintingModelMismatch",
                         f"models: {', '.join(inpainting_models)} only inpaint: send a source_image "
                         "with source_processing inpainting or outpainting")
    if p.transparent and family not in (Family.stable_diffusion_1, Family.stable_diffusion_xl):
        raise HordeError(400, "InvalidTransparency",
                         "params.transparent: only Stable Diffusion 1.5 and SDXL models make transparent images")
    if p.transparent and source:
        raise HordeError(400, "InvalidTransparency",
                         "params.transparent: transparent images are generated from text only, "
                         "without a source_image")
    if p.transparent:
        without = [m for m in body.models if catalog.get(m).layer_diffuse is None]
        if without or not body.models:
            raise HordeError(400, "InvalidTransparency",
                             "params.transparent: name models with Layer Diffuse weights in the "
                             f"catalog{'; not: ' + ', '.join(without) if without else ''}")
    if (p.loras or p.tis) and family not in (Family.stable_diffusion_1, Family.stable_diffusion_xl):
        raise HordeError(400, "InvalidLoRA", "params.loras, params.tis: LoRAs and textual "
                         "inversions are for Stable Diffusion 1.5 and SDXL models")
    if p.control_type:
        check_controlnet(catalog, body, family)
    if p.workflow == "qr_code":
        check_qr_code(catalog, body, family)
    elif p.extra_texts:
        raise HordeError(400, "InvalidExtraTexts", "params.extra_texts: only with params.workflow qr_code")
    upscalers = [n for n in p.post_processing if n in UPSCALERS]
    if len(upscalers) > 1:
        raise HordeError(400, "TooManyUpscalers",
                         f"params.post_processing: at most one upscaler, got {', '.join(upscalers)}")
    problems = check_adapters(adapters, p.loras, p.tis, family.value)
    if problems:
        raise HordeError(400, "UnknownAdapter", "params." + "; params.".join(problems))


def check_controlnet(catalog: Catalog, body: ImageGenerateRequest, family: Family) -> None:
    p = body.params
    if body.source_image is None:
        raise HordeError(400, "ControlNetSourceMissing",
                         f"source_image: control_type {p.control_type} needs a source image")
    if body.source_processing in ("inpainting", "outpainting"):
        raise HordeError(400, "ControlNetInpaintingMismatch",
                         f"source_processing: ControlNet does not run with {body.source_processing}")
    if p.transparent:
        raise HordeError(400, "InvalidTransparencyCN",
                         "params.transparent: not with ControlNet")
    if catalog.controlnet_for(family, p.control_type) is None:
        raise HordeError(400, "ControlNetUnsupported",
                         f"params.control_type: no {p.control_type} ControlNet for "
                         f"{family.value} models on this cluster")


def check_qr_code(catalog: Catalog, body: ImageGenerateRequest, family: Family) -> None:
    """The AI Horde's QR rules, and one of ours: a code too large for the image is refused
    naming extra_texts (the AI Horde silently draws a text instead)."""
    from models.qr import QrRequest, QrRequestError, render_layers

    p = body.params
    if family not in (Family.stable_diffusion_1, Family.stable_diffusion_xl):
        raise HordeError(400, "InvalidWorkflow", "params.workflow: qr_code runs on SD 1.5 and SDXL models")
    if not p.extra_texts:
        raise HordeError(400, "MissingExtraTexts",
                         "params.extra_texts: the qr_code workflow needs the qr_code reference")
    for field, given in (("source_image", body.source_image is not None), ("params.control_type", p.control_type),
                         ("params.transparent", p.transparent), ("params.hires_fix", p.hires_fix)):
        if given:
            raise HordeError(400, "InvalidWorkflow", f"{field}: not with the qr_code workflow")
    if catalog.controlnet_for(family, "qr_code") is None:
        raise HordeError(400, "ControlNetUnsupported",
                         f"params.workflow: no QR code ControlNet for {family.value} models on this cluster")
    try:
        render_layers(QrRequest.from_extra_texts([t.model_dump() for t in p.extra_texts], body.prompt),
                      p.width, p.height)
    except QrRequestError as e:
        raise HordeError(400, "InvalidExtraTexts", f"params.{e}") from None


def workflow(body: ImageGenerateRequest, family: Family) -> Workflow:
    p = body.params
    return choose_workflow(family, width=p.width, height=p.height,
                           source_processing=body.source_processing,
                           has_source=body.source_image is not None, hires_fix=p.hires_fix,
                           transparent=p.transparent, control_type=p.control_type,
                           workflow=p.workflow)


def features(body: ImageGenerateRequest, family: Family) -> int:
    """What a worker must allow to take the request's jobs (the pop's allow_* flags)."""
    w, p, out = workflow(body, family), body.params, 0
    if body.source_image is not None:
        out |= queue.Feature.PAINTING if w.painting else queue.Feature.SOURCE_IMAGE
    if w in (Workflow.controlnet, Workflow.qr_code):
        out |= queue.Feature.SDXL_CONTROLNET if family is Family.stable_diffusion_xl else queue.Feature.CONTROLNET
    if p.loras or p.tis:
        out |= queue.Feature.LORA
    if p.post_processing:
        out |= queue.Feature.POST_PROCESSING
    return int(out)


def hires_first_pass(body: ImageGenerateRequest, family: Family) -> tuple[int, int] | None:
    """The hires fix's first-pass size, when it runs (its pixels are part of the price)."""
    p = body.params
    if workflow(body, family) is Workflow.hires_fix:
        return first_pass_size(family, p.width, p.height)
    return None


def limits(settings: Settings) -> sources.SourceLimits:
    return sources.SourceLimits(max_bytes=settings.max_source_bytes,
                                max_pixels=settings.max_source_pixels,
                                fetch_timeout_seconds=settings.source_fetch_timeout_seconds,
                                allow_private_urls=settings.allow_private_source_urls)


def store(settings: Settings, storage: Storage, body: ImageGenerateRequest,
          charge: sources.Charge | None = None) -> StoredSources:
    """Fetch or decode the source image and mask (blocking: URLs are fetched; call it off the
    event loop and outside any database transaction), check the inpainting rule that needs
    the image, and store both as lossless PNG under a new request id. `charge` counts each
    image's pixels against the caller's budget before they are decoded."""
    request_id = str(uuid.uuid4())
    if body.source_image is None:
        return StoredSources(request_id)
    lim = limits(settings)
    image = sources.load_source(body.source_image, "source_image", lim, charge=charge)
    mask = (None if body.source_mask is None
            else sources.load_source(body.source_mask, "source_mask", lim, charge=charge))
    if body.source_processing in ("inpainting", "outpainting") and mask is None and not image.has_alpha:
        raise HordeError(400, "InpaintingMissingMask",
                         f"source_mask: {body.source_processing} needs a source_mask or a "
                         "source_image with transparent pixels to repaint")
    extras = [(sources.load_source(e.image, f"extra_source_images[{i}].image", lim, charge=charge),
               e.strength)
              for i, e in enumerate(body.extra_source_images or [])]
    # Workers download the sources by these keys: a folder of their own, never named by the
    # request's id (with which anyone can read and cancel the request).
    folder = f"sources/{uuid.uuid4()}"
    stored = StoredSources(request_id, f"{folder}/image.png",
                           None if mask is None else f"{folder}/mask.png",
                           tuple({"key": f"{folder}/extra-{i}.png", "strength": s}
                                 for i, (_, s) in enumerate(extras)))
    storage.put(stored.image_key, image.png, "image/png")
    if mask is not None:
        storage.put(stored.mask_key, mask.png, "image/png")
    for (extra, _), entry in zip(extras, stored.extras):
        storage.put(entry["key"], extra.png, "image/png")
    return stored
