"""ORM models: the only source of truth for work (ARCHITECTURE.md, rule 1).

Times are float epoch seconds, ids of requests and generations are UUID strings: both compare and
index the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


ROLES = ("trusted", "moderator", "flagged", "education", "customizer", "service")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100))
    # Salted SHA-256 of the API key; the key itself is never stored.
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The sum of this user's rows in `kudos_ledger`, kept in step with it in the same
    # transaction (api/ledger.py); the horde's own account is the exception (see there).
    kudos: Mapped[float] = mapped_column(Double, default=0.0)
    created_at: Mapped[float] = mapped_column(Double, default=time.time)
    # Roles (shared/horde-facts.md): trusted users' workers are trusted workers; moderators
    # administer users and workers; flagged users cannot transfer kudos; education forces SFW
    # and raises the concurrency cap; customizers' workers may serve models outside the
    # catalog; service accounts are other services' proxies.
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)
    moderator: Mapped[bool] = mapped_column(Boolean, default=False)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    education: Mapped[bool] = mapped_column(Boolean, default=False)
    customizer: Mapped[bool] = mapped_column(Boolean, default=False)
    service: Mapped[bool] = mapped_column(Boolean, default=False)
    contact: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # How a volunteer's Ray node names its owner without carrying the key (api/auth.py).
    node_key_digest: Mapped[str | None] = mapped_column(String(48), unique=True, nullable=True)
    # Prompts refused by the CSAM guard (api/filters), counted for moderators.
    suspicion: Mapped[int] = mapped_column(Integer, default=0)
    # The Ed25519 public key a volunteer's Ray node proves its owner with (cluster/bridge.py):
    # derived from the API key (api/auth.py), so only who holds the key can sign with it.
    node_public_key: Mapped[str | None] = mapped_column(String(64), unique=True, index=True,
                                                        nullable=True)
    # What /users and /find_user show, kept in step with the ledger and the finished
    # generations in the same transactions (api/ledger.py), so no call sums history:
    # kudos earned by its workers, given and received in transfers, awarded (admin awards
    # and uptime bonuses) and of that by admins; generations finished for it, their
    # megapixelsteps and tokens.
    kudos_accumulated: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    kudos_gifted: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    kudos_received: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    kudos_awarded: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    kudos_admin: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    usage_requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    usage_megapixelsteps: Mapped[float] = mapped_column(Double, default=0.0, server_default="0")
    usage_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class KudosEntry(Base):
    """One side of a kudos movement. Every movement (`txn_id`) is two or more rows that sum to
    zero: money only moves between accounts, the horde's own account included (it mints
    awards and uptime bonuses and collects the request tax). Rows are never updated."""

    __tablename__ = "kudos_ledger"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    txn_id: Mapped[str] = mapped_column(String(36), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    amount: Mapped[float] = mapped_column(Double)
    # generation (requester pays), reward (worker owner earns), tax, transfer, uptime, award
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[float] = mapped_column(Double, default=time.time)


class IdempotencyKey(Base):
    """The answer given to a request sent with an `Idempotency-Key` header, so a retry of it
    gets the same answer instead of doing the work again."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    response: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double, default=time.time)


