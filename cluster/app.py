"""The Serve application builder named by `configs/*.yaml` (`import_path: cluster.app:build`).

It applies the database migrations once, then composes the deployments: the API ingress, the
dispatcher, and one deployment per model family that the config serves.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from api.db.migrate import upgrade
from api.db.session import get_database
from api.installation_secret import digest
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
    # A node's replica not running this long after its deploy started is removed (and the
    # node serves nothing); dispatching goes on meanwhile.
    deploy_timeout_seconds: float = Field(600.0, gt=0)
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
    # Alchemy forms (api/alchemy/) the cluster runs at once on its own deployments.
    alchemy_max_in_flight: int = Field(4, ge=1, le=64)
    # False: the API alone, no dispatcher and no model deployments; the queue is then drained
    # only by workers from outside (benchmarks of the API use this too).
    dispatch: bool = True


def _absolute(settings: Settings) -> dict:
    """Replicas do not share the driver's working directory: local paths made absolute."""
    updates = {}
    if settings.database_url.startswith("sqlite:///") and not settings.database_url.startswith(
        "sqlite:////"
    ):
        rel = settings.database_url.removeprefix("sqlite:///")
        updates["database_url"] = f"sqlite:///{Path(rel).resolve()}"
    updates["storage_dir"] = str(Path(settings.storage_dir).resolve())
    updates["catalog_path"] = str(Path(settings.catalog_path).resolve())
    updates["adapter_catalog_path"] = str(Path(settings.adapter_catalog_path).resolve())
    return updates


def from_environment(given: dict) -> list[str]:
    """The settings this process reads from RAYHORDE_* variables (not given in the config)."""
    present = {name.upper() for name in os.environ}
    return [name for name in Settings.model_fields if name not in given
            and name != "env_digests" and f"RAYHORDE_{name.upper()}" in present]


def replica_settings(given: dict) -> tuple[Settings, dict]:
    """The build's settings, and the `settings` its replicas get: the config's own, with local
    paths made absolute. What the build read from its environment (the database URL, the key
    salt: secrets) is not passed on: each replica reads it from its own environment (the
    cluster node's, or the application's runtime_env) and refuses to start when it finds a
    different value (`env_digests`, fingerprints only). A key salt made on this node (none
    configured) is passed on: other nodes cannot read its file."""
    settings = Settings(**given)
    absolute = _absolute(settings)
    settings = settings.model_copy(update=absolute)
    plain = {**given, **absolute}
    from_env = [name for name in from_environment(given) if name not in plain]
    if "key_salt" not in given and "key_salt" not in from_env:
        plain["key_salt"] = settings.key_salt
    plain["env_digests"] = {name: digest(getattr(settings, name)) for name in from_env}
    return settings, plain


def adapter_catalog(settings: Settings) -> dict:
    """The LoRA / TI catalog the image deployments get, its cache folder made absolute."""
    from models.adapters import load_adapter_catalog

    catalog = load_adapter_catalog(settings.adapter_catalog_path)
    return catalog.model_copy(update={"cache_dir": str(Path(catalog.cache_dir).resolve())}
                              ).model_dump(mode="json")


def postprocessors(settings: Settings, catalog) -> list[dict]:
    """The post-processors the cluster serves (Catalog.served_postprocessors)."""
    return [e.model_dump(mode="json") for e in catalog.served_postprocessors(settings.postprocessor_weights)]


def alchemy_models(settings: Settings, catalog) -> list[dict]:
    """Caption, interrogation and the NSFW classifier (Catalog.served_alchemy)."""
    return [e.model_dump(mode="json") for e in catalog.served_alchemy(settings.alchemy_weights)]


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
    from deployments.alchemy import AlchemyDeployment
    from deployments.postprocess import PostProcessDeployment

    app_args = AppArgs.model_validate(args or {})
    settings, plain = replica_settings(app_args.settings)
    upgrade(get_database(settings.database_url))
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
    post = postprocessors(settings, catalog)
    clip = alchemy_models(settings, catalog)
    dispatcher = Dispatcher.bind(
        plain, families, poll_seconds=app_args.poll_seconds, volunteers=volunteers,
        postprocess={"handle": PostProcessDeployment.bind(post), "names": [e["name"] for e in post]},
        alchemy={"handle": AlchemyDeployment.bind(clip, settings.nsfw_strictness), "forms": [e["name"] for e in clip],
                 "max_in_flight": app_args.alchemy_max_in_flight})
    return ApiIngress.bind(plain, dispatcher)
