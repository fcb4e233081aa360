"""The diffusion deployment: one Serve deployment class for every image family, holding up to 3
models per replica (picked by multiplexed model id), one pipeline call at a time.

    handle.options(multiplexed_model_id=job.model).generate.remote(job)   # deployments/jobs.py

The builder (cluster/app.py) names one deployment per family (`sd15`, `sdxl`, `cascade`), and
the Serve config applies its options (replicas, autoscaling, GPUs) by that name; nothing about
scaling is fixed here. `DiffusionGenerator` is the same without Serve (tests, benchmarks).

Each model is set up for the replica's device when loaded (acceleration.py: half precision and
SDPA attention on a GPU, a float16-safe SDXL VAE, torch.compile when the catalog asks), and a
replica warms up before it takes requests: it loads its first model and makes one small image
(at the family's native size on a GPU), so the first request pays neither for loading that
model nor for CUDA's and the compiler's first-call costs. A `n`-image job is one pipeline call
with a generator per seed (tasks.py), so image i is the one its seed makes alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import ModuleType
from typing import Any

import torch
from PIL import Image
from ray import serve

from deployments.diffusion import acceleration, cascade, common, sd15, sdxl, tasks
from deployments.jobs import ImageJob, JobRejected
from models.adapters import AdapterCatalog, AdapterError, AdapterResolver, apply_adapters
from models.catalog import Catalog, ControlNetEntry, Family, ModelEntry
from models.loaders import load_controlnet, load_layer_diffuse_for, load_pipeline
from models.workflows import Workflow

logger = logging.getLogger("ray.serve")

FAMILY_MODULES: dict[Family, ModuleType] = {
    Family.stable_diffusion_1: sd15, Family.stable_diffusion_xl: sdxl, Family.stable_cascade: cascade,
}
# The Serve deployment name of each family's deployment (the configs' `deployments:` names).
DEPLOYMENT_NAMES: dict[Family, str] = {
    Family.stable_diffusion_1: "sd15", Family.stable_diffusion_xl: "sdxl", Family.stable_cascade: "cascade",
}


class DiffusionGenerator:
    """Loads a family's models and runs image jobs on them; no Ray needed. `adapters` is the
    LoRA / TI catalog (configs/adapters.yaml); without one, jobs naming adapters are refused."""

    def __init__(self, family: Family, entries: list[ModelEntry] | list[dict], device: str | None = None,
                 adapters: AdapterCatalog | dict | None = None,
                 controlnets: list[ControlNetEntry] | list[dict] | None = None):
        self.family = family
        self.catalog = Catalog(models=[], controlnets=[
            c if isinstance(c, ControlNetEntry) else ControlNetEntry.model_validate(c)
            for c in controlnets or []])
        self.module = FAMILY_MODULES[family]
        self.entries = common.family_entries(entries, family)
        self.device = device or common.device()
        catalog = AdapterCatalog.model_validate(adapters or {})
        self.adapters = AdapterResolver(catalog)

    def load(self, model_name: str) -> Any:
        if model_name not in self.entries:
            raise JobRejected(f"model: {model_name!r} is not one of this deployment's models: "
                              f"{sorted(self.entries)}")
        entry = self.entries[model_name]
        return acceleration.prepare(load_pipeline(entry, self.device), entry, self.device)

    def warm_up(self) -> tuple[str, Any]:
        """Load the first model that makes images from a prompt alone (inpainting checkpoints
        need a source) and generate one image with it; (its name, the loaded pipeline). When
        every model is an inpainting checkpoint, the first is loaded and not run."""
        runnable = [e for e in self.entries.values() if not e.inpainting]
        entry = (runnable or list(self.entries.values()))[0]
        pipe = self.load(entry.name)
        if runnable:
            on_gpu = torch.device(self.device).type == "cuda"
            side = self.family.native_side if on_gpu else 128
            self.generate(pipe, ImageJob(model=entry.name, prompt="warm-up", seeds=(0,), width=side,
                                         height=side, steps=2))
        return entry.name, pipe

    def generate(self, pipe: Any, job: ImageJob | dict) -> list[Image.Image]:
        job = ImageJob.parse(job)
        if self.family is Family.stable_cascade:
            if job.loras or job.tis:
                raise JobRejected("params.loras, params.tis: not for Stable Cascade models")
            return cascade.generate(pipe, job)
        prompt, negative = self._with_adapters(pipe, job)
        files = self._layer_diffuse(pipe, job.model) if job.workflow is Workflow.transparent else None
        return tasks.run(self.module, pipe, job, prompt, negative, files)

    def controlled(self, pipe: Any, job: ImageJob, control: Image.Image) -> list[Image.Image]:
        """The controlnet workflow's guided pass, from its control map."""
        entry = self._controlnet(pipe, job.control_type)
        prompt, negative = self._with_adapters(pipe, job)
        return tasks.controlnet(self.module, pipe, job, prompt, negative, entry.name,
                                pipe.__dict__["_horde_controlnets"][entry.name], control)

    def qr(self, pipe: Any, job: ImageJob, layers: Any, attempt: int) -> list[Image.Image]:
        """The qr_code workflow's split passes (deployments/diffusion/qr.py) on the catalog's
        QR Code Monster ControlNet. A later `attempt` applies the code more strongly."""
        from deployments.diffusion import qr as qr_passes
        from models.qr import QrRequest, QrRequestError

        entry = self._controlnet(pipe, "qr_code")
        try:
            request = QrRequest.from_extra_texts([t.model_dump() for t in job.extra_texts], job.prompt)
        except QrRequestError as e:
            raise JobRejected(str(e)) from None
        prompt, negative = self._with_adapters(pipe, job)
        boost = 1.0 + 0.5 * (attempt - 1)
        return qr_passes.qr_generate(
            self.module, pipe, pipe.__dict__["_horde_controlnets"][entry.name], job, layers,
            request.function_layer_prompt, prompt, negative,
            modules_scale=qr_passes.MODULES_SCALE * boost, code_scale=qr_passes.CODE_SCALE * boost)

    def _controlnet(self, pipe: Any, control_type: str) -> ControlNetEntry:
        """The catalog's ControlNet for `control_type` on this family, loaded for `pipe` once."""
        if self.family is Family.stable_cascade:
            raise JobRejected("params.control_type: ControlNets are for SD 1.5 and SDXL models")
        entry = self.catalog.controlnet_for(self.family, control_type)
        if entry is None:
            raise JobRejected(f"control_type: no {control_type} ControlNet for "
                              f"{self.family.value} in the catalog")
        models = pipe.__dict__.setdefault("_horde_controlnets", {})
        if entry.name not in models:
            models[entry.name] = load_controlnet(entry, pipe.unet, self.device)
        return entry

    def remix(self, pipes: Any, job: ImageJob, embeddings: list) -> list[Image.Image]:
        """Stage C and B with the remix images' embeddings, each scaled by its strength (the
        source 1) and concatenated along the token axis."""
        import torch

        strengths = [1.0] + [e.strength for e in job.extra_source_images]
        if len(embeddings) != len(strengths):
            raise JobRejected(f"extra_source_images: {len(strengths)} images, {len(embeddings)} embeddings")
        scaled = [torch.as_tensor(e) * s for e, s in zip(embeddings, strengths)]
        return cascade.generate(pipes, job, image_embeds=torch.cat(scaled, dim=1))

    def _with_adapters(self, pipe: Any, job: ImageJob) -> tuple[str, str]:
        """Make the pipeline run with exactly the job's LoRAs and TIs (none: none); the prompts
        with trigger words and TI tokens put in. An adapter that cannot be had or loaded
        rejects the job, naming it."""
        baseline, catalog = self.family.value, self.adapters.catalog
        resolved: dict[str, list] = {"loras": [], "tis": []}
        for field, kind, specs in (("loras", "lora", job.loras), ("tis", "ti", job.tis)):
            for i, spec in enumerate(specs):
                try:
                    resolved[field].append((spec, self.adapters.resolve(
                        kind, spec.name, getattr(spec, "is_version", False), baseline)))
                except AdapterError as e:
                    raise JobRejected(f"params.{field}[{i}]: {e}") from None
        try:
            return apply_adapters(pipe, resolved["loras"], resolved["tis"], job.prompt,
                                  job.negative_prompt, catalog.max_loras_per_pipeline,
                                  catalog.max_tis_per_pipeline)
        except AdapterError as e:
            raise JobRejected(f"params.loras, params.tis: {e}") from None

    def _layer_diffuse(self, pipe: Any, model: str) -> Any:
        """The model's Layer Diffuse files, loaded once per loaded pipeline."""
        files = pipe.__dict__.get("_horde_layer_diffuse")
        if files is None:
            entry = self.entries[model]
            if entry.layer_diffuse is None:
                raise JobRejected(f"params.transparent: {model} has no Layer Diffuse weights")
            files = load_layer_diffuse_for(entry, pipe.unet)
            pipe.__dict__["_horde_layer_diffuse"] = files
        return files