class Worker(Base):
    """Something that generates: the cluster's own family deployments (kind "cluster"), HTTP
    volunteers (kind "http", through /generate/pop) and Ray-joined volunteer nodes."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "cluster" | "http" | "node"
    type: Mapped[str] = mapped_column(String(16), default="image")  # image | text | interrogation
    models: Mapped[list] = mapped_column(JSON, default=list)
    last_seen: Mapped[float] = mapped_column(Double, default=time.time)
    created_at: Mapped[float] = mapped_column(Double, default=time.time)
    # What it declared at its last pop.
    max_pixels: Mapped[int] = mapped_column(BigInteger, default=512 * 512)
    max_length: Mapped[int] = mapped_column(Integer, default=0)  # text workers
    max_context_length: Mapped[int] = mapped_column(Integer, default=0)
    tokens_generated: Mapped[int] = mapped_column(BigInteger, default=0)
    nsfw: Mapped[bool] = mapped_column(Boolean, default=False)
    threads: Mapped[int] = mapped_column(Integer, default=1)
    bridge_agent: Mapped[str] = mapped_column(String(200), default="")
    capabilities: Mapped[dict] = mapped_column(JSON, default=dict)
    info: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    maintenance: Mapped[bool] = mapped_column(Boolean, default=False)
    maintenance_msg: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # Maintenance the horde imposed (too many drops and faults): its owner cannot end it
    # before this time (moderators can).
    maintenance_until: Mapped[float | None] = mapped_column(Double, nullable=True)
    # Ray-joined volunteer nodes (kind "node"): the node, and whether it is in the cluster now
    # (the bridge sets it as nodes join and leave; other kinds are online by their last pop).
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    connected: Mapped[bool] = mapped_column(Boolean, default=False)
    # Counters (lifetime); consecutive_drops puts a worker into maintenance when it keeps
    # losing jobs, and is reset by every successful submit.
    jobs_done: Mapped[int] = mapped_column(BigInteger, default=0)
    megapixelsteps_done: Mapped[float] = mapped_column(Double, default=0.0)
    kudos_earned: Mapped[float] = mapped_column(Double, default=0.0)
    seconds_working: Mapped[float] = mapped_column(Double, default=0.0)
    dropped_jobs: Mapped[int] = mapped_column(BigInteger, default=0)
    consecutive_drops: Mapped[int] = mapped_column(Integer, default=0)
    uptime_seconds: Mapped[float] = mapped_column(Double, default=0.0)
    last_bonus_at: Mapped[float] = mapped_column(Double, default=time.time)
    # When it last finished a job for someone other than its owner: the uptime bonus is only
    # paid for periods with such work (api/workers.py worker_for_pop).
    last_job_at: Mapped[float | None] = mapped_column(Double, nullable=True)


class Request(Base):
    """One client request (`POST /generate/async`): what was asked, by whom, at what price."""

    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(8), default="image")
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    # The validated `params` as the client sent them plus server defaults.
    params: Mapped[dict] = mapped_column(JSON)
    models: Mapped[list] = mapped_column(JSON)
    n: Mapped[int] = mapped_column(Integer)
    r2: Mapped[bool] = mapped_column(Boolean, default=True)
    nsfw: Mapped[bool] = mapped_column(Boolean, default=False)
    censor_nsfw: Mapped[bool] = mapped_column(Boolean, default=False)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    kudos: Mapped[float] = mapped_column(Double)
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)
    client_agent: Mapped[str] = mapped_column(String(200), default="unknown:0:unknown")
    created_at: Mapped[float] = mapped_column(Double, default=time.time)
    # Who waits on it for the concurrency cap: "u:<user id>", or for the anonymous user
    # "ip:<hash of the client address>" (anonymous requesters share one account).
    requester: Mapped[str] = mapped_column(String(64), default="")
    # Request-side worker choice (shared/horde-facts.md).
    workers: Mapped[list] = mapped_column(JSON, default=list)
    worker_blacklist: Mapped[bool] = mapped_column(Boolean, default=False)
    trusted_workers: Mapped[bool] = mapped_column(Boolean, default=False)
    slow_workers: Mapped[bool] = mapped_column(Boolean, default=True)
    extra_slow_workers: Mapped[bool] = mapped_column(Boolean, default=False)
    # Image workflows (models/workflows.py): img2img, inpainting or outpainting when a source
    # image came with the request; the source and mask as stored once (object storage keys),
    # so every attempt, on any worker, reads the same bytes.
    source_processing: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Indexed: the sweep that deletes the sources of ended requests reads the few set ones.
    source_image_key: Mapped[str | None] = mapped_column(String(300), nullable=True, index=True)
    source_mask_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    # Remix: the extra source images, stored like the source: [{"key": ..., "strength": ...}].
    extra_sources: Mapped[list | None] = mapped_column(JSON, nullable=True)


class Generation(Base):
    """One image of a request. Its state machine:
    waiting -> processing (claimed, with a deadline and a claim id) -> done | back to waiting
    (expired or failed, attempts counted) -> faulted after `max_attempts`; cancelled from
    waiting or processing by DELETE /status."""

    __tablename__ = "generations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(12), default="waiting")
    seed: Mapped[int] = mapped_column(BigInteger)
    # The model it was (or is being) generated with; set when claimed.
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(36), nullable=True)
    deadline: Mapped[float | None] = mapped_column(Double, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    storage_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    worker_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    censored: Mapped[bool] = mapped_column(Boolean, default=False)
    gen_metadata: Mapped[list] = mapped_column(JSON, default=list)
    fault_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    requester: Mapped[str] = mapped_column(String(64), default="")  # as Request.requester
    user_id: Mapped[int] = mapped_column(Integer, default=0)  # who pays
    # Kudos the worker's owner earns for it; when it finishes, the requester pays that plus
    # `tax`, its share of the request tax (api/ledger.py).
    kudos: Mapped[float] = mapped_column(Double, default=0.0)
    tax: Mapped[float] = mapped_column(Double, default=0.0)
    megapixelsteps: Mapped[float] = mapped_column(Double, default=0.0)
    # Text generations: the result (kept here, not in object storage) and its token counts.
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Handed back by the cluster's own replicas (trusted: each counts), and the owners of the
    # untrusted workers (HTTP volunteers, Ray-joined nodes) that faulted or dropped it,
    # ",1,7," (each owner counts once, whatever its number of workers): it ends faulted when
    # failures + owners reach max_attempts (api/db/queue.py).
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    faulted_owners: Mapped[str] = mapped_column(String(200), default="", server_default="")
    # What its requester paid when it finished (its reward and tax share; for text the reward
    # of the tokens delivered; nothing when the horde's own check censored it).
    charged: Mapped[float | None] = mapped_column(Double, nullable=True)

    __table_args__ = (Index("ix_generations_state_deadline", "state", "deadline"),
                      Index("ix_generations_requester_state", "requester", "state"),
                      Index("ix_generations_finished_at", "finished_at"))


class Interrogation(Base):
    """One alchemy request (`POST /interrogate/async`): a source image and the forms to run on
    it (api/alchemy/)."""

    __tablename__ = "interrogations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    requester: Mapped[str] = mapped_column(String(64), default="")  # as Request.requester
    # The source image, checked and stored once as PNG; deleted when no form is left to run.
    source_image_key: Mapped[str | None] = mapped_column(String(300), nullable=True, index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    kudos: Mapped[float] = mapped_column(Double, default=0.0)  # all forms, as priced at submit
    cancelled: Mapped[bool] = mapped_column(Boolean, default=False)
    client_agent: Mapped[str] = mapped_column(String(200), default="unknown:0:unknown")
    created_at: Mapped[float] = mapped_column(Double, default=time.time)


class InterrogationForm(Base):
    """One form of an interrogation: a job of its own, claimed, finished and charged like a
    generation (waiting -> processing -> done | back to waiting | faulted; cancelled)."""

    __tablename__ = "interrogation_forms"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    interrogation_id: Mapped[str] = mapped_column(ForeignKey("interrogations.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    state: Mapped[str] = mapped_column(String(12), default="waiting")
    sort_key: Mapped[float] = mapped_column(Double)  # as QueueEntry.sort_key
    tiles: Mapped[int] = mapped_column(Integer, default=1)  # 512x512 tiles of the source
    trusted_only: Mapped[bool] = mapped_column(Boolean, default=False)
    slow_ok: Mapped[bool] = mapped_column(Boolean, default=True)
    requester: Mapped[str] = mapped_column(String(64), default="")
    user_id: Mapped[int] = mapped_column(Integer, default=0)  # who pays
    kudos: Mapped[float] = mapped_column(Double, default=0.0)  # the worker's owner earns it
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(36), nullable=True)
    deadline: Mapped[float | None] = mapped_column(Double, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    worker_name: Mapped[str | None] = mapped_column(String(100), nullable=True)
    # caption / nsfw / interrogation: the result itself; post-processors: the stored image.
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    result_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    fault_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # As Generation.failures and faulted_owners: an alchemy form fails only when the cluster
    # or workers of several distinct owners fault it (api/alchemy/forms.py).
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    faulted_owners: Mapped[str] = mapped_column(String(200), default="", server_default="")

    __table_args__ = (Index("ix_forms_claim", "state", "name", "sort_key"),
                      Index("ix_forms_state_deadline", "state", "deadline"),
                      Index("ix_forms_requester_state", "requester", "state"),
                      Index("ix_forms_finished_at", "finished_at"))  # the retention sweep


# What the partial indexes ix_queue_claim and ix_queue_sort (below) hold: a query that reads
# them must say it in these words, for the planner (SQLite's above all) to see that they apply.
UNCLAIMED = text("NOT queue_entries.claimed")
_INDEXED = text("NOT claimed")  # the same, as the indexes' own WHERE


class QueueEntry(Base):
    """The priority queue: one row per (waiting generation, model it may run on), read through
    the (model, sort_key, id) index so claiming costs the same at 10 or 100,000 waiting.

    `sort_key` = aging * submit time - priority: ordering by it ascending is ordering by
    "priority raised by aging" descending, without ever rewriting a row as time passes.
    A request naming no model gets one entry with model '*'. Entries live until the generation
    ends (done, faulted, cancelled), so a job handed back to the queue keeps its place; while
    its generation is claimed they are marked `claimed`, and the two indexes claims read hold
    unclaimed entries only, so a claim never steps over the jobs in flight (thousands, on a
    busy horde) to reach the first waiting one."""

    __tablename__ = "queue_entries"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    sort_key: Mapped[float] = mapped_column(Double)
    # Filters a worker's capabilities are checked against without reading the request
    # (api/db/queue.py, `_rules`).
    pixels: Mapped[int] = mapped_column(BigInteger)
    megapixelsteps: Mapped[float] = mapped_column(Double)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    user_id: Mapped[int] = mapped_column(Integer, default=0)
    nsfw: Mapped[bool] = mapped_column(Boolean, default=False)
    trusted_only: Mapped[bool] = mapped_column(Boolean, default=False)
    slow_ok: Mapped[bool] = mapped_column(Boolean, default=True)
    extra_slow_ok: Mapped[bool] = mapped_column(Boolean, default=False)
    upfront: Mapped[bool] = mapped_column(Boolean, default=False)
    # What the request needs of a worker (queue.Feature bits: source image, painting, ...).
    features: Mapped[int] = mapped_column(Integer, default=0)
    # Request-side worker choice: 0 any worker, 1 only those in `target_workers`, 2 all but
    # those (comma-joined worker ids; UUIDs, so a substring match is an exact one).
    target_mode: Mapped[int] = mapped_column(Integer, default=0)
    target_workers: Mapped[str] = mapped_column(String(200), default="")
    # Owners whose workers faulted or dropped its generation (as Generation.faulted_owners):
    # none of their workers claims it again.
    excluded_owners: Mapped[str] = mapped_column(String(200), default="", server_default="")
    # "image" or "text": a worker only gets its own kind. Text requests' sizes, checked
    # against a text worker's limits: tokens to generate and the whole context.
    kind: Mapped[str] = mapped_column(String(8), default="image")
    max_length: Mapped[int] = mapped_column(Integer, default=0)
    max_context_length: Mapped[int] = mapped_column(Integer, default=0)
    # Its generation is processing (api/db/queue.py: set by a claim, cleared when the claim
    # hands the job back).
    claimed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        Index("ix_queue_claim", "model", "sort_key", "id",
              postgresql_where=_INDEXED, sqlite_where=_INDEXED),
        Index("ix_queue_sort", "sort_key", "id",
              postgresql_where=_INDEXED, sqlite_where=_INDEXED),
        Index("ix_queue_user", "user_id", "sort_key"),
    )


class ModelStat(Base):
    """Recent speed per model, for `wait_time` estimates."""

    __tablename__ = "model_stats"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    ewma_seconds: Mapped[float] = mapped_column(Double)  # one generation, start to finish
    ewma_interval: Mapped[float] = mapped_column(Double)  # between two completions
    last_finished: Mapped[float] = mapped_column(Double)
    completed: Mapped[int] = mapped_column(BigInteger, default=0)


class PromptFilter(Base):
    """A moderator's regex over prompts (api/filters: what each `filter_type` does). Matched
    case-insensitively; `replacement` (type 10 only) is what the replacement filter puts in
    place of a match."""

    __tablename__ = "prompt_filters"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    regex: Mapped[str] = mapped_column(String(1000))
    filter_type: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(String(1000), default="")
    replacement: Mapped[str | None] = mapped_column(String(200), nullable=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))  # who added or last changed it
    created_at: Mapped[float] = mapped_column(Double, default=time.time)
    updated_at: Mapped[float] = mapped_column(Double, default=time.time)


class PromptFilterVersion(Base):
    """One row (id 1) whose `version` every change to `prompt_filters` raises in the same
    transaction: API replicas poll it to know when to reload their filters, which notices
    any change (deletions included) without trusting clocks."""

    __tablename__ = "prompt_filter_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class SharedKey(Base):
    """A shared key (`/v2/sharedkeys`, api/sharedkeys): whoever holds its secret may make
    generation requests that its owner pays for, within its limits. Only a salted digest of
    the secret is stored; `id` is this row's own id, never shown and never the secret."""

    __tablename__ = "shared_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # Kudos it may still spend (-1: no limit), as the AI Horde counts it: what its requests
    # cost comes off as they finish, and adds to `utilized`.
    kudos: Mapped[float] = mapped_column(Double)
    utilized: Mapped[float] = mapped_column(Double, default=0.0)
    expiry: Mapped[float | None] = mapped_column(Double, nullable=True)  # epoch seconds
    # Per request; -1 is no limit.
    max_image_pixels: Mapped[int] = mapped_column(Integer, default=-1)
    max_image_steps: Mapped[int] = mapped_column(Integer, default=-1)
    max_text_tokens: Mapped[int] = mapped_column(Integer, default=-1)
    created_at: Mapped[float] = mapped_column(Double, default=time.time)


