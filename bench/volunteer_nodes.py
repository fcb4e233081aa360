"""How fast volunteer nodes take and give back work, on a real two-node cluster on loopback
(`rayhorde up`, then `rayhorde join` in another process):

- join -> first job: from running `rayhorde join` to the first job claimed by the new node's
  worker, and to that job finished (the replica is deployed and loads its model in between);
- death -> back in the queue: from kill -9 of the node's raylet while it generates to its job
  being handed back to the queue (the bridge's doing), and to that job finished on the head
  (which first finishes the job it was busy with: a few seconds of the figure).

    .venv/bin/python bench/volunteer_nodes.py [--runs 3] [--backlog 12]

The backlog must outlast the node's start (Ray's node start, the node proof, the replica's
import of the model code), or the node finds nothing left to claim: on a 2-core machine the
head clears six of these jobs in about 26 s, which the join then only just beats.

Uses port 8000 and a private Ray folder under /tmp; `rayhorde down` stops everything.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serve"), str(ROOT / "tests" / "cluster")]

from sqlalchemy import select  # noqa: E402

from api.db.models import Generation, Worker  # noqa: E402
from api.db.session import Database  # noqa: E402
from node_harness import API, cli, horde_up, node_worker, raylet_of, wait_for  # noqa: E402

ANON = {"apikey": "0000000000"}
LONG = {"width": 1024, "height": 1024, "steps": 50}


def submit(http, workers: list[str] | None = None, **params) -> str:
    body = {"prompt": "a lighthouse", "models": ["tiny-sd15"], "params": params}
    if workers:
        body["workers"] = workers
    r = http.post(f"{API}/generate/async", headers=ANON, json=body)
    r.raise_for_status()
    return r.json()["id"]


def generation(db: Database, rid: str) -> Generation:
    with db.read() as s:
        return s.execute(select(Generation).where(Generation.request_id == rid)).scalar_one()


def one_run(workdir: Path, backlog_size: int) -> dict:
    with horde_up(workdir) as h:
        http, db = h["http"], Database(h["db_url"])
        wait_for("the API", lambda: http.get(f"{API}/status/heartbeat").status_code == 200)
        # A backlog the head's one replica cannot clear before the node is ready.
        backlog = [submit(http, **LONG) for _ in range(backlog_size)]
        wait_for("the head busy", lambda: generation(db, backlog[0]).state == "processing")
        t_join = time.time()
        joined = cli("join", "--address", f"127.0.0.1:{h['port']}", "--token", h["token"],
                     "--api-key", h["key"], "--num-cpus", "1", "--models", "tiny-sd15",
                     "--key-file", str(workdir / "node_key.pem"))
        assert joined.returncode == 0, joined.stderr
        t_ray_joined = time.time()  # `ray start` on the node has returned
        worker = wait_for("the node's worker", lambda: node_worker(http))
        with db.read() as s:  # registered by the bridge once the node's proof verified
            t_registered = s.get(Worker, worker["id"]).created_at

        def node_job(states):
            with db.read() as s:
                return s.execute(select(Generation.request_id).where(
                    (Generation.claimed_by == worker["id"]) | (Generation.worker_id == worker["id"]),
                    Generation.state.in_(states))).scalars().first()

        first = wait_for("the first job on the node", lambda: node_job(("processing", "done")),
                         every=0.05)
        t_claimed = time.time()
        wait_for("it finished", lambda: generation(db, first).state == "done", every=0.05)
        t_first_done = time.time()
        for rid in backlog:  # the rest of the backlog out of the way
            http.delete(f"{API}/generate/status/{rid}", headers=ANON)

        def busy(claimer):
            with db.read() as s:
                return s.execute(select(Generation.id).where(
                    Generation.state == "processing", Generation.claimed_by == claimer)).first()

        head = next(w["id"] for w in http.get(f"{API}/workers").json()
                    if w["name"] == "rayhorde-cluster/stable_diffusion_1")
        # Replicas finish what they were doing (a cancel does not interrupt a pipeline call).
        wait_for("both replicas idle", lambda: not busy(head) and not busy(worker["id"]),
                 timeout=300)
        hold = submit(http, workers=[head], **LONG)  # the head (only) takes it ...
        wait_for("the head busy", lambda: generation(db, hold).state == "processing")
        victim = submit(http, **LONG)  # ... so the node takes this one
        wait_for("a job on the node", lambda: generation(db, victim).claimed_by == worker["id"],
                 every=0.05)
        time.sleep(0.5)  # inside the pipeline call
        with db.read() as s:
            node_id = s.get(Worker, worker["id"]).node_id
        t_kill = time.time()
        os.kill(raylet_of(node_id), signal.SIGKILL)
        wait_for("the job back in the queue", lambda: generation(db, victim).claimed_by != worker["id"],
                 every=0.05)
        t_back = time.time()
        wait_for("it finished on the head", lambda: generation(db, victim).state == "done",
                 timeout=300, every=0.05)
        t_done = time.time()
        db.dispose()
    return {"join -> node in Ray (join returns)": t_ray_joined - t_join,
            "join -> worker registered (proof)": t_registered - t_join,
            "join -> first job claimed": t_claimed - t_join,
            "join -> first job done": t_first_done - t_join,
            "death -> back in the queue": t_back - t_kill,
            "death -> done on the head": t_done - t_kill}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backlog", type=int, default=12, help="long jobs queued before the join")
    args = ap.parse_args()
    runs = [one_run(Path(tempfile.mkdtemp(prefix="rayhorde-bench-")), args.backlog)
            for _ in range(args.runs)]
    print(f"two nodes on loopback (head 2 CPUs, volunteer 1 CPU), tiny-sd15 1024x1024 50 steps, "
          f"{args.backlog} waiting at the join; {args.runs} runs")
    print(f"{'interval':<30}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name in runs[0]:
        xs = [r[name] for r in runs]
        print(f"{name:<30}{statistics.median(xs):>10.1f}{min(xs):>10.1f}{max(xs):>10.1f}")


if __name__ == "__main__":
    main()
