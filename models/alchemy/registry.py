"""The alchemy forms' models by name, and where each catalog entry's weights come from:

- `caption`: a BLIP captioning model (caption.py), e.g. `Salesforce/blip-image-captioning-base`;
- `interrogation`: a CLIP model ranking our term lists (interrogation.py), e.g.
  `openai/clip-vit-large-patch14`;
- `nsfw`: Stable Diffusion's CLIP safety checker (models/safety.py),
  `CompVis/stable-diffusion-safety-checker`.

An entry's weights are `builtin` (the tiny random model of each module, written to a folder and
loaded back through the same loader as published weights), a local `directory` in the
`save_pretrained` layout, or a `huggingface` repo downloaded whole (less formats torch does not
load) and loaded from its snapshot folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:  # the modules import torch and transformers: only when a model loads
    from models.alchemy.caption import Captioner
    from models.alchemy.interrogation import Interrogator
    from models.safety import NsfwChecker

    AlchemyModel = Captioner | Interrogator | NsfwChecker

ALCHEMY_FORMS = ("caption", "interrogation", "nsfw")
AlchemyName = Literal["caption", "interrogation", "nsfw"]

# Files a snapshot never needs: other frameworks' weights and exports.
_NOT_TORCH = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite", "*.mlmodel", "*.mlpackage/*",
              "onnx/*", "coreml/*", "flax_model*", "tf_model*", "rust_model*"]


class AlchemyModelEntry(BaseModel):
    """An alchemy form the cluster serves and where its weights come from."""

    model_config = ConfigDict(extra="forbid")

    name: AlchemyName
    kind: Literal["builtin", "directory", "huggingface"] = "builtin"
    path: str | None = None  # directory: a save_pretrained folder
    repo: str | None = None  # huggingface: a repo id

    @model_validator(mode="after")
    def _check(self) -> AlchemyModelEntry:
        if self.kind == "directory" and not self.path:
            raise ValueError(f"{self.name}: directory weights need a path")
        if self.kind == "huggingface" and not self.repo:
            raise ValueError(f"{self.name}: huggingface weights need a repo")
        return self


def _snapshot(repo: str) -> str:
    """The repo's folder in the Hugging Face cache. Safetensors weights only when the repo has
    them (the published repos often carry the same weights as a .bin too, each over 1 GB);
    otherwise a second pass adds the .bin files."""
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo, ignore_patterns=[*_NOT_TORCH, "*.bin"])
    if not any(Path(folder).glob("*.safetensors")):
        folder = snapshot_download(repo, ignore_patterns=_NOT_TORCH)
    return folder


def _load_from(name: str, folder: str, device: str) -> AlchemyModel:
    if name == "caption":
        from models.alchemy.caption import load_captioner

        return load_captioner(folder, device=device)
    if name == "interrogation":
        from models.alchemy.interrogation import load_interrogator

        return load_interrogator(folder, device=device)
    from models.safety import load_checker

    return load_checker(folder, device=device)


def _build_tiny(name: str) -> AlchemyModel:
    if name == "caption":
        from models.alchemy.caption import build_tiny_captioner

        return build_tiny_captioner(seed=0)
    if name == "interrogation":
        from models.alchemy.interrogation import build_tiny_interrogator

        return build_tiny_interrogator(seed=0)
    from models.safety import build_tiny_checker

    return build_tiny_checker(seed=0)


def load(entry: AlchemyModelEntry, device: str = "cpu") -> AlchemyModel:
    """The entry's model on `device`: a `Captioner` (caption), an `Interrogator`
    (interrogation) or a `models.safety.NsfwChecker` (nsfw)."""
    if entry.kind == "directory":
        return _load_from(entry.name, entry.path, device)
    if entry.kind == "huggingface":
        return _load_from(entry.name, _snapshot(entry.repo), device)
    # builtin: through a folder, the way published weights load. The loaded tensors do not
    # need the files afterwards, so the folder goes at once.
    with tempfile.TemporaryDirectory(prefix=f"rayhorde-alchemy-{entry.name}-") as folder:
        _build_tiny(entry.name).save_pretrained(folder)
        return _load_from(entry.name, folder, device)