class SharedKeyRequest(Base):
    """A request made with a shared key whose cost is not yet all folded into the key's
    `kudos` and `utilized`: `settled` is what of it was. The row goes once the request has
    nothing left to run and is settled (api/sharedkeys/service.py), so a key has only a few.
    No foreign key to `requests`: the row must never hold a request back from deletion."""

    __tablename__ = "shared_key_requests"

    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    shared_key_id: Mapped[str] = mapped_column(ForeignKey("shared_keys.id"), index=True)
    settled: Mapped[float] = mapped_column(Double, default=0.0)


class UsageBucket(Base):
    """Finished generations per kind (image, text), model and hour since the epoch, folded in
    from `generations` by api/usage_stats.py for the /stats endpoints; the row with hour
    LIFETIME_HOUR (-1) holds the model's all-time sums. Hourly rows older than a month go."""

    __tablename__ = "usage_buckets"

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    hour: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    generations: Mapped[int] = mapped_column(BigInteger, default=0)
    megapixelsteps: Mapped[float] = mapped_column(Double, default=0.0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class UsageWatermark(Base):
    """One row (id 1): generations that finished before `folded_until` are counted in
    `usage_buckets`; those after it are read from `generations` itself."""

    __tablename__ = "usage_watermark"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    folded_until: Mapped[float] = mapped_column(Double, default=0.0)


class UsageMinute(Base):
    """Finished generations per kind and minute since the epoch, folded in with the hourly
    buckets (api/usage_stats.py) for the last hour's totals, so they need no generation rows
    (the retention sweep deletes those). Rows older than two hours go."""

    __tablename__ = "usage_minutes"

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    generations: Mapped[int] = mapped_column(BigInteger, default=0)
    megapixelsteps: Mapped[float] = mapped_column(Double, default=0.0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class RetentionCursor(Base):
    """Where the retention sweep (api/retention.py) has read the ended jobs to, in
    (finished_at, id) order: row 1 the generations, row 2 the alchemy forms."""

    __tablename__ = "retention_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    finished_at: Mapped[float] = mapped_column(Double, default=0.0)
    row_id: Mapped[str] = mapped_column(String(36), default="")
