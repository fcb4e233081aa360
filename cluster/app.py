"""The Serve application builder named by `configs/*.yaml` (`import_path: cluster.app:build`).

It applies the database migrations once, then composes the deployments: the API ingress, the
dispatcher, and one deployment per model family that the config serves.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from api.db.migrate import upgrade
from api.db.session import get_database
from api.settings import Settings
from models.catalog import Family, load_catalog


class FamilyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_in_flight: int = Field(4, ge=1)


class VolunteerArgs(BaseModel):
    """How the cluster takes Ray-joined volunteer nodes (cluster/bridge.py)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    poll_seconds: float = Field(1.0, gt=0)
    # Per family, the Ray actor options of a volunteer node's replica; default one GPU when
    # the node has any, else half a CPU.
    actor_options: dict[Family, dict] = Field(default_factory=dict)


class AppArgs(BaseModel):
    """The `args:` block of an application in a Serve config."""

    model_config = ConfigDict(extra="forbid")
    settings: dict = Field(default_factory=dict)
    families: dict[Family, FamilyConfig] = Field(default_factory=dict)
    poll_seconds: float = 1.0
    volunteers: VolunteerArgs = Field(default_factory=VolunteerArgs)
    # False: the API alone, no dispatcher and no model deployments; the queue is then drained
    # only by workers from outside (benchmarks of the API use this too).
    dispatch: bool = True


def _absolute(settings: Settings) -> Settings:
    """Replicas do not share the driver's working directory: make local paths absolute."""
    updates = {}
    if settings.database_url.startswith("sqlite:///") and not settings.database_url.startswith(
        "sqlite:////"
    ):
        rel = settings.database_url.removeprefix("sqlite:///")
        updates["database_url"] = f"sqlite:///{Path(rel).resolve()}"
    updates["storage_dir"] = str(Path(settings.storage_dir).resolve())
    updates["catalog_path"] = str(Path(settings.catalog_path).resolve())
    updates["adapter_catalog_path"] = str(Path(settings.adapter_catalog_path).resolve())
    return settings.model_copy(update=updates)


def adapter_catalog(settings: Settings) -> dict:
    """The LoRA / TI catalog the image deployments get, its cache folder made absolute."""
    from models.adapters import load_adapter_catalog

    catalog = load_adapter_catalog(settings.adapter_catalog_path)
    return catalog.model_copy(update={"cache_dir": str(Path(catalog.cache_dir).resolve())}
                              ).model_dump(mode="json")


def postprocessors(settings: Settings, catalog) -> list[dict]:
    """The post-processors the cluster serves: every one with builtin random weights (the
    embedded default), or the catalog's entries (published weights the operator supplies)."""
    from models.postprocess.registry import POST_PROCESSORS, PostProcessorEntry

    if settings.postprocessor_weights == "builtin":
        entries = [PostProcessorEntry(name=n) for n in POST_PROCESSORS]
    else:
        entries = catalog.postprocessors
    return [e.model_dump(mode="json") for e in entries]


def family_deployments():
    """Each family's Serve deployment, named as the configs name it (sd15, sdxl, cascade, llm)."""
    from deployments.diffusion.deployment import family_deployment
    from deployments.llm import LLMDeployment

    return {
        **{f: family_deployment(f) for f in
           (Family.stable_diffusion_1, Family.stable_diffusion_xl, Family.stable_cascade)},
        Family.llm: LLMDeployment,
    }


def build(args: dict) -> Application:
    from api.ingress import ApiIngress
    from cluster.dispatcher import Dispatcher
    from deployments.postprocess import PostProcessDeployment

    app_args = AppArgs.model_validate(args or {})
    settings = _absolute(Settings(**app_args.settings))
    upgrade(get_database(settings.database_url))
    plain = settings.model_dump(mode="json")
    if not app_args.dispatch:
        return ApiIngress.bind(plain, None)
    catalog = load_catalog(settings.catalog_path)
    if settings.served_models:
        catalog = catalog.select(settings.served_models)
    by_family = catalog.by_family()
    classes = family_deployments()
    families = {}
    adapters = adapter_catalog(settings)
    for family, entries in by_family.items():
        cfg = app_args.families.get(family, FamilyConfig())
        dumped = [e.model_dump(mode="json") for e in entries]
        controlnets = [c.model_dump(mode="json") for c in catalog.controlnets if c.family is family]
        args = (dumped,) if family is Family.llm else (dumped, adapters, controlnets)
        families[family.value] = {
            "handle": classes[family].bind(*args), "entries": dumped, "args": args,
            "models": [e.name for e in entries], "max_in_flight": cfg.max_in_flight,
        }
    volunteers = app_args.volunteers.model_dump(mode="json")
    dispatcher = Dispatcher.bind(plain, families, poll_seconds=app_args.poll_seconds,
                                 volunteers=volunteers,
                                 postprocess=PostProcessDeployment.bind(postprocessors(settings, catalog)))
    return ApiIngress.bind(plain, dispatcher)
