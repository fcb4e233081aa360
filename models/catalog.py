"""The model catalog: `configs/models.yaml` parsed into typed entries.

Every model the cluster serves itself is listed once, with where its weights come from. What
the AI Horde's model reference (models/reference) says about a model of the same name fills
what its entry leaves out: its family (from the reference's baseline), `inpainting`, `nsfw`
and `requirements`; what the entry gives overrides the reference. Nothing in
here imports torch, so the API can validate requests without loading any model code.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.alchemy.registry import AlchemyModelEntry
from models.postprocess.registry import POST_PROCESSORS, PostProcessorEntry


class Family(str, Enum):
    """One Serve deployment serves each family. The image families are the AI Horde's
    `baseline` names; the horde has no such names for text models, which are all one family
    here (`llm`: causal language models run through transformers)."""

    stable_diffusion_1 = "stable_diffusion_1"
    stable_diffusion_xl = "stable_diffusion_xl"
    stable_cascade = "stable_cascade"
    llm = "llm"

    @property
    def kind(self) -> Literal["image", "text"]:
        """The AI Horde's model type, as in /v2/status/models?type=..."""
        return "text" if self is Family.llm else "image"

    @property
    def native_side(self) -> int:
        if self.kind != "image":
            raise ValueError(f"{self.value} is not an image family; it has no native image side")
        return 512 if self is Family.stable_diffusion_1 else 1024


class WeightsSource(BaseModel):
    """Where a checkpoint's weights come from. Exactly one way of loading applies per kind:

    - `builtin`: a tiny random-weight model built in code (`models/tiny.py`, or
      `models/tiny_llm.py` for the llm family), seeded, for tests and the embedded demo.
    - `pretrained`: `from_pretrained` on a Hugging Face repo id or a local folder (diffusers
      pipeline folder for images; model + tokenizer folder for llm).
    - `single_file`: `from_single_file` on one `.safetensors` checkpoint (path or URL); `config`
      names the diffusers folder or repo whose component configs describe it. Images only.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["builtin", "pretrained", "single_file"]
    path: str = Field(description="builtin name, repo id / folder, or .safetensors path / URL")
    config: str | None = None
    # Stable Cascade needs two checkpoints: the stage C prior and the stage B decoder.
    decoder_path: str | None = None
    variant: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> "WeightsSource":
        if self.kind == "single_file" and not self.path.endswith((".safetensors", ".ckpt")):
            raise ValueError("single_file weights must be a .safetensors or .ckpt file")
        return self


class LayerDiffuseWeights(BaseModel):
    """Where a model's Layer Diffuse files come from (`params.transparent`): the UNet
    injection and the transparent VAE decoder (models/layer_diffuse.py).

    - `builtin`: seeded random weights in the published key layout, made for the loaded UNet
      (the tiny models), written to disk and loaded back like the real files.
    - `file`: `injection` and `decoder` are local .safetensors paths.
    - `huggingface`: `injection` and `decoder` are file names in `repo` (the published ones are
      in LayerDiffusion/layerdiffusion-v1).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["builtin", "file", "huggingface"]
    injection: str | None = None
    decoder: str | None = None
    repo: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "LayerDiffuseWeights":
        if self.kind != "builtin" and not (self.injection and self.decoder):
            raise ValueError(f"{self.kind} Layer Diffuse weights need injection and decoder")
        if (self.kind == "huggingface") != (self.repo is not None):
            raise ValueError("repo is for (and needed by) huggingface Layer Diffuse weights")
        return self


