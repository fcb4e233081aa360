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


class Family(str, Enum):
    """The AI Horde's `baseline` names; one Serve deployment serves each family."""

    stable_diffusion_1 = "stable_diffusion_1"
    stable_diffusion_xl = "stable_diffusion_xl"
    stable_cascade = "stable_cascade"

    @property
    def native_side(self) -> int:
        return 512 if self is Family.stable_diffusion_1 else 1024


class WeightsSource(BaseModel):
    """Where a checkpoint's weights come from. Exactly one way of loading applies per kind:

    - `builtin`: a tiny random-weight model built in code (`models/tiny.py`), seeded, for tests
      and the embedded demo.
    - `pretrained`: `from_pretrained` on a Hugging Face repo id or a local diffusers folder.
    - `single_file`: `from_single_file` on one `.safetensors` checkpoint (path or URL); `config`
      names the diffusers folder or repo whose component configs describe it.
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
    description: str = ""


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry]

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
        return Catalog(models=[self._by_name()[n] for n in names])

    def by_family(self) -> dict[Family, list[ModelEntry]]:
        out: dict[Family, list[ModelEntry]] = {}
        for m in self.models:
            out.setdefault(m.family, []).append(m)
        return out


def load_catalog(path: str | Path) -> Catalog:
    with open(path) as f:
        return Catalog.model_validate(yaml.safe_load(f))
