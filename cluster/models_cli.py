"""`rayhorde models`: the models this horde knows (the AI Horde's model reference, pinned in
models/reference/data), serves (the catalog, `configs/models.yaml`, as `served_models`
selects) and has pulled (weights downloaded by `pull`).

    rayhorde models list [--type image|text] [--served] [--pulled] [--search TEXT] [--json]
    rayhorde models pull NAME [--reference] [--dir DIR]
    rayhorde models refresh [--dest DIR]

`pull` downloads what the cluster loads for a model of the catalog (its Hugging Face
repositories, into the Hugging Face cache where `from_pretrained` finds them), or the files
the reference lists for any other known model (into `models_dir`/NAME, each checked against
the reference's SHA256); `--reference` takes the reference's files for a catalog model too.
Interrupted downloads resume when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.settings import Settings
from models.catalog import Catalog, ModelEntry, load_catalog
from models.reference import ModelReference, ReferenceError, ReferenceModel, load_reference
from models.reference.download import (
    PullError,
    download_hub_file,
    download_hub_repo,
    download_url,
    hub_errors,
)

MARKER = "rayhorde-pull.json"  # written in a model's folder once all of it is downloaded
# What a text model's repository needs for transformers (not the same weights again as
# PyTorch .bin files, GGUF quantisations and the like).
TEXT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def folder_name(name: str) -> str:
    """A model's folder under `models_dir`: its name with anything but letters, digits, dots,
    dashes and underscores made an underscore."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def pulled_models(models_dir: Path) -> dict[str, dict]:
    """The models whose pull finished, by name: their folders' markers."""
    out = {}
    if models_dir.is_dir():
        for marker in sorted(models_dir.glob(f"*/{MARKER}")):
            try:
                record = json.loads(marker.read_text())
                out[record["name"]] = record
            except (ValueError, KeyError, TypeError):
                continue
    return out


class ModelSettings(BaseSettings):
    """The settings this command reads (api/settings.py's, from the same RAYHORDE_* variables),
    without the rest: listing and pulling models needs no database and no secret."""

    model_config = SettingsConfigDict(env_prefix="RAYHORDE_", extra="ignore")

    catalog_path: str = Settings.model_fields["catalog_path"].default
    served_models: list[str] = Field(default_factory=list)
    models_dir: str = Settings.model_fields["models_dir"].default


def settings_of(args: argparse.Namespace) -> ModelSettings:
    """The settings, with a Serve config's application settings over them when `--config`
    names one (what that cluster serves)."""
    if not getattr(args, "config", None):
        return ModelSettings()
    from cluster.deploy import APP_NAME, load_config

    app = next(a for a in load_config(args.config)["applications"] if a["name"] == APP_NAME)
    return ModelSettings(**app.get("args", {}).get("settings", {}))


def served_catalog(settings: ModelSettings, catalog: Catalog) -> Catalog:
    return catalog.select(settings.served_models) if settings.served_models else catalog


def rows(reference: ModelReference, catalog: Catalog, served: Catalog, pulled: dict) -> list[dict]:
    """One row per model known, in the catalog, or pulled: name, type, baseline, whether the
    reference knows it, the cluster serves it, it was pulled; NSFW, inpainting, size."""
    out: dict[str, dict] = {}
    for kind, models in (("image", reference.image), ("text", reference.text)):
        for m in models.values():
            out[m.name] = {"name": m.name, "type": kind, "baseline": m.baseline, "known": True,
                           "served": False, "pulled": False, "nsfw": m.nsfw,
                           "inpainting": m.inpainting, "size_on_disk_bytes": m.size_on_disk_bytes}
    for entry in catalog.models:
        row = out.setdefault(entry.name, {
            "name": entry.name, "type": entry.family.kind, "baseline": entry.family.value,
            "known": False, "served": False, "pulled": False, "nsfw": entry.nsfw,
            "inpainting": entry.inpainting, "size_on_disk_bytes": None})
        row["served"] = served.get(entry.name) is not None
    for name, record in pulled.items():
        if name in out:
            out[name]["pulled"] = True
    return sorted(out.values(), key=lambda r: (r["type"], r["name"].lower()))


