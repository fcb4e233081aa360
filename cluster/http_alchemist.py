"""What `rayhorde worker` (cluster/http_worker.py) runs besides generating: post-processing and
NSFW censoring of its images, and alchemy forms popped from the API. The same deployments and
graph as the cluster's dispatcher (cluster/dispatcher.py, cluster/alchemy_runner.py):

- post-processing: deployments/postprocess.py's PostProcessDeployment, through the graph of
  deployments/workflows/post_processing.py (face fixers, upscaler, strip_background);
- censoring: deployments/alchemy.py's AlchemyDeployment `nsfw` on the finished images, when the
  pop's payload says `use_nsfw_censor` or the worker is SFW; a flagged image is submitted as
  `censored` and never uploaded (the API shows its placeholder);
- alchemy (`--alchemy FORM ...`): its own worker record, NAME-alchemy, popping

    POST /api/v2/interrogate/pop     -> caption / interrogation / nsfw on the alchemy deployment,
                                        post-processors on the post-processing one (PUT the WebP
                                        to the form's r2_upload)
                                     -> POST /api/v2/interrogate/submit {id, result, state}

The worker's HTTP plumbing (retries, uploads, submits) is HttpWorker's; this module only adds
what these jobs need of it.
"""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from api.alchemy.protocol import CLIP_FORMS, FORM_TTL, FORMS, TILE
from models.alchemy.registry import AlchemyModelEntry
from models.catalog import Catalog
from models.postprocess.registry import POST_PROCESSORS, PostProcessorEntry

if TYPE_CHECKING:
    from cluster.http_worker import HttpWorker, WorkerConfig

WEIGHTS = ("builtin", "catalog")
CENSORSHIP = {"type": "censorship", "value": "nsfw"}
INTERROGATION_TOP_K = 5


def config_problem(config: WorkerConfig) -> str | None:
    """What is wrong with the extras' options on their own (before the catalog is read)."""
    for option, value in (("--postprocessor-weights", config.postprocessor_weights),
                          ("--alchemy-weights", config.alchemy_weights)):
        if value not in WEIGHTS:
            return f"{option}: builtin or catalog, got {value!r}"
    if not -1.0 <= config.nsfw_strictness <= 1.0:
        return f"--nsfw-strictness: -1 to 1, got {config.nsfw_strictness:g}"
    unknown = [f for f in config.alchemy if f not in FORMS]
    if unknown:
        return f"--alchemy: no such form: {', '.join(unknown)} (forms: {', '.join(FORMS)})"
    if not config.post_processing:
        asked = [f for f in config.alchemy if f in POST_PROCESSORS]
        if asked:
            return (f"--alchemy: {', '.join(asked)}: post-processors run on the post-processing "
                    "deployment, which --no-post-processing turns off")
    return None


@dataclass(frozen=True)
class Extras:
    """The extra deployments a worker runs and what each serves."""

    postprocessors: list[PostProcessorEntry]  # [] = no post-processing deployment
    alchemy: list[AlchemyModelEntry]  # [] = no alchemy deployment
    forms: list[str] = field(default_factory=list)  # --alchemy: what the alchemy pops ask for

    @property
    def postprocessor_names(self) -> list[str]:
        return [e.name for e in self.postprocessors]


def plan(config: WorkerConfig, catalog: Catalog, serves_images: bool) -> Extras:
    """The extras `config` asks for, from the catalog's entries (`--*-weights catalog`) or the
    builtin ones. An image worker always deploys the NSFW checker: a pop may ask for
    `use_nsfw_censor` at any time, and an SFW worker checks every image."""
    from cluster.http_worker import WorkerConfigError  # that module imports this one

    forms = list(dict.fromkeys(config.alchemy))
    wants_post = serves_images or any(f in POST_PROCESSORS for f in forms)
    postprocessors = (catalog.served_postprocessors(config.postprocessor_weights)
                      if config.post_processing and wants_post else [])
    have_post = {e.name for e in postprocessors}
    available = {e.name: e for e in catalog.served_alchemy(config.alchemy_weights)}
    missing = [f for f in forms if f not in have_post and f not in available]
    if missing:
        raise WorkerConfigError(
            f"--alchemy: {', '.join(missing)} not in the catalog {config.catalog_path} "
            "(with --postprocessor-weights / --alchemy-weights catalog, only the entries of its "
            "postprocessors / alchemy lists are served)")
    needed = [f for f in CLIP_FORMS if f in forms or (f == "nsfw" and serves_images)]
    if "nsfw" in needed and "nsfw" not in available:
        raise WorkerConfigError(f"--alchemy-weights catalog: the catalog {config.catalog_path} "
                                "names no nsfw model, which censoring images needs")
    return Extras(postprocessors=postprocessors, alchemy=[available[f] for f in needed],
                  forms=forms)