class Requirements(BaseModel):
    """What a model needs to give good images (the AI Horde's model reference `requirements`).
    A request outside these gets a warning, not a rejection."""

    model_config = ConfigDict(extra="forbid")

    min_steps: int | None = None
    max_steps: int | None = None
    min_cfg_scale: float | None = None
    max_cfg_scale: float | None = None
    clip_skip: int | None = None
    samplers: list[str] | None = None


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    family: Family
    # None: this cluster does not run it (a model of the AI Horde's reference, or one a
    # customizer's worker offers, that HTTP volunteers serve); every catalog entry has weights.
    weights: WeightsSource | None = None
    requirements: Requirements = Requirements()
    nsfw: bool = False
    # An inpainting checkpoint (the model reference's `inpainting`: a UNet that also sees the
    # mask and the masked source): it runs inpainting and outpainting jobs only.
    inpainting: bool = False
    # Layer Diffuse weights for transparent images (SD 1.5 and SDXL); None: no transparency.
    layer_diffuse: LayerDiffuseWeights | None = None
    description: str = ""
    # Text models only (the AI Horde worker's limits): the longest context, prompt plus
    # generated tokens, and the most tokens generated per request. None: the model's own
    # position limit, and no limit beyond the context.
    max_context_length: int | None = Field(default=None, ge=2)
    max_length: int | None = Field(default=None, ge=1)
    # Text models only: the engine that runs the model (deployments/llm_engines/). `builtin`:
    # our batched decode loop over transformers (CPU or GPU, nothing more to install); `vllm`:
    # vLLM's continuous batching and paged KV cache on a GPU (`pip install -e '.[vllm]'`,
    # pretrained weights only). `engine_kwargs` go to vLLM's AsyncEngineArgs, as ray.serve.llm's
    # LLMConfig.engine_kwargs do (gpu_memory_utilization, max_num_seqs, enforce_eager, ...).
    engine: Literal["builtin", "vllm"] = "builtin"
    engine_kwargs: dict[str, str | int | float | bool | list | dict | None] = Field(default_factory=dict, max_length=64)
    # Image models only. `compile`: torch.compile the UNet(s) when a replica loads the model
    # (a slower first load, faster steps). `vae`: an AutoencoderKL (Hugging Face repo id or
    # local folder) used instead of the checkpoint's own, e.g. madebyollin/sdxl-vae-fp16-fix,
    # which runs SDXL's VAE in float16 without the float32 upcast its own VAE needs.
    compile: bool = False
    vae: str | None = None

    def unsupported_text_params(self, params: dict) -> list[str]:
        """The names of the sampling parameters in `params` (TextJob names; a missing or None
        value is not counted) that this model's engine cannot honour: vLLM has no locally
        typical sampling, and its repetition penalty always covers the whole context."""
        if self.engine != "vllm":
            return []
        out = []
        if params.get("typical") is not None and params["typical"] < 1:
            out.append("typical")
        if params.get("rep_pen_range") not in (None, 0) and params.get("rep_pen") != 1:
            out.append("rep_pen_range")
        return out

    @model_validator(mode="after")
    def _check_family_fields(self) -> "ModelEntry":
        if self.family is Family.llm and self.weights is not None:
            w = self.weights
            if w.kind == "single_file":
                raise ValueError(f"{self.name}: llm weights must be builtin or pretrained, not single_file")
            if w.config is not None or w.decoder_path is not None:
                raise ValueError(f"{self.name}: config and decoder_path are for image models, not llm")
        if self.family is Family.llm:
            if self.requirements != Requirements():
                raise ValueError(f"{self.name}: requirements are image sampling limits, not for llm")
            if self.max_context_length is not None and self.max_length is not None \
                    and self.max_length >= self.max_context_length:
                raise ValueError(f"{self.name}: max_length must be below max_context_length")
            if self.inpainting or self.layer_diffuse:
                raise ValueError(f"{self.name}: inpainting and layer_diffuse are for image models, not llm")
            if self.compile or self.vae is not None:
                raise ValueError(f"{self.name}: compile and vae are for image models, not llm")
            if self.engine == "vllm" and self.weights is not None and self.weights.kind != "pretrained":
                raise ValueError(f"{self.name}: the vllm engine loads pretrained weights only, "
                                 f"not {self.weights.kind}")
            if self.engine == "builtin" and self.engine_kwargs:
                raise ValueError(f"{self.name}: engine_kwargs are for the vllm engine")
            # As ray.serve.llm refuses them: the entry itself names the model and its limits.
            named = {"model", "served_model_name", "tokenizer", "max_model_len", "dtype"} & set(self.engine_kwargs)
            if named:
                raise ValueError(f"{self.name}: engine_kwargs may not set {sorted(named)}; the entry sets them")
        elif self.max_context_length is not None or self.max_length is not None:
            raise ValueError(f"{self.name}: max_context_length and max_length are for llm models only")
        elif self.engine != "builtin" or self.engine_kwargs:
            raise ValueError(f"{self.name}: engine and engine_kwargs are for llm models only")
        if self.vae is not None and self.family is Family.stable_cascade:
            raise ValueError(f"{self.name}: vae is for SD 1.5 and SDXL models (Stable Cascade has none)")
        if self.layer_diffuse and self.family not in (Family.stable_diffusion_1, Family.stable_diffusion_xl):
            raise ValueError(f"{self.name}: Layer Diffuse is for SD 1.5 and SDXL models only")
        return self


