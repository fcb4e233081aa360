"""The AI Horde's published model reference files (`stable_diffusion.json`, the text `db.json`:
objects of model records by name) read into ReferenceModel records. Only the facts a record
has a field for are taken; descriptions, showcases, tags and the rest are left behind.
`rayhorde models refresh` reads what it downloads with this, and writes the records in
rayhorde's own format (reference.py)."""

from __future__ import annotations

import json
import re
from typing import Literal

from models.reference.reference import ReferenceError, ReferenceModel, ReferenceRequirements


def normalise_baseline(raw: str) -> str:
    """The reference writes the SD 1.x and 2.x baselines with spaces ("stable diffusion 1")."""
    return re.sub(r"\s+", "_", raw.strip().lower())


def image_record(name: str, raw: dict) -> ReferenceModel:
    config = raw.get("config") or {}
    requirements = raw.get("requirements") or {}
    if not isinstance(requirements, dict):
        raise TypeError("requirements: not an object")
    return ReferenceModel(
        name=raw.get("name", name), type="image", baseline=normalise_baseline(raw["baseline"]),
        inpainting=raw.get("inpainting", False), nsfw=raw.get("nsfw", False),
        version=str(raw.get("version") or ""), style=raw.get("style") or "",
        # Requirements rayhorde has no field for are not facts it can apply.
        requirements={k: v for k, v in requirements.items()
                      if k in ReferenceRequirements.model_fields},
        files=[{"path": f["path"], "sha256": f.get("sha256sum"), "file_type": f.get("file_type")}
               for f in config.get("files", [])],
        downloads=[{"file_name": d["file_name"], "file_path": d.get("file_path") or "",
                    "url": d["file_url"]} for d in config.get("download", [])],
        size_on_disk_bytes=raw.get("size_on_disk_bytes"),
        features_not_supported=raw.get("features_not_supported") or [],
    )


def text_record(name: str, raw: dict) -> ReferenceModel:
    return ReferenceModel(
        name=raw.get("name", name), type="text", baseline=raw.get("baseline") or "",
        nsfw=raw.get("nsfw", False), version=str(raw.get("version") or ""),
        style=raw.get("style") or "", parameters=raw.get("parameters"), url=raw.get("url") or None,
    )


def parse_published(kind: Literal["image", "text"], data: bytes) -> dict[str, ReferenceModel]:
    """A published reference file's records by name; ReferenceError naming the first bad one."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReferenceError(f"not JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ReferenceError("not an object of models by name")
    make = image_record if kind == "image" else text_record
    out: dict[str, ReferenceModel] = {}
    for name, record in raw.items():
        try:
            if not isinstance(record, dict):
                raise TypeError("not an object")
            model = make(name, record)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ReferenceError(f"model {name!r}: {e}") from None
        if model.name != name:
            raise ReferenceError(f"model {name!r}: its record names it {model.name!r}")
        out[name] = model
    return out
