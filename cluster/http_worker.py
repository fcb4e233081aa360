"""`rayhorde worker`: the HTTP bridge for volunteers who do not join the Ray cluster.

It runs the same Serve deployments as the cluster (deployments/sd15.py, sdxl.py, cascade.py,
llm.py) on the volunteer's own machine, in a private local Ray, and speaks the AI Horde worker
protocol to the API:

    POST /api/v2/generate/pop        -> generate -> PUT each WebP to its r2_uploads URL
                                     -> POST /api/v2/generate/submit {id, generation: "R2", seed}
    POST /api/v2/generate/text/pop   -> generate -> POST /api/v2/generate/text/submit

Each of `threads` loops pops, runs the job through the family's deployment handle (model name
as multiplexed model id) and submits, alternating between image and text pops when it serves
both. Connection errors, 5xx and 429 are retried with capped exponential backoff, so the worker
rides out the API restarting; a job that fails or asks for a feature this worker does not run is
submitted as `faulted`, which hands it back to the queue. SIGTERM / SIGINT stop the popping; the
jobs in flight finish and are submitted, then Serve and Ray shut down and the process exits 0.

Image and text jobs go to two worker records (a horde worker serves one type): NAME for images,
and NAME-text for text when the worker serves both (NAME alone when it serves text only).
Post-processing, NSFW censoring and alchemy forms (`--alchemy`, on a third record, NAME-alchemy)
run on the cluster's post-processing and alchemy deployments: cluster/http_alchemist.py.

The API key is never printed, logged or sent anywhere but the API: upload URLs (presigned S3 or
the API's signed ones) get the bytes and no headers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import httpx

from api import sources
from cluster import http_alchemist as alchemist
from deployments import workflows
from deployments.jobs import SEED_SPACE, ImageJob, TextJob
from models.catalog import Catalog, Family, ModelEntry, load_catalog

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = ROOT / "configs" / "models.yaml"
DEFAULT_ADAPTERS = ROOT / "configs" / "adapters.yaml"
BRIDGE_AGENT = "rayhorde-worker:1:https://aihorde.net"
API_KEY_ENV = "RAYHORDE_WORKER_API_KEY"
EXIT_OK, EXIT_CONFIG = 0, 2
# The horde worker defaults, for text models whose catalog entry sets no limit.
DEFAULT_MAX_LENGTH, DEFAULT_MAX_CONTEXT_LENGTH = 512, 2048
# Submits that tell us the job is no longer ours; the loop goes on.
GONE_RCS = ("RequestExpired", "AbortedGen", "DuplicateGen")
SUBMIT_PATHS = {"image": "/api/v2/generate/submit", "text": "/api/v2/generate/text/submit",
                "alchemy": "/api/v2/interrogate/submit"}


class WorkerConfigError(ValueError):
    """A problem the volunteer has to fix (arguments, API key, worker name): exit 2."""


class UnsupportedJob(ValueError):
    """A popped job asks for something this worker does not run: submitted as faulted."""


# ---------------------------------------------------------------------------------- config


def default_worker_name() -> str:
    """Stable across restarts of the same machine, so the horde's worker record (its counters,
    kudos, trust) carries over."""
    return f"rayhorde-{socket.gethostname()}"[:100]


@dataclass
class WorkerConfig:
    url: str  # API root (http://host:8000); a trailing /api or /api/v2 is accepted too
    api_key: str = field(repr=False)
    models: list[str]
    name: str = field(default_factory=default_worker_name)
    max_pixels: int = 1024 * 1024
    threads: int = 1  # jobs in flight at once, one pop loop each
    max_batch: int = 1  # images per job (one pipeline call), or text generations per job
    max_length: int | None = None  # text: None = the smallest limit of the text models' entries
    max_context_length: int | None = None
    nsfw: bool = False
    nsfw_strictness: float = 0.0  # the NSFW checker's adjustment: higher flags more
    post_processing: bool = True  # run the post-processors image jobs ask for
    postprocessor_weights: str = "builtin"  # or "catalog": its postprocessors' weights
    alchemy_weights: str = "builtin"  # or "catalog": its alchemy models' weights
    alchemy: list[str] = field(default_factory=list)  # alchemy forms to pop (api/alchemy)
    catalog_path: str = str(DEFAULT_CATALOG)
    adapter_catalog_path: str = str(DEFAULT_ADAPTERS)  # the LoRAs and TIs it may load
    ray_address: str = "local"  # "local": a fresh private Ray, never one already running here
    num_cpus: float | None = None  # for that local Ray; None = every core
    idle_seconds: float = 1.0  # between empty pops (plus up to half of it as jitter)
    max_backoff_seconds: float = 60.0
    maintenance_retry_seconds: float = 60.0
    verbose: bool = False  # show the Ray replicas' logs on the terminal

    def __post_init__(self) -> None:
        url = self.url.strip().rstrip("/")
        for suffix in ("/api/v2", "/api"):
            url = url.removesuffix(suffix)
        if not url.startswith(("http://", "https://")):
            raise WorkerConfigError(f"--url: must start with http:// or https://, got {self.url!r}")
        self.url = url
        if not self.api_key:
            raise WorkerConfigError(f"--api-key (or ${API_KEY_ENV}): required; workers need a "
                                    "registered user's key")
        if not self.models:
            raise WorkerConfigError("--models: name at least one model")
        if not 1 <= len(self.name) <= 100:
            raise WorkerConfigError("--name: 1 to 100 characters")
        if self.max_pixels < 64 * 64:
            raise WorkerConfigError(f"--max-pixels: at least {64 * 64}")
        # The horde's limits on a pop's `threads` and `amount`.
        if not 1 <= self.threads <= 50:
            raise WorkerConfigError("--threads: 1 to 50")
        if not 1 <= self.max_batch <= 20:
            raise WorkerConfigError("--max-batch: 1 to 20")
        problem = alchemist.config_problem(self)
        if problem:
            raise WorkerConfigError(problem)


@dataclass(frozen=True)
class ModelPlan:
    """Which deployment runs which of the configured models, and the text limits declared."""

    image_entries: dict[Family, list[ModelEntry]]
    text_entries: list[ModelEntry]
    max_length: int
    max_context_length: int

    @property
    def image_models(self) -> list[str]:
        return [e.name for entries in self.image_entries.values() for e in entries]

    @property
    def text_models(self) -> list[str]:
        return [e.name for e in self.text_entries]

    def family_of(self, model: str) -> Family:
        for family, entries in self.image_entries.items():
            if any(e.name == model for e in entries):
                return family
        raise UnsupportedJob(f"model {model!r} is not one this worker serves")


def plan_models(config: WorkerConfig, catalog: Catalog) -> ModelPlan:
    unknown = [m for m in config.models if catalog.get(m) is None]
    if unknown:
        known = ", ".join(m.name for m in catalog.models)
        raise WorkerConfigError(f"--models: not in the catalog {config.catalog_path}: "
                                f"{', '.join(unknown)} (known: {known})")
    image: dict[Family, list[ModelEntry]] = {}
    text: list[ModelEntry] = []
    for name in dict.fromkeys(config.models):  # de-duplicated, in order
        entry = catalog.get(name)
        if entry.family.kind == "text":
            text.append(entry)
        else:
            image.setdefault(entry.family, []).append(entry)
    # One pop declares one limit for all text models: the tightest entry's, unless given.
    max_length = config.max_length or min(
        (e.max_length or DEFAULT_MAX_LENGTH for e in text), default=DEFAULT_MAX_LENGTH)
    max_context = config.max_context_length or min(
        (e.max_context_length or DEFAULT_MAX_CONTEXT_LENGTH for e in text),
        default=DEFAULT_MAX_CONTEXT_LENGTH)
    for e in text:  # declaring more than a model serves would fault every such job
        if e.max_length is not None and max_length > e.max_length:
            raise WorkerConfigError(f"--max-length {max_length}: {e.name} generates at most "
                                    f"{e.max_length} tokens (catalog)")
        if e.max_context_length is not None and max_context > e.max_context_length:
            raise WorkerConfigError(f"--max-context-length {max_context}: {e.name} takes at "
                                    f"most {e.max_context_length} tokens (catalog)")
    if text and max_length >= max_context:
        raise WorkerConfigError(f"--max-length ({max_length}) must be below "
                                f"--max-context-length ({max_context})")
    return ModelPlan(image, text, max_length, max_context)


# ---------------------------------------------------------------------------------- jobs


def image_job(family: Family, model: str, payload: dict, count: int,
              source_processing: str | None = None, source_image: bytes | None = None,
              source_mask: bytes | None = None, extra_sources: list[dict] | None = None,
              post_processors: Collection[str] = ()) -> ImageJob:
    """An image pop's payload (and its downloaded source and mask) as the deployment's job
    (deployments/jobs.py). Post-processors not among `post_processors` (those this worker
    runs) raise UnsupportedJob; a payload that makes no valid job raises JobRejected."""
    refused = [n for n in payload.get("post_processing") or [] if n not in post_processors]
    if refused:
        raise UnsupportedJob(f"post_processing: not run by this worker: {', '.join(refused)}")
    return ImageJob.from_pop(family, model, payload, count, source_processing, source_image,
                             source_mask, extra_sources)


def warm_up_job(entry: ModelEntry) -> ImageJob:
    """One small, one-step job that loads the model: an inpainting model only inpaints, so it
    gets a grey source with its right half to repaint."""
    job = {"model": entry.name, "prompt": "warm-up", "seeds": [0], "width": 256, "height": 256,
           "steps": 1}
    if entry.inpainting:
        import io

        from PIL import Image

        source, mask = Image.new("RGB", (256, 256), (128, 128, 128)), Image.new("L", (256, 256), 0)
        mask.paste(255, (128, 0, 256, 256))
        blobs = []
        for image in (source, mask):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            blobs.append(buf.getvalue())
        job.update(workflow="inpainting", source_image=blobs[0], source_mask=blobs[1])
    return ImageJob.parse(job)


def text_job(model: str, payload: dict) -> TextJob:
    """A text pop's payload as one engine job, its own random seed: the horde's text protocol
    hands workers no seed, and n generations of one prompt must differ."""
    return TextJob.from_pop(model, payload, secrets.randbelow(SEED_SPACE))


@dataclass
class PoppedJob:
    kind: str  # "image" or "text"
    model: str
    ids: list[str]
    payload: dict
    uploads: list[str]  # image only: one upload URL per id
    ttl: float
    source_processing: str | None = None  # image only: the source image and mask URLs
    source_image: str | None = None
    source_mask: str | None = None
    extra_source_images: list[dict] = field(default_factory=list)  # remix: [{image: URL, strength}]
    popped_at: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        """After this the API has handed the job back to the queue; a result is worth nothing."""
        return self.popped_at + self.ttl


@dataclass
class WorkerStats:
    generations_done: int = 0
    generations_faulted: int = 0
    forms_done: int = 0  # alchemy
    forms_faulted: int = 0
    kudos_earned: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


# ---------------------------------------------------------------------------------- HTTP


class FatalApiAnswer(Exception):
    """The API refused the worker for a reason that retrying cannot fix (bad key, name taken)."""


class Backoff:
    """Capped exponential backoff with jitter; a Retry-After from the server is honoured."""

    def __init__(self, cap_seconds: float, base_seconds: float = 1.0):
        self.cap, self.base, self.failures = cap_seconds, base_seconds, 0

    def next_delay(self, retry_after: float | None = None) -> float:
        delay = min(self.cap, self.base * 2 ** self.failures) * random.uniform(0.5, 1.0)
        self.failures += 1
        return max(delay, retry_after or 0.0)


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date, or nothing: our own backoff decides


def error_text(response: httpx.Response) -> tuple[str, str]:
    """(rc, message) of an AI Horde error answer, whatever shape it arrived in."""
    try:
        body = response.json()
    except ValueError:
        return str(response.status_code), response.text[:300]
    if isinstance(body, dict):
        return str(body.get("rc", response.status_code)), str(body.get("message", body))[:500]
    return str(response.status_code), str(body)[:300]


# ---------------------------------------------------------------------------------- worker


class HttpWorker:
    """One volunteer worker. `start()` = `check_api()` (the key, before anything heavy),
    `start_ray()`, `deploy_models()` (deploy, then load every model once); `serve_forever()`
    runs the pop loops until `request_stop()` or a fatal API answer; `shutdown()` removes what
    it deployed and stops its Ray. `stats` holds the running totals; `handles` maps each model
    to its deployment handle."""

    def __init__(self, config: WorkerConfig, out: TextIO | None = None):
        self.config = config
        self.out = out or sys.stdout
        self.catalog = load_catalog(config.catalog_path)
        self.plan = plan_models(config, self.catalog)
        self.stats = WorkerStats()
        self.stop_requested = threading.Event()
        self.fatal_error: str | None = None
        self.handles: dict[str, Any] = {}  # model name -> DeploymentHandle
        self.extras = alchemist.plan(config, self.catalog, bool(self.plan.image_models))
        self.extra_handles: dict[str, Any] = {}  # "postprocess", "alchemy" -> DeploymentHandle
        # Reentrant: the signal handler prints, and may interrupt the main thread mid-print.
        self._print_lock = threading.RLock()
        self._messages_seen: set[str] = set()
        self._ray_started = False
        self._serve_apps: list[str] = []  # what this worker deployed, removed on shutdown
        self.image_worker_name = config.name
        self.text_worker_name = (f"{config.name}-text"[:100] if self.plan.image_models
                                 else config.name)
        self.alchemy_worker_name = f"{config.name}-alchemy"[:100]  # it always serves models too

    # -- output

    def say(self, message: str) -> None:
        with self._print_lock:
            print(f"{time.strftime('%H:%M:%S')} {message}", file=self.out, flush=True)

    # -- lifecycle

    def request_stop(self, reason: str = "stop requested") -> None:
        if not self.stop_requested.is_set():
            self.say(f"{reason}: no new jobs; finishing the ones in flight")
        self.stop_requested.set()

    def start(self) -> None:
        """All of the start-up: `check_api()`, `start_ray()`, `deploy_models()`."""
        self.check_api()
        self.start_ray()
        self.deploy_models()

    def check_api(self) -> None:
        """Check the key before starting anything heavy; waits out an API that is down."""
        user = self._whoami()
        if self.stop_requested.is_set():
            return
        self.say(f"working for {user} on {self.config.url}: "
                 + "; ".join(part for part in (
                     self.plan.image_models and f"image worker {self.image_worker_name!r} "
                     f"({', '.join(self.plan.image_models)}, max {self.config.max_pixels} px)",
                     self.plan.text_models and f"text worker {self.text_worker_name!r} "
                     f"({', '.join(self.plan.text_models)}, max_length {self.plan.max_length}, "
                     f"max_context_length {self.plan.max_context_length})",
                     self.extras.forms and f"alchemy worker {self.alchemy_worker_name!r} "
                     f"({', '.join(self.extras.forms)})") if part))

    def _whoami(self) -> str:
        with self._client() as client:
            r = self._call(client, "GET", "/api/v2/find_user", what="checking the API key",
                           patient=True)
        if r is None:
            return "?"
        if r.status_code != 200:
            rc, message = error_text(r)
            raise WorkerConfigError(
                f"the API refused the API key ({r.status_code} {rc}): {message}")
        body = r.json()
        if body.get("id") == 0:
            raise WorkerConfigError("--api-key: the anonymous key cannot run a worker; "
                                    "use a registered user's key")
        return str(body.get("username"))  # the horde's alias, name#id

    def start_ray(self) -> None:
        # This worker calls its deployments from plain threads and opens no ingress; Serve's
        # throughput-optimized mode (which a cluster machine may have in its environment)
        # would require every handle call to come from an event loop. Read when Serve is
        # imported, so set before.
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "0"
        os.environ.pop("RAY_SERVE_ENABLE_HA_PROXY", None)
        import ray
        from ray import serve

        if self.stop_requested.is_set():
            return
        local = self.config.ray_address == "local"
        self.say("starting a private local Ray" if local
                 else f"joining the Ray cluster at {self.config.ray_address}")
        # address="local" always starts a new Ray (RAY_ADDRESS and running clusters ignored).
        ray.init(address=self.config.ray_address, include_dashboard=False,
                 num_cpus=self.config.num_cpus if local else None,
                 log_to_driver=self.config.verbose, namespace="rayhorde-worker")
        self._ray_started = True
        serve.start(proxy_location="Disabled")  # handles only: no HTTP port opened here

    def deploy_models(self) -> None:
        """Deploy the families the models need, then load every model once."""
        if self.stop_requested.is_set():
            return
        self._deploy()
        if not self.stop_requested.is_set():
            self._warm_up()

    def _deploy(self) -> None:
        import ray
        from ray import serve

        from cluster.app import family_deployments
        from deployments.llm import LLMDeployment

        groups: list[tuple[str, Any, list[ModelEntry]]] = []
        classes = family_deployments()
        for family, entries in self.plan.image_entries.items():
            groups.append((family.value, classes[family], entries))
        if self.plan.text_entries:
            groups.append((Family.llm.value, LLMDeployment, self.plan.text_entries))
        extras = alchemist.deployments(self.extras, self.config.nsfw_strictness)
        # Every deployment gets an equal share of our private Ray's CPUs and GPUs, so all fit
        # at once. On a cluster joined with --ray-address, whose totals are not ours to take:
        # --num-cpus (or 1 CPU) per deployment, and 1 GPU each where it has GPUs.
        resources = ray.cluster_resources()
        if self.config.ray_address == "local":
            cpus = resources.get("CPU", 1.0) / (len(groups) + len(extras))
            gpus = resources.get("GPU", 0.0) / (len(groups) + len(extras))
        else:
            cpus, gpus = (self.config.num_cpus or 1.0), min(1.0, resources.get("GPU", 0.0))
        options: dict[str, float] = {"num_cpus": cpus}
        if gpus:
            options["num_gpus"] = gpus
        for family_name, cls, entries in groups:
            self.say(f"deploying {family_name} ({', '.join(e.name for e in entries)})")
            app_name = f"worker-{family_name}"
            dumped = [e.model_dump(mode="json") for e in entries]
            controlnets = [c.model_dump(mode="json") for c in self.catalog.controlnets
                           if c.family.value == family_name]
            args = (dumped,) if cls is LLMDeployment else (dumped, self._adapters(), controlnets)
            handle = serve.run(cls.options(num_replicas=1, ray_actor_options=options).bind(*args),
                               name=app_name, route_prefix=None)
            self._serve_apps.append(app_name)
            for entry in entries:
                self.handles[entry.name] = handle
        for name, cls, args in extras:
            self.say(f"deploying {name}")
            app_name = f"worker-{name}"
            self.extra_handles[name] = serve.run(
                cls.options(num_replicas=1, ray_actor_options=options).bind(*args),
                name=app_name, route_prefix=None)
            self._serve_apps.append(app_name)

    def _adapters(self) -> dict:
        """The LoRA / TI catalog for the image deployments, its cache folder made absolute
        (the replicas do not share this process's working directory)."""
        from models.adapters import load_adapter_catalog

        catalog = load_adapter_catalog(self.config.adapter_catalog_path)
        return catalog.model_copy(update={"cache_dir": str(Path(catalog.cache_dir).resolve())}
                                  ).model_dump(mode="json")

    def _warm_up(self) -> None:
        """Load every model once now: a first job must not spend its time to live loading."""
        calls = {}
        for entries in self.plan.image_entries.values():
            for entry in entries:
                calls[entry.name] = self._generate(entry.name, warm_up_job(entry))
        for model in self.plan.text_models:
            job = {"model": model, "prompt": "Hello", "seed": 0, "max_length": 1,
                   "max_context_length": 16}
            calls[model] = self._generate(model, job)
        calls.update(alchemist.warm_up_calls(self.extras, self.extra_handles))
        for model, call in calls.items():
            try:
                call.result(timeout_s=1800)
            except Exception as e:  # noqa: BLE001 - a model that cannot run: the volunteer's to fix
                raise WorkerConfigError(f"model {model!r} failed to load or run: {e}") from e
            self.say(f"{model} loaded")

    def _generate(self, model: str, job: dict):
        return self.handles[model].options(multiplexed_model_id=model).generate.remote(job)

    def serve_forever(self, stop_when: Callable[[], bool] | None = None) -> int:
        """Run the pop loops until a stop; returns the exit code (0, or 2 after a fatal API
        answer). `stop_when` is polled a few times a second, for callers that stop on a
        condition rather than a signal."""
        if self.stop_requested.is_set():
            return EXIT_CONFIG if self.fatal_error else EXIT_OK
        loops = [threading.Thread(target=self._loop, args=(i,), name=f"horde-worker-{i}",
                                  daemon=True) for i in range(self.config.threads)]
        for t in loops:
            t.start()
        self.say(f"ready: {self.config.threads} thread(s) popping")
        while any(t.is_alive() for t in loops):
            if stop_when is not None and not self.stop_requested.is_set() and stop_when():
                self.request_stop("stop condition met")
            for t in loops:
                t.join(timeout=0.2)
        s = self.stats
        forms = (f", {s.forms_done} alchemy forms done, {s.forms_faulted} faulted"
                 if self.extras.forms else "")
        self.say(f"stopped: {s.generations_done} generations done, {s.generations_faulted} "
                 f"faulted{forms}, {s.kudos_earned:.2f} kudos earned")
        if self.fatal_error:
            self.say(f"error: {self.fatal_error}")
            return EXIT_CONFIG
        return EXIT_OK

    def shutdown(self) -> None:
        if not self._ray_started:
            return
        import ray
        from ray import serve

        self.say("shutting down Serve and Ray")
        try:
            # Our handles' routers first: each pushes metrics to the controller from Serve's
            # router thread, which outlives Ray in this process; a push after ray.shutdown()
            # makes Ray end the whole process (in tests, the pytest run).
            for handle in {id(h): h for h in (*self.handles.values(),
                                                *self.extra_handles.values())}.values():
                try:
                    handle.shutdown()
                except Exception:  # noqa: BLE001 - a router that never started: nothing to stop
                    pass
            if self.config.ray_address == "local":
                serve.shutdown()  # our own Ray: all of Serve is ours
            else:
                # Someone else's cluster: remove our applications, leave its Serve running.
                for app_name in self._serve_apps:
                    serve.delete(app_name)
        finally:
            _settle_long_polls()
            # Nothing that holds a Ray reference (handles, their routers, object refs) may be
            # freed after ray.shutdown(): freeing it then calls into the shut core worker,
            # and Ray ends the whole process. What is garbage now goes while Ray is up; the
            # handles are kept for the life of the process.
            _KEPT_AFTER_SHUTDOWN.append((self.handles, self.extra_handles))
            self.handles, self.extra_handles = {}, {}
            gc.collect()
            ray.shutdown()
            self._ray_started = False

    # -- the loop

    def _loop(self, index: int) -> None:
        kinds = [k for k, models in (("image", self.plan.image_models),
                                     ("text", self.plan.text_models),
                                     ("alchemy", self.extras.forms)) if models]
        turn = index  # threads start on different kinds, so both kinds get popped at once
        with self._client() as client:
            while not self.stop_requested.is_set():
                try:
                    job = None
                    # Fair alternation: each round starts with the other kind, and an empty
                    # pop of one kind tries the other before sleeping.
                    for i in range(len(kinds)):
                        job = self._pop(client, kinds[(turn + i) % len(kinds)])
                        if job is not None or self.stop_requested.is_set():
                            break
                    turn += 1
                    if job is not None:
                        self._run(client, job)
                    else:
                        idle = self.config.idle_seconds
                        self.stop_requested.wait(idle + random.uniform(0, idle / 2))
                except FatalApiAnswer as e:
                    self.fatal_error = str(e)
                    self.request_stop("the API refused this worker")
                except Exception as e:  # noqa: BLE001 - a bug must not kill the loop silently
                    self.say(f"unexpected error in the worker loop: {type(e).__name__}: {e}")
                    self.stop_requested.wait(self.config.idle_seconds)

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.config.url, timeout=httpx.Timeout(30.0, connect=10.0))

    def _api_headers(self) -> dict[str, str]:
        return {"apikey": self.config.api_key, "Client-Agent": BRIDGE_AGENT}

    def _call(self, client: httpx.Client, method: str, path: str, *, what: str,
              json: dict | None = None, patient: bool = False,
              deadline: float | None = None) -> httpx.Response | None:
        """An API call retried through connection errors, 5xx and 429. `patient` calls (pops)
        retry until a stop is requested; others (submits of finished work, which a stop must
        not drop) until `deadline`. None when it gave up."""
        backoff = Backoff(self.config.max_backoff_seconds)
        while True:
            try:
                r = client.request(method, path, json=json, headers=self._api_headers())
            except httpx.TransportError as e:
                problem, retry_after = f"cannot reach the API ({type(e).__name__})", None
            else:
                if r.status_code != 429 and r.status_code < 500:
                    if backoff.failures:
                        self.say(f"{what}: the API answers again")
                    return r
                rc, message = error_text(r)
                problem = f"API answered {r.status_code} {rc}: {message}"
                retry_after = retry_after_seconds(r)
            delay = backoff.next_delay(retry_after)
            if patient:
                self.say(f"{what}: {problem}; retrying in {delay:.1f} s")
                if self.stop_requested.wait(delay):
                    return None
            else:
                left = (deadline or 0.0) - time.monotonic()
                if left <= 0:
                    self.say(f"{what}: {problem}; giving up (its time to live ran out)")
                    return None
                self.say(f"{what}: {problem}; retrying in {min(delay, left):.1f} s")
                time.sleep(min(delay, left))

    def _pop(self, client: httpx.Client, kind: str) -> PoppedJob | None:
        c = self.config
        if kind == "image":
            path, body = "/api/v2/generate/pop", {
                "name": self.image_worker_name, "models": self.plan.image_models,
                "max_pixels": c.max_pixels, "amount": c.max_batch, "nsfw": c.nsfw,
                "threads": c.threads, "bridge_agent": BRIDGE_AGENT,
                # The workflows of deployments/diffusion and deployments/workflows run here; the
                # others are not asked for.
                "allow_img2img": True, "allow_painting": True,
                "allow_post_processing": bool(self.extras.postprocessors),
                "allow_controlnet": True, "allow_sdxl_controlnet": True, "allow_lora": True}
        elif kind == "alchemy":
            path, body = "/api/v2/interrogate/pop", alchemist.pop_body(self, BRIDGE_AGENT)
        else:
            path, body = "/api/v2/generate/text/pop", {
                "name": self.text_worker_name, "models": self.plan.text_models,
                "max_length": self.plan.max_length,
                "max_context_length": self.plan.max_context_length, "amount": c.max_batch,
                "nsfw": c.nsfw, "threads": c.threads, "bridge_agent": BRIDGE_AGENT}
        while True:
            if self.stop_requested.is_set():
                return None
            r = self._call(client, "POST", path, json=body, what=f"{kind} pop", patient=True)
            if r is None:
                return None
            if r.status_code == 200:
                break
            rc, message = error_text(r)
            if r.status_code == 403 and rc == "MaintenanceMode":
                # The owner can end maintenance (PUT /api/v2/workers/{id}): keep asking, slowly.
                self.say(f"{kind} pop: {message}; asking again in "
                         f"{c.maintenance_retry_seconds:g} s")
                self.stop_requested.wait(c.maintenance_retry_seconds)
                continue
            raise FatalApiAnswer(f"{kind} pop refused ({r.status_code} {rc}): {message}")
        answer = r.json()
        for m in answer.get("messages") or []:
            text = f"{kind} pop: message from the API: {m.get('message')}"
            if text not in self._messages_seen:  # the same note comes with every pop
                self._messages_seen.add(text)
                self.say(text)
        if kind == "alchemy":  # one form a pop
            return next(iter(alchemist.form_jobs(answer)), None)
        ids = answer.get("ids") or []
        if not ids:
            return None
        return PoppedJob(kind=kind, model=answer["model"], ids=list(ids),
                         payload=answer.get("payload") or {},
                         uploads=list(answer.get("r2_uploads") or []),
                         ttl=float(answer.get("ttl") or 150),
                         source_processing=answer.get("source_processing"),
                         source_image=answer.get("source_image"),
                         source_mask=answer.get("source_mask"),
                         extra_source_images=list(answer.get("extra_source_images") or [])[:5])

    def _run(self, client: httpx.Client, job: PoppedJob | alchemist.FormJob) -> None:
        if job.kind == "alchemy":
            alchemist.run_and_submit(self, client, job)
            return
        started = time.monotonic()
        try:
            if job.kind == "image":
                results = self._generate_images(job)
            else:
                results = self._generate_texts(job)
        except Exception as e:  # noqa: BLE001 - any failure hands the job back to the queue
            reason = f"{type(e).__name__}: {e}"
            self.say(f"{job.kind} job {job.model} {short(job.ids)} faulted: {reason[:500]}")
            for gid in job.ids:
                self._submit(client, job, gid, {"state": "faulted", "generation": "Faulted"})
            with self.stats.lock:
                self.stats.generations_faulted += len(job.ids)
            return
        reward, done, faulted = 0.0, 0, 0
        for gid, submission in results:
            earned = self._submit(client, job, gid, submission)
            if submission["state"] in ("ok", "censored") and earned is not None:
                reward, done = reward + earned, done + 1
            elif submission["state"] == "faulted":
                faulted += 1
        with self.stats.lock:
            self.stats.generations_done += done
            self.stats.generations_faulted += faulted
            self.stats.kudos_earned += reward
            total_done, total_kudos = self.stats.generations_done, self.stats.kudos_earned
        extra = f", {faulted} faulted" if faulted else ""
        self.say(f"{job.kind} job {job.model} {short(job.ids)}: {done} done{extra} in "
                 f"{time.monotonic() - started:.1f} s, +{reward:.2f} kudos | total "
                 f"{total_done} generations, {total_kudos:.2f} kudos")

    def _generate_images(self, job: PoppedJob) -> list[tuple[str, dict]]:
        if len(job.uploads) != len(job.ids):
            raise UnsupportedJob(f"{len(job.ids)} ids but {len(job.uploads)} upload URLs")
        family = self.plan.family_of(job.model)
        source = self._download(job.source_image, "source_image")
        mask = self._download(job.source_mask, "source_mask")
        extras = [{"image": self._download(e.get("image"), f"extra_source_images[{i}]"),
                   "strength": e.get("strength", 1.0)} for i, e in enumerate(job.extra_source_images)]
        engine_job = image_job(family, job.model, job.payload, len(job.ids),
                               job.source_processing if source is not None else None, source,
                               mask, extras, self.extras.postprocessor_names)
        timeout = max(1.0, job.deadline - time.monotonic())
        if engine_job.workflow.graph:  # the same Ray task graph the cluster runs
            result = asyncio.run(asyncio.wait_for(workflows.run(
                engine_job, self.handles[job.model], None), timeout))  # builtin annotators
        else:
            result = self._generate(job.model, engine_job).result(timeout_s=timeout)
        result = alchemist.finish_images(self, job, engine_job, result)  # post-process, censor
        submissions = []
        metadata = result.get("metadata") or [[] for _ in job.ids]  # the graphs' notes per image
        flagged = result.get("nsfw") or [False for _ in job.ids]
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0)) as uploader:
            for gid, url, image, seed, notes, nsfw in zip(
                    job.ids, job.uploads, result["images"], result["seeds"], metadata, flagged,
                    strict=True):
                if nsfw:  # never uploaded
                    submissions.append((gid, alchemist.censored_submission(seed, notes)))
                elif self._upload(uploader, job, url, image):
                    submissions.append((gid, {"state": "ok", "generation": "R2", "seed": seed,
                                              "gen_metadata": notes}))
                else:
                    submissions.append((gid, {"state": "faulted", "generation": "Faulted",
                                              "seed": seed}))
        return submissions

    def _download(self, url: str | None, field: str) -> bytes | None:
        """A job's source image or mask. Fetched with the API's own limits: URLs on the API's
        host may be private (a horde on this network); any other must be public, so a horde
        cannot point this worker at the volunteer's own network."""
        if not url:
            return None
        own_host = httpx.URL(url).host == httpx.URL(self.config.url).host
        limits = sources.SourceLimits(allow_private_urls=own_host)
        return sources.fetch_url(url, field, limits)

    def _upload(self, uploader: httpx.Client, job: PoppedJob, url: str, image: bytes) -> bool:
        """PUT the WebP to its presigned URL: the raw bytes, no API key (the URL may be a
        third party's object store). Retried like API calls until the job's deadline."""
        backoff = Backoff(self.config.max_backoff_seconds)
        while True:
            try:
                r = uploader.put(url, content=image)
                if r.status_code == 200:
                    return True
                problem = f"upload answered {r.status_code} {error_text(r)[1][:200]}"
                if r.status_code < 500 and r.status_code != 429:
                    self.say(f"{job.model}: {problem}")
                    return False
            except httpx.TransportError as e:
                problem = f"upload failed ({type(e).__name__})"
            left = job.deadline - time.monotonic()
            if left <= 0:
                self.say(f"{job.model}: {problem}; giving up (its time to live ran out)")
                return False
            delay = min(backoff.next_delay(), left)
            self.say(f"{job.model}: {problem}; retrying in {delay:.1f} s")
            time.sleep(delay)

    def _generate_texts(self, job: PoppedJob) -> list[tuple[str, dict]]:
        # All calls go out before any result is awaited, so the deployment batches them.
        calls = [(gid, self._generate(job.model, text_job(job.model, job.payload)))
                 for gid in job.ids]
        submissions = []
        for gid, call in calls:
            result = call.result(timeout_s=max(1.0, job.deadline - time.monotonic()))
            submissions.append((gid, {"state": "ok", "generation": result["text"]}))
        return submissions

    def _submit(self, client: httpx.Client, job: PoppedJob, gid: str,
                submission: dict) -> float | None:
        """The reward, or None when the API did not take the result."""
        path = SUBMIT_PATHS[job.kind]
        # Finished work is worth submitting through an API restart, as long as the job is ours.
        r = self._call(client, "POST", path, json={"id": gid, **submission},
                       what=f"submit {gid[:8]}", deadline=job.deadline + 30)
        if r is None:
            return None
        if r.status_code == 200:
            return float(r.json().get("reward", 0.0))
        rc, message = error_text(r)
        if rc in GONE_RCS:
            self.say(f"submit {gid[:8]}: not taken ({rc}): {message}")
        else:
            self.say(f"submit {gid[:8]}: refused ({r.status_code} {rc}): {message}")
        return None