def deployments(extras: Extras, nsfw_strictness: float) -> list[tuple[str, Any, tuple]]:
    """(name, deployment class, constructor arguments) of each extra deployment to run."""
    out: list[tuple[str, Any, tuple]] = []
    if extras.postprocessors:
        from deployments.postprocess import PostProcessDeployment

        out.append(("postprocess", PostProcessDeployment,
                    ([e.model_dump(mode="json") for e in extras.postprocessors],)))
    if extras.alchemy:
        from deployments.alchemy import AlchemyDeployment

        out.append(("alchemy", AlchemyDeployment,
                    ([e.model_dump(mode="json") for e in extras.alchemy], nsfw_strictness)))
    return out


def warm_up_calls(extras: Extras, handles: dict[str, Any]) -> dict[str, Any]:
    """Load the NSFW checker and every form --alchemy asks for now, on a small grey image
    (the post-processors that image jobs ask for load on their first use, in seconds)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, format="PNG")
    image = buf.getvalue()
    calls = {}
    alchemy, postprocess = handles.get("alchemy"), handles.get("postprocess")
    for entry in extras.alchemy:
        if entry.name == "nsfw":
            calls["nsfw"] = alchemy.nsfw.remote([image])
        elif entry.name == "caption":
            calls["caption"] = alchemy.caption.remote(image)
        else:
            calls["interrogation"] = alchemy.interrogate.remote(image, INTERROGATION_TOP_K)
    for name in extras.forms:
        if name in POST_PROCESSORS:
            calls[name] = postprocess.options(multiplexed_model_id=name).process.remote(
                name, image, 1.0)
    return calls


# ---------------------------------------------------------------------------------- images


def censors(payload: dict, worker_nsfw: bool) -> bool:
    """Whether a job's images are checked: the requester asked, or this worker is SFW."""
    return bool(payload.get("use_nsfw_censor")) or not worker_nsfw


def finish_images(worker: HttpWorker, job, engine_job, result: dict) -> dict:
    """After the generation, as the dispatcher does it: the post-processing graph, then the
    NSFW check (`result["nsfw"]`, a flag per image, when the job is censored)."""
    if engine_job.post_processing:
        from deployments.workflows import post_processing

        left = max(1.0, job.deadline - time.monotonic())
        images, timings = asyncio.run(asyncio.wait_for(post_processing.run(
            list(result["images"]), list(engine_job.post_processing),
            engine_job.facefixer_strength, worker.extra_handles["postprocess"]), left))
        result = {**result, "images": images, "post_processing_timings": timings}
    if censors(job.payload, worker.config.nsfw):
        flags = worker.extra_handles["alchemy"].nsfw.remote(list(result["images"])).result(
            timeout_s=max(1.0, job.deadline - time.monotonic()))
        result = {**result, "nsfw": [bool(f) for f in flags]}
    return result


def censored_submission(seed: int, notes: list[dict]) -> dict:
    """A flagged image's submit: nothing uploaded; the API stores its placeholder."""
    return {"state": "censored", "censored": True, "generation": "", "seed": seed,
            "gen_metadata": [*notes, CENSORSHIP]}


# ---------------------------------------------------------------------------------- alchemy


