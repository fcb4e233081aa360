"""The AI Horde's model reference (the models the horde knows), as facts in rayhorde's own
format in `data/`."""

from models.reference.reference import (
    DATA_DIR,
    PUBLISHED_URLS,
    DownloadSource,
    ModelFile,
    ModelReference,
    ReferenceError,
    ReferenceModel,
    load_reference,
)

__all__ = ["DATA_DIR", "PUBLISHED_URLS", "DownloadSource", "ModelFile", "ModelReference",
           "ReferenceError", "ReferenceModel", "load_reference"]