class ControlNetEntry(BaseModel):
    """A ControlNet checkpoint: the family whose UNet it guides, the control types it was
    trained for ("qr_code" for QR Code Monster), and its weights (`builtin`: a tiny one made
    from the base model's UNet, models/tiny_controlnet.py; `pretrained`; `single_file`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    family: Family
    control_types: list[str] = Field(min_length=1)
    weights: WeightsSource

    @model_validator(mode="after")
    def _check(self) -> "ControlNetEntry":
        if self.family not in (Family.stable_diffusion_1, Family.stable_diffusion_xl):
            raise ValueError(f"{self.name}: ControlNets are for SD 1.5 and SDXL models")
        return self


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry]
    controlnets: list[ControlNetEntry] = Field(default_factory=list)
    # Where the post-processors' published weights are (models/postprocess/registry.py); used
    # when the settings say postprocessor_weights: catalog.
    postprocessors: list[PostProcessorEntry] = Field(default_factory=list)
    # Where caption, interrogation and the NSFW classifier load from (models/alchemy/registry.py);
    # used when the settings say alchemy_weights: catalog.
    alchemy: list[AlchemyModelEntry] = Field(default_factory=list)

    def served_postprocessors(self, weights: str) -> list[PostProcessorEntry]:
        """The post-processors a cluster serves: every one with builtin random weights (the
        embedded default), or the catalog's entries (published weights the operator supplies)."""
        if weights == "builtin":
            return [PostProcessorEntry(name=n) for n in POST_PROCESSORS]
        return list(self.postprocessors)

    def served_alchemy(self, weights: str) -> list[AlchemyModelEntry]:
        """Caption, interrogation and nsfw models, as served_postprocessors."""
        if weights == "builtin":
            return [AlchemyModelEntry(name=n) for n in ("caption", "interrogation", "nsfw")]
        return list(self.alchemy)

    def controlnet_for(self, family: Family, control_type: str) -> ControlNetEntry | None:
        return next((c for c in self.controlnets
                     if c.family is family and control_type in c.control_types), None)

    @model_validator(mode="after")
    def _unique(self) -> "Catalog":
        names = [m.name for m in self.models]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"model names listed twice: {sorted(dupes)}")
        return self

    def get(self, name: str) -> ModelEntry | None:
        return self._by_name().get(name)

    def with_models(self, extra: list[ModelEntry]) -> "Catalog":
        """This catalog with `extra` entries added (models nothing here runs, for the request
        rules to read: api/images.py request_models)."""
        out = self.model_copy(update={"models": [*self.models, *extra]})
        out.__dict__.pop("_index", None)  # the copy's own index, built on first use
        return out

    def _by_name(self) -> dict[str, ModelEntry]:
        cache = self.__dict__.get("_index")
        if cache is None:
            cache = {m.name: m for m in self.models}
            self.__dict__["_index"] = cache
        return cache

    def select(self, names: list[str]) -> "Catalog":
        """The sub-catalog of the models a config serves, in the order given."""
        missing = [n for n in names if n not in self._by_name()]
        if missing:
            raise ValueError(f"models not in the catalog: {missing}")
        return Catalog(models=[self._by_name()[n] for n in names], controlnets=self.controlnets,
                       postprocessors=self.postprocessors, alchemy=self.alchemy)

    def by_family(self) -> dict[Family, list[ModelEntry]]:
        out: dict[Family, list[ModelEntry]] = {}
        for m in self.models:
            out.setdefault(m.family, []).append(m)
        return out


def load_catalog(path: str | Path, reference=None) -> Catalog:
    """The catalog at `path`, its entries completed from `reference` (a ModelReference;
    default: the pinned AI Horde model reference)."""
    from models.reference import load_reference

    with open(path) as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise ValueError(f"{path}: needs a `models` list")
    reference = load_reference() if reference is None else reference
    for i, model in enumerate(raw["models"]):
        if not isinstance(model, dict) or "weights" not in model:
            raise ValueError(f"{path}: models[{i}]: every model this cluster serves needs `weights`")
        raw["models"][i] = with_reference(model, reference)
    return Catalog.model_validate(raw)


def with_reference(model: dict, reference) -> dict:
    """A catalog entry (as read from YAML) with what the model reference says about a model
    of its name filled in where the entry says nothing. An explicit family that contradicts
    the reference's baseline is refused; a baseline without a deployment here (SD 2.x, Flux)
    needs the entry to name the family that runs it."""
    known = reference.get(model.get("name"))
    if known is None:
        return model
    out = dict(model)
    name, family = out["name"], known.family
    if "family" not in out:
        if family is None:
            raise ValueError(f"{name}: the model reference's baseline {known.baseline!r} has "
                             "no deployment here: give the family that runs it")
        out["family"] = family.value
    elif family is not None and out["family"] != family.value:
        raise ValueError(f"{name}: family {out['family']} contradicts the model reference's "
                         f"baseline {known.baseline!r} ({family.value})")
    out.setdefault("nsfw", known.nsfw)
    if known.type == "image":
        out.setdefault("inpainting", known.inpainting)
        out.setdefault("requirements", catalog_requirements(known.requirements))
    return out


def catalog_requirements(req) -> dict:
    """The model reference's requirements as catalog Requirements fields: a fixed `cfg_scale`
    is both bounds; `schedulers` has no counterpart here and is left out."""
    out = {k: getattr(req, k) for k in ("min_steps", "max_steps", "min_cfg_scale",
                                        "max_cfg_scale", "clip_skip")
           if getattr(req, k) is not None}
    if req.samplers is not None:
        out["samplers"] = list(req.samplers)
    if req.cfg_scale is not None:
        out.setdefault("min_cfg_scale", req.cfg_scale)
        out.setdefault("max_cfg_scale", req.cfg_scale)
    return out