# Ray references kept past ray.shutdown() (see HttpWorker.shutdown).
_KEPT_AFTER_SHUTDOWN: list = []


def _settle_long_polls(timeout_s: float = 5.0) -> None:
    """Stop Serve's long-poll clients in this process, and let the last calls of this Ray
    session's end, before Ray goes. They poll the controller from Serve's router thread and
    stay after ray.shutdown() (Serve caches its shared client per controller for the life of
    the process, which also keeps them from being freed after it): a poll sent or answered
    after it, or a stale client polling in the next session, makes Ray end the whole process.
    Serve has no public call for this (its own tests start a process per cluster), hence the
    search. Never raises."""
    import ray
    from ray.serve._private.long_poll import LongPollClient
    try:
        clients = [o for o in gc.get_objects() if isinstance(o, LongPollClient)]
        for client in clients:
            client.stop()  # no further poll, from this session's clients or older ones
        deadline = time.monotonic() + timeout_s
        for client in clients:
            ref = getattr(client, "_current_ref", None)
            if ref is None:
                continue
            try:
                ray.cancel(ref)
                ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - a call of an earlier session, or done already
                pass
    except Exception:  # noqa: BLE001 - Serve's internals moved: shut down as before
        pass


def short(ids: list[str]) -> str:
    return "[" + ", ".join(i[:8] for i in ids) + "]"