class SD15Generator(DiffusionGenerator):
    def __init__(self, entries, device: str | None = None, adapters=None):
        super().__init__(Family.stable_diffusion_1, entries, device, adapters)


class SDXLGenerator(DiffusionGenerator):
    def __init__(self, entries, device: str | None = None, adapters=None):
        super().__init__(Family.stable_diffusion_xl, entries, device, adapters)


class CascadeGenerator(DiffusionGenerator):
    def __init__(self, entries, device: str | None = None, adapters=None):
        super().__init__(Family.stable_cascade, entries, device, adapters)


@serve.deployment(max_ongoing_requests=2)
class DiffusionDeployment:
    def __init__(self, models: list[dict], adapters: dict | None = None,
                 controlnets: list[dict] | None = None, warm_up: bool = True):
        """`models`: ModelEntry.model_dump() dicts, all of one family; `adapters`: the LoRA /
        TI catalog (AdapterCatalog.model_dump()); `controlnets`: the catalog's ControlNets of
        the family (ControlNetEntry.model_dump()); `warm_up`: load the first model and make
        one image before taking requests (module docstring)."""
        if not models:
            raise ValueError("a diffusion deployment needs at least one model")
        self.generator = DiffusionGenerator(Family(models[0]["family"]), models, adapters=adapters,
                                            controlnets=controlnets)
        self.runner = common.ReplicaRunner()
        self._warmed: dict[str, Any] = {}  # loaded at start, handed to the model cache on first use
        if warm_up:
            self._warm_up()

    def _warm_up(self) -> None:
        start = time.perf_counter()
        try:
            warmed = self.generator.warm_up()
        except Exception:  # noqa: BLE001 - the replica still serves; the model's jobs will say why
            logger.exception("warm-up of %s failed", self.generator.family.value)
            return
        name, pipe = warmed
        self._warmed[name] = pipe
        logger.info("warmed up %s in %.1f s", name, time.perf_counter() - start)

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_pipeline(self, model_name: str) -> Any:
        warmed = self._warmed.pop(model_name, None)
        if warmed is not None:
            return warmed
        # Loading takes seconds to minutes: off the event loop, so the replica keeps answering.
        return await asyncio.to_thread(self.generator.load, model_name)

    async def generate(self, job: ImageJob | dict) -> dict:
        parsed = ImageJob.parse(job)
        common.check_model_id(parsed)
        if parsed.model not in self.generator.entries:
            raise JobRejected(f"model: {parsed.model!r} is not one of this deployment's models: "
                              f"{sorted(self.generator.entries)}")
        pipe = await self.get_pipeline(parsed.model)
        return await self.runner.run(self.generator.generate, pipe, parsed)

    async def _loaded(self, job: ImageJob | dict) -> tuple[ImageJob, Any]:
        parsed = ImageJob.parse(job)
        common.check_model_id(parsed)
        if parsed.model not in self.generator.entries:
            raise JobRejected(f"model: {parsed.model!r} is not one of this deployment's models: "
                              f"{sorted(self.generator.entries)}")
        return parsed, await self.get_pipeline(parsed.model)

    async def generate_controlled(self, job: ImageJob | dict, control: list) -> dict:
        """The controlnet graph's guided-pass node. `control`: [the annotator node's ObjectRef
        (PNG bytes of the map)], awaited here so the map never passes through the caller; or []
        when the source image is the control map (image_is_control)."""
        parsed, pipe = await self._loaded(job)
        data = (await control[0]) if control else parsed.source_image
        image = common.decode_source(data, "control map")
        return await self.runner.run(lambda p, j: self.generator.controlled(p, j, image), pipe, parsed)

    async def generate_qr(self, job: ImageJob | dict, layers: list, attempt: int = 1) -> dict:
        """The qr_code graph's passes node. `layers`: [the render node's ObjectRef
        (models/qr.QrLayers)], awaited here; `attempt` > 1 applies the code more strongly, from
        seeds shifted by the attempt (the reply's `seeds` say which)."""
        parsed, pipe = await self._loaded(job)
        rendered = await layers[0]
        if attempt > 1:
            parsed = parsed.model_copy(update={"seeds": tuple((s + attempt - 1) % 2**32 for s in parsed.seeds)})
        return await self.runner.run(lambda p, j: self.generator.qr(p, j, rendered, attempt), pipe, parsed)

    async def encode_image(self, model: str, image: bytes) -> Any:
        """A remix graph's encoder node: one image's CLIP vision embedding ([1, 1, D] numpy)."""
        _, pipes = await self._loaded({"model": model, "prompt": "", "seeds": [0]})
        decoded = common.decode_source(image, "source_image")
        async with self.runner.lock:
            return (await asyncio.to_thread(cascade.encode_image, pipes, decoded)).numpy()

    async def remix(self, job: ImageJob | dict, *embeddings: Any) -> dict:
        """The remix graph's stage C + B node, from the encoder nodes' embeddings."""
        parsed, pipes = await self._loaded(job)
        return await self.runner.run(lambda p, j: self.generator.remix(p, j, list(embeddings)), pipes, parsed)


def family_deployment(family: Family):
    """The family's deployment, named as the Serve configs name it."""
    return DiffusionDeployment.options(name=DEPLOYMENT_NAMES[family])
