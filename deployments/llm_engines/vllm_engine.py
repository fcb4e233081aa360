"""The vllm engine (`engine: vllm` in the catalog): vLLM's AsyncLLM, with its continuous
batching and paged KV cache, for GPU replicas. vLLM is an optional extra
(`pip install -e '.[vllm]'`, never part of `make run` or `make test`: it brings its own CUDA
build of torch), imported only when a replica loads such a model.

The engine is built the way ray.serve.llm builds its vLLM engine from an LLMConfig
(ray/llm/_internal/serve/engines/vllm: the model id and source from the config, then
`engine_kwargs` into AsyncEngineArgs): here the catalog entry gives the model folder or repo,
its dtype and context limit, and the entry's `engine_kwargs` add the rest
(gpu_memory_utilization, max_num_seqs, enforce_eager, tensor_parallel_size, ...).

Each job becomes one vLLM request: the prompt as token ids (encoded and cut by
TextEngine.encode_prompt, exactly as for the builtin engine) and `sampling_params(job)`.
vLLM samples; the text, stop sequences, held-back streaming and the result come from the same
TextRow as the builtin engine's, fed vLLM's token ids, so the deployment's contract does not
change with the engine. What vLLM cannot do is named in each result's `warnings`
(ModelEntry.unsupported_text_params): locally typical sampling (`typical`), and a repetition
penalty over only the last `rep_pen_range` tokens (vLLM's covers the whole context). vLLM also
applies temperature before top_k / top_p / min_p, where the builtin engine applies it after
them, so the same seed and parameters give other text on the two engines (and on vLLM, a
request's tokens may depend on what it was batched with).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from deployments.jobs import TextJob
from deployments.llm_engines.base import FinishEvent, Step, TextEngine, TextRow, TokenEvent, eos_ids
from models.catalog import ModelEntry

VLLM_EXTRA = "pip install -e '.[vllm]'"


class EngineUnavailable(RuntimeError):
    """The engine a catalog entry names cannot run on this node (its package is missing)."""


def import_vllm(model_name: str) -> ModuleType:
    try:
        import vllm
    except ImportError as e:
        raise EngineUnavailable(
            f"{model_name}: `engine: vllm` needs the vllm package, which is not installed on this "
            f"node: {VLLM_EXTRA} (on a machine with an NVIDIA GPU; it brings its own CUDA build "
            f"of torch), or set `engine: builtin` for this model ({type(e).__name__}: {e})") from e
    return vllm


def engine_args(entry: ModelEntry, max_model_len: int) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for the entry: the model from the entry (the catalog's
    validator refuses engine_kwargs that would name it again), then its engine_kwargs."""
    w = entry.weights
    return {"model": w.path, "tokenizer": w.path, "served_model_name": entry.name, "dtype": w.dtype,
            "max_model_len": max_model_len, "seed": 0, **entry.engine_kwargs}


def sampling_params(vllm: ModuleType, job: TextJob, stop_token_ids: frozenset[int]) -> Any:
    """vllm.SamplingParams for the job. 0 means off for top_k and min_p on both sides, 1 for
    top_p and the repetition penalty; temperature 0 is greedy on both. Seeds are taken modulo
    2**63 (vLLM passes them on as signed 64-bit integers)."""
    return vllm.SamplingParams(
        n=1,
        temperature=job.temperature,
        top_p=job.top_p,
        top_k=job.top_k,
        min_p=job.min_p,
        repetition_penalty=job.rep_pen,
        seed=job.seed % 2**63,
        max_tokens=job.max_length,
        stop=list(job.stop_sequence) or None,
        stop_token_ids=sorted(stop_token_ids),
        skip_special_tokens=True,
    )