# ---------------------------------------------------------------------------------- running


def run_worker(config: WorkerConfig, stop_when: Callable[[], bool] | None = None,
               out: TextIO | None = None) -> int:
    """The whole life of a worker; returns the process exit code. SIGTERM and SIGINT (when
    called from the main thread) stop it gracefully; a second one only repeats that in-flight
    jobs are being finished."""
    out = out or sys.stdout
    try:
        worker = HttpWorker(config, out=out)
    except WorkerConfigError as e:
        print(f"rayhorde worker: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    previous: dict[int, Any] = {}

    def on_signal(signum, _frame):
        if worker.stop_requested.is_set():
            worker.say("still finishing the jobs in flight (each ends by its time to live)")
        worker.request_stop(f"received {signal.Signals(signum).name}")

    def install_handlers() -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous.setdefault(sig, signal.getsignal(sig))
                signal.signal(sig, on_signal)

    try:
        install_handlers()
        worker.check_api()
        try:
            worker.start_ray()
        finally:
            install_handlers()  # ray.init installs its own SIGTERM handler (exit at once)
        worker.deploy_models()
        return worker.serve_forever(stop_when)
    except WorkerConfigError as e:
        print(f"rayhorde worker: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        worker.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `worker` on the `rayhorde` command line (cluster/cli.py)."""
    p = subparsers.add_parser(
        "worker", help="serve a horde over HTTP with local models (a volunteer worker)",
        description="Pop jobs from a rayhorde (or AI Horde) API, run them on this machine's own "
                    "Ray, upload and submit the results. Stop with Ctrl-C or SIGTERM: jobs in "
                    "flight are finished first.")
    p.add_argument("--url", required=True, help="API root, e.g. http://host:8000")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"a registered user's API key (default: ${API_KEY_ENV}, which keeps it "
                        "out of the process list)")
    p.add_argument("--models", required=True,
                   help="comma-separated catalog names, image and text alike")
    p.add_argument("--name", default=default_worker_name(),
                   help="worker name (default: rayhorde-HOSTNAME); text uses NAME-text when "
                        "serving both kinds")
    p.add_argument("--max-pixels", type=int, default=1024 * 1024,
                   help="largest width*height to accept (default 1048576)")
    p.add_argument("--threads", type=int, default=1, help="jobs in flight at once (default 1)")
    p.add_argument("--max-batch", type=int, default=1,
                   help="images (or texts) per job, made in one call (default 1)")
    p.add_argument("--max-length", type=int, default=None,
                   help="text: most tokens to generate (default: the models' catalog limit)")
    p.add_argument("--max-context-length", type=int, default=None,
                   help="text: longest prompt + generation (default: the models' catalog limit)")
    p.add_argument("--nsfw", action="store_true",
                   help="accept NSFW requests (without it, every image is checked and a flagged "
                        "one is censored)")
    p.add_argument("--nsfw-strictness", type=float, default=0.0,
                   help="added to the NSFW checker's scores, -1 to 1: higher censors more "
                        "(default 0)")
    p.add_argument("--no-post-processing", dest="post_processing", action="store_false",
                   help="take no jobs that ask for post-processing (face fixers, upscalers, "
                        "strip_background)")
    p.add_argument("--postprocessor-weights", choices=alchemist.WEIGHTS, default="builtin",
                   help="the post-processors' weights: builtin (tiny random ones, for trying "
                        "things out) or those the catalog's postprocessors name")
    p.add_argument("--alchemy-weights", choices=alchemist.WEIGHTS, default="builtin",
                   help="caption, interrogation and NSFW models: builtin or the catalog's")
    p.add_argument("--alchemy", nargs="+", default=[], metavar="FORM",
                   help="also serve these alchemy forms (caption, interrogation, nsfw, or a "
                        "post-processor's name) as the worker NAME-alchemy")
    p.add_argument("--catalog", default=str(DEFAULT_CATALOG), help="model catalog (YAML)")
    p.add_argument("--adapters", default=str(DEFAULT_ADAPTERS),
                   help="LoRA / textual inversion catalog (YAML); its allow_downloads lets this "
                        "worker fetch others from CivitAI")
    p.add_argument("--ray-address", default="local",
                   help="'local' (default): start a private Ray; or an existing cluster's address")
    p.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs for the local Ray (default: all)")
    p.add_argument("--max-backoff", type=float, default=60.0,
                   help="longest wait between retries when the API is unreachable (seconds)")
    p.add_argument("--verbose", action="store_true", help="show the model replicas' logs")
    p.set_defaults(func=worker_command)
    return p


def worker_command(args: argparse.Namespace) -> int:
    # Read once (argparse took it as --api-key's default); Ray's processes, started from this
    # one, need not inherit the key.
    os.environ.pop(API_KEY_ENV, None)
    try:
        config = WorkerConfig(
            url=args.url, api_key=args.api_key or "",
            models=[m.strip() for m in args.models.split(",") if m.strip()], name=args.name,
            max_pixels=args.max_pixels, threads=args.threads, max_batch=args.max_batch,
            max_length=args.max_length, max_context_length=args.max_context_length,
            nsfw=args.nsfw, nsfw_strictness=args.nsfw_strictness,
            post_processing=args.post_processing,
            postprocessor_weights=args.postprocessor_weights,
            alchemy_weights=args.alchemy_weights,
            alchemy=[f.strip() for a in args.alchemy for f in a.split(",") if f.strip()],
            catalog_path=args.catalog, adapter_catalog_path=args.adapters,
            ray_address=args.ray_address,
            num_cpus=args.num_cpus, max_backoff_seconds=args.max_backoff, verbose=args.verbose)
    except WorkerConfigError as e:
        print(f"rayhorde worker: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return run_worker(config)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="rayhorde")
    add_parser(parser.add_subparsers(dest="command", required=True))
    arguments = parser.parse_args(["worker", *sys.argv[1:]])
    sys.exit(arguments.func(arguments))