def list_models(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    catalog = load_catalog(settings.catalog_path)
    table = rows(load_reference(args.reference_dir), catalog, served_catalog(settings, catalog),
                 pulled_models(Path(args.dir or settings.models_dir)))
    if args.type:
        table = [r for r in table if r["type"] == args.type]
    if args.served:
        table = [r for r in table if r["served"]]
    if args.pulled:
        table = [r for r in table if r["pulled"]]
    if args.search:
        table = [r for r in table if args.search.lower() in r["name"].lower()]
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    width = min(max((len(r["name"]) for r in table), default=4), 60)
    print(f"{'NAME':<{width}}  TYPE   {'BASELINE':<20}  KNOWN  SERVED  PULLED  {'SIZE':>8}")
    for r in table:
        size = _size(r["size_on_disk_bytes"])
        print(f"{r['name'][:width]:<{width}}  {r['type']:<5}  {r['baseline'][:20]:<20}  "
              f"{_yes(r['known']):<5}  {_yes(r['served']):<6}  {_yes(r['pulled']):<6}  {size:>8}")
    counts = {k: sum(r[k] for r in table) for k in ("known", "served", "pulled")}
    print(f"{len(table)} models: {counts['known']} known to the AI Horde's model reference, "
          f"{counts['served']} served here, {counts['pulled']} pulled")
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _size(n: int | None) -> str:
    if not n:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def pull_reference(model: ReferenceModel, folder: Path) -> list[dict]:
    """The reference's files of `model` into `folder`: Hugging Face files through
    huggingface_hub, anything else by URL; each checked against the reference's SHA256."""
    files = []
    if model.type == "text":
        repo = model.hub_repo
        if repo is None:
            raise PullError(f"{model.name}: the model reference gives no Hugging Face repository "
                            "for it")
        download_hub_repo(repo, folder, TEXT_PATTERNS)
        return [{"path": str(p.relative_to(folder)), "sha256": None}
                for p in sorted(folder.rglob("*")) if p.is_file() and ".cache" not in p.parts
                and p.name != MARKER]
    if not model.downloads:
        raise PullError(f"{model.name}: the model reference lists no downloads for it")
    for source in model.downloads:
        dest = folder / source.relative_path
        sha256 = model.sha256_of(source.relative_path)
        hub = source.hub_file
        if hub is not None:
            download_hub_file(hub.repo_id, hub.filename, hub.revision, dest, sha256)
        else:
            download_url(source.url, dest, sha256)
        files.append({"path": source.relative_path, "sha256": sha256, "url": source.url})
    return files


def pull_catalog(entry: ModelEntry) -> list[dict]:
    """What the cluster loads for a catalog model, into the Hugging Face cache (where its
    deployments' `from_pretrained` look): the pipeline's files for the weights' variant, the
    decoder's for Stable Cascade, a text model's weights and tokenizer, the Layer Diffuse files.
    Built-in and local weights have nothing to download."""
    w = entry.weights
    if w.kind != "pretrained" or Path(w.path).exists():
        return []
    out = []
    for repo in (w.path, w.decoder_path):
        if repo is None:
            continue
        if entry.family.kind == "text":
            path = download_hub_repo(repo, None, TEXT_PATTERNS)
        else:
            from diffusers import DiffusionPipeline

            with hub_errors(repo):
                path = Path(DiffusionPipeline.download(repo, variant=w.variant))
        out.append({"repo": repo, "path": str(path)})
    ld = entry.layer_diffuse
    if ld is not None and ld.kind == "huggingface":
        from huggingface_hub import hf_hub_download

        for filename in (ld.injection, ld.decoder):
            with hub_errors(f"{ld.repo}/{filename}"):
                out.append({"repo": ld.repo, "path": hf_hub_download(ld.repo, filename)})
    return out


def pull(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    models_dir = Path(args.dir or settings.models_dir)
    catalog = load_catalog(settings.catalog_path)
    entry, known = catalog.get(args.name), load_reference(args.reference_dir).get(args.name)
    folder = models_dir / folder_name(args.name)
    marker = folder / MARKER
    if marker.exists() and args.name not in pulled_models(models_dir):
        raise PullError(f"{folder} holds another model; pull {args.name} with --dir elsewhere")
    if entry is not None and not args.reference:
        files, source = pull_catalog(entry), "catalog"
        if not files:
            print(f"{args.name}: its weights are {entry.weights.kind} ({entry.weights.path}); "
                  "nothing to download")
            return 0
    elif known is not None:
        files, source = pull_reference(known, folder), "reference"
    else:
        raise PullError(f"{args.name}: neither in the catalog ({settings.catalog_path}) nor in "
                        "the AI Horde's model reference (see `rayhorde models list --search`)")
    folder.mkdir(parents=True, exist_ok=True)
    record = {"name": args.name, "type": (known.type if known else entry.family.kind),
              "source": source, "files": files,
              "pulled": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    marker.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.name}: pulled {len(files)} file{'s' if len(files) != 1 else ''} "
          f"({source}) into {folder if source == 'reference' else 'the Hugging Face cache'}")
    return 0


def refresh(args: argparse.Namespace) -> int:
    from models.reference.refresh import refresh as refresh_reference

    urls = {k: v for k, v in (("image", args.image_url), ("text", args.text_url)) if v}
    try:
        manifest = refresh_reference(args.dest, urls)
    except ReferenceError as e:
        print(f"rayhorde models refresh: {e}; the pinned copy in {args.dest} is unchanged",
              file=sys.stderr)
        return 1
    for kind in ("image", "text"):
        m = manifest[kind]
        print(f"{kind}: {m['models']} models from {m['url']} (sha256 {m['sha256'][:12]})")
    return 0


def add_parser(subparsers) -> None:
    from models.reference import DATA_DIR

    p = subparsers.add_parser("models", help="the models this horde knows, serves and has pulled")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="known, served and pulled models (a table, or --json)")
    ls.add_argument("--type", choices=["image", "text"])
    ls.add_argument("--served", action="store_true", help="only models this cluster serves")
    ls.add_argument("--pulled", action="store_true", help="only models pulled")
    ls.add_argument("--search", help="only names containing this (any case)")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--dir", help="the models folder (default: the models_dir setting)")
    ls.add_argument("--config", help="a Serve config: served means served by it")
    ls.add_argument("--reference-dir", help="a refreshed reference (default: the pinned copy)")
    ls.set_defaults(func=list_models)
    pl = sub.add_parser("pull", help="download a model's weights (resumes; checks SHA256)")
    pl.add_argument("name")
    pl.add_argument("--reference", action="store_true",
                    help="the model reference's files even for a model of the catalog")
    pl.add_argument("--dir", help="the models folder (default: the models_dir setting)")
    pl.add_argument("--config", help="a Serve config whose settings (catalog) to use")
    pl.add_argument("--reference-dir", help="a refreshed reference (default: the pinned copy)")
    pl.set_defaults(func=pull_main)
    rf = sub.add_parser("refresh", help="download the AI Horde's model reference again")
    rf.add_argument("--dest", default=str(DATA_DIR), help="default: the pinned copy")
    rf.add_argument("--image-url", help="instead of the published stable_diffusion.json")
    rf.add_argument("--text-url", help="instead of the published db.json")
    rf.set_defaults(func=refresh)


def pull_main(args: argparse.Namespace) -> int:
    try:
        return pull(args)
    except PullError as e:
        print(f"rayhorde models pull: {e}", file=sys.stderr)
        return 1
