"""Settings from the environment (prefix RAYHORDE_) with embedded defaults: SQLite and local
file storage under ./data, so a fresh checkout runs with no configuration at all."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAYHORDE_", extra="ignore")

    database_url: str = "sqlite:///./data/rayhorde.db"
    # Images: a local folder served by the API itself, or an S3 bucket with presigned URLs.
    storage: Literal["local", "s3"] = "local"
    storage_dir: str = "./data/objects"
    s3_bucket: str = "rayhorde"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_url_ttl: int = 1800
    # Where clients reach the API; image URLs under local storage are built from it.
    public_url: str = "http://127.0.0.1:8000"
    catalog_path: str = "configs/models.yaml"
    # LoRAs and textual inversions (models/adapters.py): which names resolve, and whether
    # workers may download others from CivitAI.
    adapter_catalog_path: str = "configs/adapters.yaml"
    # The models this cluster serves; empty means every model of the catalog.
    served_models: list[str] = Field(default_factory=list)
    # --- Secrets (api/installation_secret.py) ---
    # The installation's secret: it salts API key hashes and signs the upload URLs that local
    # storage hands to HTTP workers. Unset, it is read from `secret_file`, made there (mode
    # 0600) on first start; a cluster of several nodes sets RAYHORDE_KEY_SALT on every node.
    key_salt: str = ""
    # Where the made secret lives; "" = beside the SQLite database (data/rayhorde.secret for
    # data/rayhorde.db), else data/rayhorde-cluster.secret.
    secret_file: str = ""
    # Fingerprints of the settings the application's build read from its environment: each
    # replica reads them from its own and must find the same (cluster/app.py).
    env_digests: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def resolve_secrets(self) -> "Settings":
        from api.installation_secret import resolve

        return resolve(self)
    # --- end of secrets ---
    max_body_bytes: int = 16 * 1024 * 1024
    # Source images and masks (api/sources.py): bytes and pixels accepted, how long fetching a
    # URL may take, and whether URLs may point at private, loopback or link-local addresses
    # (never on a public cluster: it would let anyone probe the cluster's own network).
    max_source_bytes: int = 10 * 1024 * 1024
    max_source_pixels: int = 3072 * 3072
    source_fetch_timeout_seconds: float = 10.0
    allow_private_source_urls: bool = False
    # ControlNet annotators (models/annotators): "builtin" random-weight networks (the
    # embedded demo) or the "published" weights (lllyasviel/Annotators and the transformers
    # models), and the CPUs each annotator task asks Ray for.
    annotator_weights: Literal["builtin", "published"] = "builtin"
    annotator_num_cpus: float = Field(0.0, ge=0)
    # Post-processors (models/postprocess): "builtin" random weights of the real architectures
    # for every one (the embedded demo), or the files the catalog's `postprocessors` name.
    postprocessor_weights: Literal["builtin", "catalog"] = "builtin"
    # Caption, interrogation and the NSFW classifier (models/alchemy): "builtin" random weights
    # (the embedded demo; the tiny NSFW checker is calibrated on synthetic images, see
    # models/safety.py), or the directories the catalog's `alchemy` entries name.
    alchemy_weights: Literal["builtin", "catalog"] = "builtin"
    # Added to every score of the NSFW classifier (diffusers' safety checker `adjustment`):
    # above 0 flags more images, at the cost of more benign ones; for censor_nsfw and the nsfw form.
    nsfw_strictness: float = Field(0.0, ge=-1.0, le=1.0)
    # A generation that fails this many times ends `faulted`.
    max_attempts: int = 3

    # Queue order (api/kudos.py head_start_seconds): seconds of head start per tenfold of a
    # requester's kudos, and how far behind everyone the anonymous user starts.
    seconds_per_kudos_decade: float = 60.0
    anonymous_penalty_seconds: float = 600.0
    # Images one requester may have waiting or in progress at once (anonymous users count per
    # client address); the education role gets the higher cap.
    max_waiting_per_user: int = 30
    max_waiting_education: int = 100

    # Workers.
    stale_worker_seconds: float = 300.0  # offline after this long without a pop
    slow_worker_mps: float = 0.3  # megapixelsteps per second below which a worker is slow
    slow_worker_tps: float = 2.0  # tokens per second, for text workers
    # Jobs dropped (expired) or faulted in a row before the horde puts a worker into
    # maintenance, and for how long its owner then cannot end it (moderators can).
    max_consecutive_drops: int = 5
    drop_maintenance_seconds: float = Field(3600.0, ge=0)
    uptime_bonus_kudos: float = 50.0  # earned by a worker's owner ...
    uptime_bonus_seconds: float = 600.0  # ... per this much time online
    expire_every_seconds: float = 5.0  # how often expired claims are swept back
    node_heartbeat_seconds: float = 10.0  # volunteer nodes' uptime is counted this often
    # How often each API replica checks whether the prompt filters changed (api/filters).
    filter_refresh_seconds: float = Field(2.0, gt=0)

    # Proxies in front of the API that append the client's address to X-Forwarded-For (an
    # outer nginx or HAProxy; Serve's own ingress is not one): the client address is then the
    # entry this many places from the right (api/routes/deps.py client_ip). 0: the peer. Only
    # set it when nothing but those proxies can reach the API's port.
    trusted_proxy_hops: int = Field(0, ge=0, le=10)

    # Rate limits per API key and per client address (limits' syntax, e.g. "60/minute");
    # "memory://" counts per API replica, "redis://host:port" across all of them.
    rate_limit_storage: str = "memory://"
    rate_limit_submit: str = "60/minute"
    rate_limit_poll: str = "600/minute"  # check and status
    rate_limit_pop: str = "300/minute"
    rate_limit_users: str = "120/minute"  # /find_user, /users, /users/{id} together
    # Submits a minute of registered and trusted users (the AI Horde's 90 and 300), counted per
    # user wherever they call from; `rate_limit_submit` is then the anonymous callers' limit,
    # per address. A tier never gets less than the one below it (api/ratelimit.py).
    rate_limit_submit_registered: str = "90/minute"
    rate_limit_submit_trusted: str = "300/minute"
    # Pixels of source images (img2img, masks, remix, alchemy) decoded a minute for one address
    # or one registered user: decoding is the costly part of a request, paid before any kudos
    # are, so it has a budget of its own (the default: about six 3072x3072 sources a minute,
    # twenty for a registered user). Past it: 429, before the pixels are decoded.
    rate_limit_source_pixels: str = "60000000/minute"
    rate_limit_source_pixels_registered: str = "200000000/minute"

    # The worker economy (api/workers.py). HTTP workers (image, text and alchemy together) one
    # user may have, and a trusted user or moderator: the AI Horde lets a user run about 4
    # workers (SAME_IP_WORKER_THRESHOLD 3: a further one is refused past 3 others) and a
    # trusted user 20. Names are kept for good: past the cap, rename one (PUT /workers/{id}).
    max_workers_per_user: int = Field(4, ge=1)
    max_workers_trusted: int = Field(20, ge=1)
    # Bytes of one uploaded result: local uploads past it are refused as they arrive, S3
    # uploads (a presigned PUT cannot be capped) at submit. max_body_bytes bounds both too.
    max_upload_bytes: int = Field(16 * 1024 * 1024, ge=1)
    # Bytes of images one status answer carries inline (requests with `r2: false`): past
    # them, its other images come as URLs, so one answer never grows without bound.
    max_inline_status_bytes: int = Field(16 * 1024 * 1024, ge=0)

    # Retention (api/retention.py): a request that has ended (done, faulted, cancelled or
    # expired) is deleted this long after its last generation ended, with its images and
    # sources, as the AI Horde forgets requests minutes after they are done (and its R2 image
    # links last 30 minutes); its status then answers 404. Kudos, the users' counters and the
    # /stats numbers stay. Each pass of the API's sweep deletes at most
    # `retention_sweep_limit` requests (passes run every `expire_every_seconds`).
    finished_retention_seconds: float = Field(1800.0, ge=120)
    retention_sweep_limit: int = Field(200, ge=1, le=10_000)

    # Models beyond the cluster's own (api/known_models.py). A request for a model of the AI
    # Horde's model reference that nobody serves waits for an HTTP volunteer; when no worker has
    # taken a job of it for this long (the AI Horde's 20 minutes), its waiting generations end
    # faulted. 0: they wait for ever.
    unclaimed_expiry_seconds: float = Field(1200.0, ge=0)
    # Where `rayhorde models pull` saves the weights of the reference's models.
    models_dir: str = "./data/models"


@lru_cache
def get_settings() -> Settings:
    return Settings()
