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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(100))
    # Salted SHA-256 of the API key; the key itself is never stored.
    api_key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kudos: Mapped[float] = mapped_column(Double, default=0.0)
    created_at: Mapped[float] = mapped_column(Double, default=time.time)


class Worker(Base):
    """Something that generates: the cluster's own deployments, and (later) HTTP volunteers."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(16))  # "cluster" | "http"
    models: Mapped[list] = mapped_column(JSON, default=list)
    last_seen: Mapped[float] = mapped_column(Double, default=time.time)
    created_at: Mapped[float] = mapped_column(Double, default=time.time)


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

    __table_args__ = (Index("ix_generations_state_deadline", "state", "deadline"),)


class QueueEntry(Base):
    """The priority queue: one row per (waiting generation, model it may run on), read through
    the (model, sort_key, id) index so claiming costs the same at 10 or 100,000 waiting.

    `sort_key` = aging * submit time - priority: ordering by it ascending is ordering by
    "priority raised by aging" descending, without ever rewriting a row as time passes.
    A request naming no model gets one entry with model '*'. Entries live until the generation
    ends (done, faulted, cancelled), so a job handed back to the queue keeps its place."""

    __tablename__ = "queue_entries"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    sort_key: Mapped[float] = mapped_column(Double)
    # Filters a worker's capabilities are checked against without reading the request.
    pixels: Mapped[int] = mapped_column(BigInteger)
    megapixelsteps: Mapped[float] = mapped_column(Double)

    __table_args__ = (
        Index("ix_queue_claim", "model", "sort_key", "id"),
        Index("ix_queue_sort", "sort_key", "id"),
    )


class ModelStat(Base):
    """Recent speed per model, for `wait_time` estimates."""

    __tablename__ = "model_stats"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    ewma_seconds: Mapped[float] = mapped_column(Double)  # one generation, start to finish
    ewma_interval: Mapped[float] = mapped_column(Double)  # between two completions
    last_finished: Mapped[float] = mapped_column(Double)
    completed: Mapped[int] = mapped_column(BigInteger, default=0)