@dataclass
class VLLMEngine(TextEngine):
    kind: ClassVar[str] = "vllm"
    gathers_batches: ClassVar[bool] = False  # vLLM schedules requests itself, as they come

    entry: ModelEntry
    engine: Any  # vllm.AsyncLLMEngine
    vllm: ModuleType
    tokenizer: PreTrainedTokenizerBase
    max_context_length: int
    eos_token_ids: frozenset[int]

    @classmethod
    def load(cls, entry: ModelEntry, device: str | torch.device | None = None) -> "VLLMEngine":
        """Start vLLM on the entry's model. `device` is not used: vLLM takes the GPUs Ray gave
        the replica (CUDA_VISIBLE_DEVICES)."""
        vllm = import_vllm(entry.name)
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        path = entry.weights.path
        tokenizer = AutoTokenizer.from_pretrained(path)
        limit = entry.max_context_length or getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        if not limit:
            raise ValueError(f"{entry.name}: set max_context_length, the model config gives no position limit")
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation_config = None
        eos = eos_ids(tokenizer, generation_config)
        if not eos:
            raise ValueError(f"{entry.name}: neither the tokenizer nor the generation config names an EOS token")
        try:
            args = vllm.AsyncEngineArgs(**engine_args(entry, int(limit)))
        except TypeError as e:
            raise ValueError(f"{entry.name}: engine_kwargs: {e}") from None
        engine = vllm.AsyncLLMEngine.from_engine_args(args)
        return cls(entry, engine, vllm, tokenizer, int(limit), frozenset(eos))

    async def stream(self, jobs: list[TextJob], prompt_ids: list[list[int]]) -> AsyncIterator[Step]:
        """One vLLM request per job, their outputs merged as they come. A row that TextRow ends
        before vLLM does (say at a stop sequence it saw first) has its request aborted."""
        rows = self.new_rows(jobs, prompt_ids)
        inbox: asyncio.Queue[tuple[TextRow, Any]] = asyncio.Queue()

        async def follow(row: TextRow, ids: list[int]) -> None:
            try:
                async for output in self._generate(row.job, ids):
                    inbox.put_nowait((row, output))
                inbox.put_nowait((row, None))
            except Exception as e:  # noqa: BLE001 - raised again by the stream
                inbox.put_nowait((row, e))

        tasks = [asyncio.create_task(follow(row, ids)) for row, ids in zip(rows, prompt_ids)]
        live = {row.index for row in rows}
        seen = {row.index: 0 for row in rows}
        try:
            while live:
                row, output = await inbox.get()
                if row.index not in live:
                    continue  # what vLLM sent after the row ended
                if isinstance(output, Exception):
                    raise output
                if output is None:
                    raise RuntimeError(f"vLLM ended the request of row {row.index} without a finished output")
                step = self._take(row, output, seen)
                if row.finish_reason:
                    live.discard(row.index)
                    tasks[row.index].cancel()  # its request is aborted unless vLLM had finished it
                if step:
                    yield step
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _take(self, row: TextRow, output: Any, seen: dict[int, int]) -> Step:
        """The events of one vLLM output (cumulative: every token so far, the new ones past
        `seen`), ending the row where vLLM finished it and TextRow had not."""
        completion = output.outputs[0]
        new = list(completion.token_ids)[seen[row.index]:]
        seen[row.index] += len(new)
        step: Step = []
        for token_id in new:
            step += row.events(token_id)
            if row.finish_reason:
                return step
        if output.finished:
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM ended row {row.index}: {completion.finish_reason}")
            delta = row.end(completion.finish_reason)
            step += [TokenEvent(row.index, None, delta), FinishEvent(row.index, row.result())]
        return step

    async def _generate(self, job: TextJob, ids: list[int]) -> AsyncIterator[Any]:
        request_id = f"{self.entry.name}-{uuid.uuid4().hex}"
        prompt = self.vllm.TokensPrompt(prompt_token_ids=ids)
        params = sampling_params(self.vllm, job, self.eos_token_ids)
        finished = False
        try:
            async for output in self.engine.generate(prompt, params, request_id):
                finished = output.finished
                yield output
        finally:
            if not finished and self.engine is not None:  # closed early: free its KV cache now
                await self.engine.abort(request_id)

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()

    def __del__(self) -> None:
        # Serve's model multiplexer calls __del__ when it unloads the model (LRU): the engine's
        # processes and GPU memory go then, not whenever the garbage collector gets to it.
        self.close()
