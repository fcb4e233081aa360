"""Text generation (the `llm` family): the job contract and its Ray Serve deployment. One
replica holds up to 2 models, picked by multiplexed model id, each run by the engine its
catalog entry names (deployments/llm_engines/: `builtin`, our batched decode loop over
transformers, the default; `vllm`, vLLM on a GPU). Everything here holds for both engines.

    handle.options(multiplexed_model_id=job["model"]).generate.remote(job)           -> result
    handle.options(multiplexed_model_id=job["model"], stream=True).generate_stream.remote(job)
                                                                                      -> items

A job (the dict sent to `LLMDeployment.generate`; deployments/jobs.py `TextJob`). JSON null
means the default. Unknown keys are refused, so a parameter the API forgot to map is an error
rather than a silently ignored setting.
    model (str)               catalog name; also the request's multiplexed model id
    prompt (str)              raw prompt, tokenized as is (special tokens in it, such as
                              "<|im_start|>", become special tokens); or instead:
    messages (list)           chat turns [{"role": str, "content": str}, ...], rendered with the
                              model's chat template plus the assistant generation prompt
    seed (int)                required; any integer (taken modulo 2**64 by the builtin engine,
                              2**63 by vLLM; a seed reproduces text on one engine only)
    max_length (int)          tokens to generate, >= 1 (default 80, the horde's)
    max_context_length (int)  prompt + generated tokens, > max_length (default 1024, the
                              horde's). The prompt keeps its LAST max_context_length -
                              max_length tokens (cut from the left, as KoboldAI does, so the
                              most recent text survives; a cut may drop the BOS token too).
    temperature (float)       >= 0; 0 = greedy (default 0.7)
    top_k (int)               >= 0; 0 = off (default 100)
    top_p (float)             (0, 1]; 1 = off (default 0.92)
    typical (float)           [0, 1]; 1 = off (default 1)
    min_p (float)             [0, 1]; 0 = off (default 0)
    rep_pen (float)           >= 1; 1 = off (default 1.1)
    rep_pen_range (int)       >= 0; the last N context tokens (prompt + generated) the penalty
                              looks at; 0 = the whole context (default 320)
    stop_sequence (list[str]) non-empty strings; generation stops at the first one to appear
                              in the generated text, which is cut before it (default none)
Defaults are koboldcpp's long-standing ones. Not implemented (refused as unknown keys): the
horde's tfs, top_a, rep_pen_slope, sampler_order, smoothing_factor, dynatemp_*.

Sampling: the engine's (deployments/llm_engines/builtin.py and vllm_engine.py say how each
samples, and what a seed reproduces). Parameters an engine cannot honour (vLLM: `typical`,
`rep_pen_range`) are named in the reply's `warnings`, and the job runs without them.

Batching: with the builtin engine, requests that reach a replica within 20 ms of each other
(up to 32) decode together, each model's as one loop; a request arriving while a batch decodes
waits for that batch to end (serve.batch runs one batch at a time per replica). A vllm model's
requests go to vLLM as they come, which batches them continuously.

The reply (`generate`): {"text": generated text (stop sequence and EOS not included),
"finish_reason": "length" | "stop" ("stop": EOS or a stop sequence), "prompt_tokens": tokens
of the prompt after the left cut, "completion_tokens": tokens generated (EOS and the tokens
that completed a stop sequence included), "seed": the job's seed, "node_id": Ray node id,
"replica": Serve's full replica id, "seconds": from the start of the batch's decode (prefill
included) to this row's end, "batch_size": rows decoded together (1 for vllm: vLLM batches
behind it), "warnings": the names of the job's parameters the engine did not honour}.

Errors: JobRejected (a ValueError) for a bad job (TextJob's checks, a model id that does not match
the job's model, or a job the model cannot serve: max_context_length or max_length over the
model's limits, messages for a model without a chat template); RuntimeError when loading the
model or decoding failed. A bad job fails alone, never the batch it would have joined.

Streaming (`generate_stream`) yields dicts {"delta": str}, text in the order generated, never
empty; the last item is {"delta": str (may be empty), "result": the reply above}. The deltas
concatenate to result["text"] exactly: text that could still turn out to be the start of a stop
sequence, and bytes of an unfinished UTF-8 character, are held back until they are settled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator

from ray import serve

from deployments.diffusion.common import check_model_id, family_entries
from deployments.diffusion.common import device as default_device
from deployments.jobs import JobRejected, TextJob
from deployments.llm_engines import FinishEvent, Step, TextEngine, TextRow, TokenEvent, build_engine, engine_class
from deployments.llm_engines.builtin import BuiltinEngine, SamplingParams, apply_repetition_penalty, decode_steps, \
    sample_next
from models.catalog import Family, ModelEntry

FAMILY = Family.llm
logger = logging.getLogger("ray.serve")
_Row = TextRow  # the name the unit tests know it by

__all__ = ["FinishEvent", "LLMDeployment", "SamplingParams", "TextGenerator", "TextJob", "TokenEvent",
           "apply_repetition_penalty", "sample_next"]


class TextGenerator:
    """The llm family's models of a deployment, each loaded into the engine its entry names; and
    the builtin engine's decode loop, driven directly (tests, benchmarks); no Ray needed."""

    def __init__(self, entries: list[ModelEntry] | list[dict], device: str | None = None):
        self.entries = family_entries(entries, FAMILY)
        self.device = device or default_device()

    def load(self, model_name: str) -> TextEngine:
        if model_name not in self.entries:
            raise ValueError(f"{model_name!r} is not one of this deployment's models: {sorted(self.entries)}")
        return build_engine(self.entries[model_name], self.device)

    def gathers_batches(self, model_name: str) -> bool:
        return engine_class(self.entries[model_name].engine).gathers_batches

    def encode_prompt(self, loaded: TextEngine, job: TextJob) -> list[int]:
        return loaded.encode_prompt(job)

    def generate_batch(self, loaded: BuiltinEngine, jobs: list[TextJob] | list[dict],
                       on_token: Callable[[int, str], None] | None = None,
                       on_finish: Callable[[int, dict], None] | None = None,
                       prompt_ids: list[list[int]] | None = None) -> list[dict]:
        """Generate for all jobs together; one result dict per job, in order (module docstring).
        `on_token(row, delta)` gets each row's text as it settles (non-empty deltas only; they
        concatenate to the row's final text); `on_finish(row, result)` gets each row's result
        the moment it ends, before slower rows are done."""
        results: list[dict | None] = [None] * len(jobs)
        for step in self.stream_batch(loaded, jobs, prompt_ids):
            for event in step:
                if isinstance(event, TokenEvent):
                    if event.delta and on_token is not None:
                        on_token(event.row, event.delta)
                else:
                    results[event.row] = event.result
                    if on_finish is not None:
                        on_finish(event.row, event.result)
        return results  # type: ignore[return-value]

    def stream_batch(self, loaded: BuiltinEngine, jobs: list[TextJob] | list[dict],
                     prompt_ids: list[list[int]] | None = None) -> Iterator[Step]:
        """The builtin decode loop (deployments/llm_engines/builtin.py decode_steps), blocking."""
        jobs = [j if isinstance(j, TextJob) else TextJob.from_dict(j) for j in jobs]
        if prompt_ids is None:
            prompt_ids = [loaded.encode_prompt(j) for j in jobs]
        return decode_steps(loaded, jobs, prompt_ids)


