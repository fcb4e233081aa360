"""The model catalog: `configs/models.yaml` parsed into typed entries.

Every model the cluster can serve is listed once, with its family (which deployment runs it),
where its weights come from, and the requirements the API checks requests against. Nothing in
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
    weights: WeightsSource
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

    @model_validator(mode="after")
    def _check_family_fields(self) -> "ModelEntry":
        if self.family is Family.llm:
            w = self.weights
            if w.kind == "single_file":
                raise ValueError(f"{self.name}: llm weights must be builtin or pretrained, not single_file")
            if w.config is not None or w.decoder_path is not None:
                raise ValueError(f"{self.name}: config and decoder_path are for image models, not llm")
            if self.requirements != Requirements():
                raise ValueError(f"{self.name}: requirements are image sampling limits, not for llm")
            if self.max_context_length is not None and self.max_length is not None \
                    and self.max_length >= self.max_context_length:
                raise ValueError(f"{self.name}: max_length must be below max_context_length")
            if self.inpainting or self.layer_diffuse:
                raise ValueError(f"{self.name}: inpainting and layer_diffuse are for image models, not llm")
        elif self.max_context_length is not None or self.max_length is not None:
            raise ValueError(f"{self.name}: max_context_length and max_length are for llm models only")
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


def load_catalog(path: str | Path) -> Catalog:
    with open(path) as f:
        return Catalog.model_validate(yaml.safe_load(f))