def max_tiles(max_pixels: int) -> int:
    """The largest source a post-processor form may bring, in 512x512 tiles: --max-pixels."""
    return max(1, min(256, -(-max_pixels // TILE)))


@dataclass
class FormJob:
    """One popped alchemy form (the pop asks for one at a time)."""

    id: str
    form: str
    source_image: str | None
    r2_upload: str | None = None
    payload: dict | None = None
    ttl: float = FORM_TTL
    popped_at: float = field(default_factory=time.monotonic)
    kind: str = "alchemy"

    @property
    def model(self) -> str:  # what HttpWorker's messages call the job
        return self.form

    @property
    def ids(self) -> list[str]:
        return [self.id]

    @property
    def deadline(self) -> float:
        return self.popped_at + self.ttl


def pop_body(worker: HttpWorker, bridge_agent: str) -> dict:
    c = worker.config
    return {"name": worker.alchemy_worker_name, "forms": worker.extras.forms, "amount": 1,
            "threads": c.threads, "bridge_agent": bridge_agent,
            "max_tiles": max_tiles(c.max_pixels)}


def form_jobs(answer: dict) -> list[FormJob]:
    return [FormJob(id=f["id"], form=f["form"], source_image=f.get("source_image"),
                    r2_upload=f.get("r2_upload"), payload=f.get("payload"))
            for f in answer.get("forms") or []]


def run_form(worker: HttpWorker, job: FormJob) -> dict:
    """The form's submit: {"result": ..., "state": "ok"}, or faulted when the result could not
    be uploaded. Raises on any other failure."""
    source = worker._download(job.source_image, "source_image")
    if source is None:
        raise ValueError("the form came without a source_image")
    timeout = max(1.0, job.deadline - time.monotonic())
    alchemy = worker.extra_handles.get("alchemy")
    postprocess = worker.extra_handles.get("postprocess")
    if job.form == "caption":
        return {"result": {"caption": alchemy.caption.remote(source).result(timeout_s=timeout)},
                "state": "ok"}
    if job.form == "interrogation":
        details = alchemy.interrogate.remote(source, INTERROGATION_TOP_K).result(timeout_s=timeout)
        return {"result": {"interrogation": details}, "state": "ok"}
    if job.form == "nsfw":
        (flag,) = alchemy.nsfw.remote([source]).result(timeout_s=timeout)
        return {"result": {"nsfw": bool(flag)}, "state": "ok"}
    if job.form not in POST_PROCESSORS or postprocess is None:
        raise ValueError(f"form {job.form!r} is not run by this worker")
    if not job.r2_upload:
        raise ValueError(f"{job.form}: the form came without an r2_upload URL")
    image = postprocess.options(multiplexed_model_id=job.form).process.remote(
        job.form, source, 1.0).result(timeout_s=timeout)
    with httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0)) as uploader:
        if worker._upload(uploader, job, job.r2_upload, image):
            return {"result": "R2", "state": "ok"}
    return {"result": {}, "state": "faulted"}


def run_and_submit(worker: HttpWorker, client: httpx.Client, job: FormJob) -> None:
    """Run one popped form and submit it; a failure is submitted as faulted, which hands the
    form back to the queue."""
    started = time.monotonic()
    try:
        submission = run_form(worker, job)
    except Exception as e:  # noqa: BLE001 - any failure hands the form back to the queue
        worker.say(f"alchemy form {job.form} {job.id[:8]} faulted: {type(e).__name__}: "
                   f"{str(e)[:500]}")
        submission = {"result": {}, "state": "faulted"}
    earned = worker._submit(client, job, job.id, submission)
    ok = submission["state"] == "ok" and earned is not None
    with worker.stats.lock:
        if ok:
            worker.stats.forms_done += 1
            worker.stats.kudos_earned += earned
        elif submission["state"] == "faulted":
            worker.stats.forms_faulted += 1
        done, kudos = worker.stats.forms_done, worker.stats.kudos_earned
    if ok:
        worker.say(f"alchemy form {job.form} {job.id[:8]}: done in "
                   f"{time.monotonic() - started:.1f} s, +{earned:.2f} kudos | total {done} "
                   f"forms, {kudos:.2f} kudos")
