"""The kudos ledger: every movement of kudos is a set of rows that sum to zero, and each user's
`kudos` column moves with its rows in the same transaction.

Balances are kept consistent under concurrent writers by changing them only with
`UPDATE users SET kudos = kudos + :delta` (the database serialises those per row), in user-id
order (so two movements touching the same users never lock them in opposite orders), after
the ledger rows are written. A transfer that must not overdraw checks and debits in one
conditional UPDATE.

The horde's own account (created by migration 0002, api_key_hash "horde") is where the request
tax goes and where awards and uptime bonuses come from, so the sum over all balances is always
zero: the invariant the tests check.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import insert, select, update

from api import metrics
from api.db.models import KudosEntry, User

HORDE_ACCOUNT_MARKER = "horde"
_horde_ids: dict[str, int] = {}


def horde_account_id(session) -> int:
    """The id of the horde's own account (looked up once per database)."""
    url = str(session.bind.url)
    if url not in _horde_ids:
        _horde_ids[url] = session.execute(
            select(User.id).where(User.api_key_hash == HORDE_ACCOUNT_MARKER)
        ).scalar_one()
    return _horde_ids[url]


@dataclass
class Usage:
    """Generations finished for a user, folded into its counters with a movement."""

    generations: int = 0
    megapixelsteps: float = 0.0
    tokens: int = 0


# The users' counters each kind of row moves (besides `kudos`), as /users shows them
# (api/users.py): rewards accumulated; transfers given and received; awards and uptime
# bonuses awarded, of which awards by admins.
def _counter_deltas(kind: str, amount: float) -> dict[str, float]:
    if kind == "reward":
        return {"kudos_accumulated": amount}
    if kind == "transfer":
        return {"kudos_gifted": -amount} if amount < 0 else {"kudos_received": amount}
    if kind == "award":
        return {"kudos_awarded": amount, "kudos_admin": amount}
    if kind == "uptime":
        return {"kudos_awarded": amount}
    return {}


def _move(session, user_id: int, deltas: dict[str, float]) -> None:
    """One user's balance and counters moved by `deltas` (column -> amount), one UPDATE."""
    C = User.__table__.c
    session.execute(update(User.__table__).where(C.id == user_id)
                    .values({C[name]: C[name] + delta for name, delta in sorted(deltas.items())}))


def record(session, rows: list[tuple[int, float, str]], ref: str | None = None,
           now: float | None = None, usage: dict[int, Usage] | None = None) -> str:
    """Write one movement: `rows` of (user id, amount, kind) that sum to zero, and `usage`
    (generations finished for users) into their counters. Returns its transaction id. Two
    statements plus one update per distinct user (balance and counters together)."""
    if not rows and not usage:
        raise ValueError("a kudos movement needs rows")
    total = sum(amount for _, amount, _ in rows)
    if abs(total) > 1e-6:
        raise ValueError(f"kudos movement does not balance: {rows} sums to {total}")
    now = time.time() if now is None else now
    txn = str(uuid.uuid4())
    if rows:
        session.execute(insert(KudosEntry), [
            {"txn_id": txn, "user_id": uid, "amount": amount, "kind": kind, "ref": ref,
             "created_at": now}
            for uid, amount, kind in rows
        ])
    deltas: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for uid, amount, kind in rows:
        deltas[uid]["kudos"] += amount
        for name, delta in _counter_deltas(kind, amount).items():
            deltas[uid][name] += delta
    for uid, used in (usage or {}).items():
        deltas[uid]["usage_requests"] += used.generations
        deltas[uid]["usage_megapixelsteps"] += used.megapixelsteps
        deltas[uid]["usage_tokens"] += used.tokens
    for uid in sorted(deltas):
        moved = {name: delta for name, delta in deltas[uid].items() if delta}
        if moved:
            _move(session, uid, moved)
    metrics.kudos_moved(session, rows)
    return txn


def award(session, user_id: int, amount: float, kind: str = "award", ref: str | None = None) -> str:
    """Kudos from the horde's account (an admin award, an uptime bonus); negative takes back."""
    horde = horde_account_id(session)
    metrics.kudos_awarded(session, amount, kind)
    return record(session, [(user_id, amount, kind), (horde, -amount, kind)], ref)


class Overdrawn(Exception):
    pass


def transfer(session, source_id: int, target_id: int, amount: float, ref: str | None = None) -> str:
    """Move `amount` (> 0) from one user to another; raises Overdrawn (and changes nothing) if
    the source holds less. The debit checks and takes in one statement, so two concurrent
    transfers can never both spend the same kudos."""
    if amount <= 0:
        raise ValueError("amount must be positive")

    def credit():
        session.execute(update(User).where(User.id == target_id)
                        .values(kudos=User.kudos + amount,
                                kudos_received=User.kudos_received + amount))

    # Lock the two rows in id order, as record() does. If the debit fails after the credit,
    # the caller's transaction rolls both back.
    if target_id < source_id:
        credit()
    debited = session.execute(
        update(User).where(User.id == source_id, User.kudos >= amount)
        .values(kudos=User.kudos - amount, kudos_gifted=User.kudos_gifted + amount)
        .returning(User.id)
    ).first()
    if debited is None:
        raise Overdrawn()
    if target_id > source_id:
        credit()
    now = time.time()
    txn = str(uuid.uuid4())
    session.execute(insert(KudosEntry), [
        {"txn_id": txn, "user_id": source_id, "amount": -amount, "kind": "transfer", "ref": ref,
         "created_at": now},
        {"txn_id": txn, "user_id": target_id, "amount": amount, "kind": "transfer", "ref": ref,
         "created_at": now},
    ])
    return txn
