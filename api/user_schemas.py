"""AI Horde v2 wire schemas of users and kudos (as horde-sdk declares them)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

# users.id is a 32-bit integer column: no user has a larger id.
MAX_USER_ID = 2**31 - 1
# The most kudos one award or transfer moves: far above any real one, and a sum the ledger's
# doubles hold exactly to the cent.
MAX_KUDOS_MOVED = 10**9


class KudosDetails(BaseModel):
    accumulated: float = 0.0  # earned by its workers
    gifted: float = 0.0  # transferred to others
    received: float = 0.0  # transferred from others
    awarded: float = 0.0  # admin awards and uptime bonuses
    admin: float = 0.0


class UsageDetails(BaseModel):
    megapixelsteps: float = 0.0
    requests: int = 0


class ContributionsDetails(BaseModel):
    megapixelsteps: float = 0.0
    fulfillments: int = 0


class ThingRecords(BaseModel):
    megapixelsteps: float = 0.0
    tokens: int = 0


class AmountRecords(BaseModel):
    image: int = 0
    text: int = 0
    interrogation: int = 0


class UserRecords(BaseModel):
    """What the user used (generations finished for it) and what its workers contributed."""

    usage: ThingRecords
    contribution: ThingRecords
    fulfillment: AmountRecords


class ActiveGenerations(BaseModel):
    image: list[str] = Field(default_factory=list)


class UserDetails(BaseModel):
    id: int
    username: str
    kudos: float
    concurrency: int
    worker_count: int
    worker_ids: list[str]
    account_age: int
    trusted: bool
    moderator: bool
    flagged: bool
    education: bool
    customizer: bool
    service: bool
    pseudonymous: bool
    contact: str | None = None
    kudos_details: KudosDetails
    usage: UsageDetails
    contributions: ContributionsDetails
    records: UserRecords
    active_generations: ActiveGenerations | None = None


class UserModify(BaseModel):
    """What a moderator may change on a user (PUT /users/{id})."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kudos: float | None = Field(None, ge=-MAX_KUDOS_MOVED, le=MAX_KUDOS_MOVED,
                                description="awarded (negative: taken back) through the ledger")
    trusted: bool | None = None
    moderator: bool | None = None
    flagged: bool | None = None
    education: bool | None = None
    customizer: bool | None = None
    service: bool | None = None
    contact: str | None = Field(None, min_length=5, max_length=500)
    username: str | None = Field(None, min_length=3, max_length=100)


class UserModifyResponse(BaseModel):
    new_kudos: float | None = None
    trusted: bool | None = None
    moderator: bool | None = None
    flagged: bool | None = None
    education: bool | None = None
    customizer: bool | None = None
    service: bool | None = None
    contact: str | None = None
    username: str | None = None


class KudosTransferInput(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    username: str = Field(min_length=3, max_length=110, description="recipient as name#id")
    amount: float = Field(gt=0, le=MAX_KUDOS_MOVED)


class KudosTransferResponse(BaseModel):
    transferred: float
