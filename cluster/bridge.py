"""The volunteer bridge: Ray nodes that trusted volunteers join to the cluster become workers.

A volunteer node carries Ray labels (set by `rayhorde join`, or by hand with `ray start
--labels`):
    rayhorde-volunteer: "true"                 it is a volunteer's, not the operator's
    rayhorde-node-key: <Ed25519 public key>    the key its owner registered (PUT /api/v2/node_key)
    rayhorde-family-<family>: "yes"            each model family it offers
The cluster's own family deployments keep off such nodes (their configs select
`rayhorde-volunteer: "!true"`). Labels are visible to every node, so the key label alone
proves nothing: the bridge runs a signer on the node (a Ray task pinned to it,
cluster/node_proof.py) over a fresh challenge naming the node, and checks the signature
against the user who registered that key (api/node_keys.py). Only then does it register a
worker of kind "node" owned by that user, and the dispatcher deploys, for each family the node
offers, a Serve application whose replica is pinned to that node (`ray.io/node-id`); it claims
work for those replicas as that worker, so the owner earns what they generate and requests can
target the node's worker by id. A node whose key names no user, or that cannot sign (no key,
another key, no answer within PROOF_SECONDS), is refused with the reason logged: nothing is
deployed on it, so it gets no work and no one is credited for it.

When a node leaves or dies, its worker is marked disconnected at once, its claimed jobs go
straight back to the queue (not after their time to live) and its applications are deleted.
The bridge only reads Ray's node table and the database; the dispatcher, which owns the
routes, calls `refresh()` every `poll_seconds`.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import select, update

from api import ledger, node_keys
from api.db import queue
from api.db.models import User, Worker
from models.catalog import Family

log = logging.getLogger("ray.serve")

VOLUNTEER_LABEL = "rayhorde-volunteer"
NODE_KEY_LABEL = "rayhorde-node-key"
FAMILY_LABEL_PREFIX = "rayhorde-family-"
NODE_ID_LABEL = "ray.io/node-id"
# A node that has not signed its challenge this long after it was sent is refused (its signer
# needs a Python worker on the node: seconds).
PROOF_SECONDS = 60.0


def node_labels(public_key: str, families: list[Family]) -> dict[str, str]:
    """The labels a volunteer node starts with (`public_key`: api/node_keys.py's text)."""
    return {VOLUNTEER_LABEL: "true", NODE_KEY_LABEL: public_key,
            **{FAMILY_LABEL_PREFIX + f.value: "yes" for f in families}}


def head_labels(families: list[Family]) -> dict[str, str]:
    """The labels of the operator's own nodes: every family, not a volunteer."""
    return {FAMILY_LABEL_PREFIX + f.value: "yes" for f in families}


@dataclass
class VolunteerNode:
    node_id: str
    worker_id: str
    worker_name: str
    owner_id: int
    families: list[Family]
    gpus: float
    joined_at: float = field(default_factory=time.time)


@dataclass
class Proof:
    """A challenge sent to a node, waiting for its signature."""

    owner_id: int
    public_key: str
    challenge: bytes
    answer: object  # the signer task's ObjectRef
    sent_at: float


@dataclass
class Changes:
    joined: list[VolunteerNode] = field(default_factory=list)
    left: list[VolunteerNode] = field(default_factory=list)


class VolunteerBridge:
    def __init__(self, db, settings, served: dict[Family, list[str]]):
        """`served`: the model names this cluster serves, by family."""
        self.db, self.settings = db, settings
        self.served = served
        self.nodes: dict[str, VolunteerNode] = {}  # connected and accepted, by node id
        self.refused: set[str] = set()  # node ids already reported as refused
        self.proving: dict[str, Proof] = {}  # challenged, not yet answered, by node id
        self._last_heartbeat = 0.0

    def worker_for_node(self, node_id: str | None) -> VolunteerNode | None:
        return self.nodes.get(node_id) if node_id else None

    def refresh(self, now: float | None = None) -> Changes:
        """Compare Ray's live volunteer nodes with the known ones: register the new, retire
        the gone, and heartbeat the rest (uptime, uptime bonus)."""
        import ray  # here: `rayhorde up` must set Ray's auth settings before Ray is imported

        now = time.time() if now is None else now
        live = {n["NodeID"]: n for n in ray.nodes()
                if n.get("Alive") and (n.get("Labels") or {}).get(VOLUNTEER_LABEL) == "true"}
        changes = Changes()
        for node_id in [n for n in self.nodes if n not in live]:
            node = self.nodes.pop(node_id)
            self._retire(node, now)
            changes.left.append(node)
        for node_id in [n for n in self.proving if n not in live]:
            ray.cancel(self.proving.pop(node_id).answer, force=True)
        for node_id, info in live.items():
            if node_id not in self.nodes and node_id not in self.refused and \
                    node_id not in self.proving:
                self._challenge(node_id, info, now)
        for node_id, reason in self._answered(now).items():
            if reason is not None:
                self._refuse(node_id, reason)
                continue
            node = self._admit(node_id, live[node_id], self.proving.pop(node_id), now)
            if node is not None:
                self.nodes[node_id] = node
                changes.joined.append(node)
        if self.nodes and now - self._last_heartbeat >= self.settings.node_heartbeat_seconds:
            self._heartbeat(now)
        return changes

    def _refuse(self, node_id: str, reason: str) -> None:
        proof = self.proving.pop(node_id, None)
        if proof is not None:
            import ray

            ray.cancel(proof.answer, force=True)
        self.refused.add(node_id)
        log.warning("refusing volunteer node %s: %s", node_id, reason)

    def _challenge(self, node_id: str, info: dict, now: float) -> None:
        """Send a new node its challenge, if its key label names a user (else refuse it)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from cluster.node_proof import sign_on_node

        public_key = (info.get("Labels") or {}).get(NODE_KEY_LABEL, "")
        with self.db.read() as session:
            owner_id = session.execute(select(User.id).where(
                User.node_public_key == public_key)).scalar_one_or_none() if public_key else None
        if owner_id is None:
            self._refuse(node_id, f"its {NODE_KEY_LABEL} label names no user's registered key")
            return
        challenge = node_keys.new_challenge(node_id)
        signer = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=(
            NodeAffinitySchedulingStrategy(node_id, soft=False)))(sign_on_node)
        self.proving[node_id] = Proof(owner_id, public_key, challenge,
                                      signer.remote(challenge), now)

    def _answered(self, now: float) -> dict[str, str | None]:
        """Nodes whose proof has ended: None when it verified, else why it failed."""
        import ray

        if not self.proving:
            return {}
        refs = {p.answer: n for n, p in self.proving.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        ended: dict[str, str | None] = {}
        for ref in ready:
            node_id, proof = refs[ref], self.proving[refs[ref]]
            try:
                signature = ray.get(ref)
            except Exception as exc:  # its message: the signer's own words (no key, ...)
                cause = getattr(exc, "cause", None) or exc
                ended[node_id] = f"it could not sign its challenge ({type(cause).__name__}: " \
                                 f"{str(cause)[:200]})"
                continue
            ok = isinstance(signature, str) and node_keys.verify(proof.public_key,
                                                                  proof.challenge, signature)
            ended[node_id] = None if ok else \
                "its signature does not verify with the key its label names"
        for node_id, proof in self.proving.items():
            if node_id not in ended and now - proof.sent_at > PROOF_SECONDS:
                ended[node_id] = f"no signature within {PROOF_SECONDS:.0f} s"
        return ended

    def _admit(self, node_id: str, info: dict, proof: Proof, now: float) -> VolunteerNode | None:
        """Register the worker of a node whose proof verified, owned by the key's user."""
        labels = info.get("Labels") or {}
        offered = [f for f in Family if labels.get(FAMILY_LABEL_PREFIX + f.value) == "yes"]
        with self.db.write() as session:
            owner = session.get(User, proof.owner_id)
            if owner is None or owner.node_public_key != proof.public_key:
                # The key was replaced while the node signed: the signature proves nothing now.
                self._refuse(node_id, "its owner registered another key meanwhile")
                return None
            families = [f for f in offered if f in self.served]
            name = f"node-{owner.username}-{node_id[:8]}"
            if len(name) > 100:  # shortened, it must still be this node's alone: 32 of its id
                name = f"node-{owner.username[:62]}-{node_id[:32]}"
            worker = session.execute(select(Worker).where(Worker.node_id == node_id)
                                     ).scalar_one_or_none()
            if worker is None:
                worker = Worker(id=str(uuid.uuid4()), name=name, owner_id=owner.id, kind="node",
                                node_id=node_id, created_at=now, last_bonus_at=now,
                                bridge_agent="rayhorde volunteer node", nsfw=True)
                session.add(worker)
            worker.type = "text" if families == [Family.llm] else "image"
            worker.models = [m for f in families for m in self.served[f]]
            worker.threads = len(families)
            worker.connected, worker.last_seen = True, now
            gpus = float((info.get("Resources") or {}).get("GPU", 0))
            node = VolunteerNode(node_id=node_id, worker_id=worker.id, worker_name=worker.name,
                                 owner_id=owner.id, families=families, gpus=gpus, joined_at=now)
        log.info("volunteer node %s joined for %s#%s offering %s", node_id, owner.username,
                 owner.id, [f.value for f in families])
        return node

    def _retire(self, node: VolunteerNode, now: float) -> None:
        with self.db.write() as session:
            session.execute(update(Worker).where(Worker.id == node.worker_id)
                            .values(connected=False, last_seen=now))
        returned = queue.expire(self.db, self.settings.max_attempts, worker_id=node.worker_id)
        log.info("volunteer node %s left; %d of its jobs went back to the queue",
                 node.node_id, returned)

    def _heartbeat(self, now: float) -> None:
        """Uptime for every connected node's worker, and the owner's uptime bonus when due."""
        s = self.settings
        elapsed = now - self._last_heartbeat if self._last_heartbeat else 0.0
        self._last_heartbeat = now
        with self.db.write() as session:
            for node in self.nodes.values():
                worker = session.get(Worker, node.worker_id)
                worker.last_seen = now
                worker.uptime_seconds += min(elapsed, s.node_heartbeat_seconds * 3)
                if now - worker.last_bonus_at < s.uptime_bonus_seconds:
                    continue
                # As for HTTP workers (api/workers.py worker_for_pop): only a period in which
                # the node finished a job for someone else earns the bonus; being connected
                # alone mints nothing.
                worked = worker.last_job_at is not None and worker.last_job_at >= worker.last_bonus_at
                worker.last_bonus_at = now
                if worked and s.uptime_bonus_kudos:
                    ledger.award(session, node.owner_id, s.uptime_bonus_kudos, kind="uptime",
                                 ref=node.worker_id)
