"""The diffusion deployment: one Serve deployment class for every image family, holding up to 3
models per replica (picked by multiplexed model id), one pipeline call at a time.

    handle.options(multiplexed_model_id=job.model).generate.remote(job)   # deployments/jobs.py

The builder (cluster/app.py) names one deployment per family (`sd15`, `sdxl`, `cascade`), and
the Serve config applies its options (replicas, autoscaling, GPUs) by that name; nothing about
scaling is fixed here. `DiffusionGenerator` is the same without Serve (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

from PIL import Image
from ray import serve

from deployments.diffusion import cascade, common, sd15, sdxl, tasks
from deployments.jobs import ImageJob, JobRejected
from models.adapters import AdapterCatalog, AdapterError, AdapterResolver, apply_adapters
from models.catalog import Family, ModelEntry
from models.loaders import load_layer_diffuse_for, load_pipeline
from models.workflows import Workflow

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
                 adapters: AdapterCatalog | dict | None = None):
        self.family = family
        self.module = FAMILY_MODULES[family]
        self.entries = common.family_entries(entries, family)
        self.device = device or common.device()
        catalog = AdapterCatalog.model_validate(adapters or {})
        self.adapters = AdapterResolver(catalog)

    def load(self, model_name: str) -> Any:
        if model_name not in self.entries:
            raise JobRejected(f"model: {model_name!r} is not one of this deployment's models: "
                              f"{sorted(self.entries)}")
        return load_pipeline(self.entries[model_name], self.device)

    def generate(self, pipe: Any, job: ImageJob | dict) -> list[Image.Image]:
        job = ImageJob.parse(job)
        if self.family is Family.stable_cascade:
            if job.loras or job.tis:
                raise JobRejected("params.loras, params.tis: not for Stable Cascade models")
            return cascade.generate(pipe, job)
        prompt, negative = self._with_adapters(pipe, job)
        files = self._layer_diffuse(pipe, job.model) if job.workflow is Workflow.transparent else None
        return tasks.run(self.module, pipe, job, prompt, negative, files)

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
    def __init__(self, models: list[dict], adapters: dict | None = None):
        """`models`: ModelEntry.model_dump() dicts, all of one family; `adapters`: the LoRA /
        TI catalog (AdapterCatalog.model_dump())."""
        if not models:
            raise ValueError("a diffusion deployment needs at least one model")
        self.generator = DiffusionGenerator(Family(models[0]["family"]), models, adapters=adapters)
        self.runner = common.ReplicaRunner()

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_pipeline(self, model_name: str) -> Any:
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


def family_deployment(family: Family):
    """The family's deployment, named as the Serve configs name it."""
    return DiffusionDeployment.options(name=DEPLOYMENT_NAMES[family])