def step_items(step: Step, rows: list[int], start: float, batch_size: int, where: dict) -> list[tuple[int, dict]]:
    """A step's events as the deployment's items, by the caller's row: {"delta"} for settled
    text, {"result"} (with where it ran and how long it took) for an ending."""
    items: list[tuple[int, dict]] = []
    for event in step:
        if isinstance(event, TokenEvent):
            if event.delta:
                items.append((rows[event.row], {"delta": event.delta}))
        else:
            result = {**event.result, **where, "seconds": time.perf_counter() - start, "batch_size": batch_size}
            items.append((rows[event.row], {"result": result}))
    return items


# ---------------------------------------------------------------------------------------------
# The Serve deployment


@serve.deployment(name="llm", max_ongoing_requests=64)
class LLMDeployment:
    def __init__(self, models: list[dict]):  # ModelEntry.model_dump() dicts
        self.generator = TextGenerator(models)
        # One builtin decode loop at a time per replica: Serve runs the per-model sub-batches
        # of one batch concurrently, and two loops would only split the same cores / GPU.
        self._decode_lock = asyncio.Lock()
        self._where: dict | None = None

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_name: str) -> TextEngine:
        # Loading takes seconds to minutes: off the event loop, so the replica keeps answering.
        return await asyncio.to_thread(self.generator.load, model_name)

    async def generate(self, job: dict) -> dict:
        parsed = self._accept(job)
        async for item in self._items(parsed):
            _raise_if_error(item)
            if "result" in item:
                return item["result"]
        raise RuntimeError(f"the batch ended without a result for {parsed.model!r}")

    async def generate_stream(self, job: dict) -> AsyncGenerator[dict, None]:
        parsed = self._accept(job)
        async for item in self._items(parsed):
            _raise_if_error(item)
            if item["delta"] or "result" in item:
                yield item

    def _accept(self, job: dict) -> TextJob:
        """Refuse a bad job before it joins a batch, where it would take the others down."""
        parsed = TextJob.from_dict(job)
        check_model_id(parsed)
        if parsed.model not in self.generator.entries:
            known = sorted(self.generator.entries)
            raise JobRejected(f"{parsed.model!r} is not one of this deployment's models: {known}")
        return parsed

    def _items(self, job: TextJob) -> AsyncIterator[dict]:
        """This job's items: through serve.batch for an engine that decodes gathered batches,
        straight to the engine for one that schedules requests itself."""
        return self._batched(job) if self.generator.gathers_batches(job.model) else self._alone(job)

    async def _alone(self, job: TextJob) -> AsyncIterator[dict]:
        try:
            engine = await self.get_model(job.model)
        except Exception as e:  # noqa: BLE001 - reported as the builtin path reports it
            yield {"delta": "", "error": f"loading {job.model!r} failed: {type(e).__name__}: {e}", "invalid": False}
            return
        ids = await asyncio.to_thread(engine.encode_prompt, job)  # JobRejected: the caller's alone
        where, start = self._replica_location(), time.perf_counter()
        async for step in engine.stream([job], [ids]):
            for _, item in step_items(step, [0], start, 1, where):
                yield {"delta": "", **item}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def _batched(self, jobs: list[TextJob]) -> AsyncGenerator[list, None]:
        # Serve gives each caller the item at its index of every list yielded here.
        async for items in self.run_batch(jobs):
            yield items

    async def run_batch(self, jobs: list[TextJob]) -> AsyncGenerator[list, None]:
        """Decode the jobs that arrived together, each model's jobs as one decode loop,
        yielding one list per round with an item per job: a merged {"delta", maybe "result"}
        or {"error", "invalid"} item (invalid: the job does not fit the model, rather than the
        replica failing), an empty {"delta": ""} when that job has nothing new, and
        StopIteration (serve.batch's end-of-stream mark) once its result or error went out.
        Undecorated, so it runs without Serve (the unit tests drive it directly)."""
        inbox: asyncio.Queue[list[tuple[int, dict]] | None] = asyncio.Queue()
        task = asyncio.create_task(self._decode_groups(jobs, inbox.put_nowait))
        task.add_done_callback(lambda _: inbox.put_nowait(None))
        pending: list[dict] = [{"delta": ""} for _ in jobs]
        ended = [False] * len(jobs)
        try:
            while not all(ended):
                posts = [await inbox.get()]
                while not inbox.empty():
                    posts.append(inbox.get_nowait())
                for items in posts:
                    if items is None:  # the decode is over: a job still without an ending failed
                        failure = task.exception()
                        reason = (f"decoding failed: {type(failure).__name__}: {failure}" if failure
                                  else "internal error: the decode gave this job no result")
                        for i, item in enumerate(pending):
                            if not ended[i] and not {"result", "error"} & set(item):
                                item.update(error=reason, invalid=False)
                        continue
                    for row, item in items:
                        if ended[row] or {"result", "error"} & set(pending[row]):
                            continue  # a job's first ending stands
                        merged = pending[row]
                        merged["delta"] += item.get("delta", "")
                        merged.update({k: v for k, v in item.items() if k != "delta"})
                out: list = []
                for i, item in enumerate(pending):
                    if ended[i]:
                        out.append(StopIteration)
                        continue
                    out.append(item)
                    ended[i] = bool({"result", "error"} & set(item))
                    pending[i] = {"delta": ""}
                yield out
        finally:
            # Closed early or not, the decode runs to its end; wait for it so the next batch
            # does not start beside it. Its failure, if any, went to the jobs above.
            try:
                await task
            except Exception:  # noqa: BLE001
                logger.exception("text decode failed")

    async def _decode_groups(self, jobs: list[TextJob], post: Callable[[list[tuple[int, dict]]], None]) -> None:
        where = self._replica_location()
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.model, []).append(i)
        async with self._decode_lock:
            for model_name, rows in groups.items():
                try:
                    engine = await self.get_model(model_name)
                except Exception as e:  # noqa: BLE001 - reported to each of its callers
                    reason = f"loading {model_name!r} failed: {type(e).__name__}: {e}"
                    post([(r, {"error": reason, "invalid": False}) for r in rows])
                    continue
                await self._decode_group(engine, [(r, jobs[r]) for r in rows], post, where)

    async def _decode_group(self, engine: TextEngine, rows: list[tuple[int, TextJob]],
                            post: Callable[[list[tuple[int, dict]]], None], where: dict) -> None:
        """Encode each prompt (a job that does not fit the model fails alone), then decode the
        rest together, posting each step's deltas and endings."""
        def encode_all() -> tuple[list[int], list[TextJob], list[list[int]], list[tuple[int, dict]]]:
            batch_rows, batch_jobs, batch_ids, refused = [], [], [], []
            for r, job in rows:
                try:
                    batch_ids.append(engine.encode_prompt(job))
                except ValueError as e:
                    refused.append((r, {"error": str(e), "invalid": True}))
                    continue
                batch_rows.append(r)
                batch_jobs.append(job)
            return batch_rows, batch_jobs, batch_ids, refused

        batch_rows, batch_jobs, batch_ids, refused = await asyncio.to_thread(encode_all)
        if refused:
            post(refused)
        if not batch_jobs:
            return
        start = time.perf_counter()
        try:
            async for step in engine.stream(batch_jobs, batch_ids):
                items = step_items(step, batch_rows, start, len(batch_jobs), where)
                if items:
                    post(items)
        except Exception as e:  # noqa: BLE001 - fails the jobs still running, not the replica
            reason = f"decoding failed: {type(e).__name__}: {e}"
            post([(r, {"error": reason, "invalid": False}) for r in batch_rows])

    def _replica_location(self) -> dict:
        """node_id and replica for the results (as image_common.ReplicaRunner reports them)."""
        if self._where is None:
            from ray import get_runtime_context

            self._where = {"node_id": get_runtime_context().get_node_id(),
                           "replica": serve.get_replica_context().replica_id.to_full_id_str()}
        return self._where


def _raise_if_error(item: dict) -> None:
    if "error" in item:
        raise (JobRejected if item["invalid"] else RuntimeError)(item["error"])
