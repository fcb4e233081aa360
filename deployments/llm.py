"""Text generation (the `llm` family): the job contract, the batched decode loop that runs many
jobs at once on a transformers causal LM, and its Ray Serve deployment (one replica holds up to
2 models, picked by multiplexed model id; requests arriving together are decoded together).

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
    seed (int)                required; any integer (the generator takes it modulo 2**64)
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

Sampling order per row, every step: repetition penalty, top_k, typical, top_p, min_p (each
renormalising what the previous one kept), temperature, then one uniform draw from the row's
own generator. A token always survives: top_k, top_p and min_p keep the most likely token left,
typical keeps the most typical one (which may not be the most likely). A row's tokens depend
only on its own job (prompt, seed, parameters), never on the other rows of its batch: exactly so
on CPU in float32 (tested); on a GPU, kernels picked by batch shape may round a logit
differently, which can rarely flip a sampled token relative to the same job run alone.

Batching: requests that reach a replica within 20 ms of each other (up to 32) decode together,
each model's as one loop; a request arriving while a batch decodes waits for that batch to end
(serve.batch runs one batch at a time per replica; there is no continuous batching).

The reply (`generate`): {"text": generated text (stop sequence and EOS not included),
"finish_reason": "length" | "stop" ("stop": EOS or a stop sequence), "prompt_tokens": tokens
of the prompt after the left cut, "completion_tokens": tokens generated (EOS and the tokens
that completed a stop sequence included), "seed": the job's seed, "node_id": Ray node id,
"replica": Serve's full replica id, "seconds": from the start of the batch's decode (prefill
included) to this row's end, "batch_size": rows decoded together}.

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
import math
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deployments.diffusion.common import check_model_id, family_entries
from deployments.diffusion.common import device as default_device
from deployments.jobs import JobRejected, TextJob
from models import tiny_llm
from models.catalog import Family, ModelEntry

FAMILY = Family.llm
logger = logging.getLogger("ray.serve")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# The job


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedLLM:
    entry: ModelEntry
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    max_context_length: int  # the entry's limit, or the model's own position limit
    eos_token_ids: frozenset[int]
    pad_token_id: int  # fills the left padding; masked out, so any valid id would do


def torch_dtype(dtype_name: str, device: torch.device) -> torch.dtype:
    """The entry's dtype, except that float16 on a CPU becomes float32 (as models/loaders.py:
    CPU half-precision kernels are missing or slow; bfloat16 is kept)."""
    dtype = _DTYPES[dtype_name]
    return torch.float32 if dtype is torch.float16 and device.type == "cpu" else dtype


def load_llm(entry: ModelEntry, device: str | torch.device) -> LoadedLLM:
    """The entry's model and tokenizer: builtin (models/tiny_llm.py) or from_pretrained of a
    Hugging Face repo id or a local folder holding both (as save_pretrained writes them)."""
    if entry.family is not FAMILY:
        raise ValueError(f"{entry.name} is a {entry.family.value} model, not {FAMILY.value}")
    device = torch.device(device)
    w = entry.weights
    if w.kind == "builtin":
        try:
            build = tiny_llm.BUILTIN[w.path]
        except KeyError:
            raise ValueError(f"{entry.name}: no builtin LLM {w.path!r}; known: {sorted(tiny_llm.BUILTIN)}")
        model, tokenizer = build()
        model = model.to(device=device, dtype=torch_dtype(w.dtype, device))
    elif w.kind == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(w.path, dtype=torch_dtype(w.dtype, device), variant=w.variant)
        model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(w.path)
    else:
        raise ValueError(f"{entry.name}: llm weights must be builtin or pretrained, not {w.kind}")
    model.eval()
    limit = entry.max_context_length or getattr(model.config, "max_position_embeddings", None)
    if not limit:
        raise ValueError(f"{entry.name}: set max_context_length, the model config gives no position limit")
    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ValueError(f"{entry.name}: neither the tokenizer nor the generation config names an EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return LoadedLLM(entry, model, tokenizer, device, int(limit), frozenset(eos), pad)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """EOS ids from the tokenizer and the generation config: chat models often end turns with a
    token the tokenizer does not call EOS (Qwen's <|im_end|>) but generation_config does."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass
class SamplingParams:
    """One row per live job, as tensors on the model's device, plus whether any row uses each
    filter (so a batch where nobody asked for, say, typical sampling skips its extra sort)."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    typical: torch.Tensor
    min_p: torch.Tensor
    rep_pen: torch.Tensor
    rep_pen_range: torch.Tensor
    generators: list[torch.Generator]
    uses: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_jobs(cls, jobs: list[TextJob], device: torch.device) -> "SamplingParams":
        def col(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(j, name) for j in jobs], dtype=dtype, device=device)

        # CPU generators: the same draws whichever device the model runs on.
        gens = [torch.Generator("cpu").manual_seed(j.seed % 2**64) for j in jobs]
        return cls(col("temperature", torch.float32), col("top_k", torch.long), col("top_p", torch.float32),
                   col("typical", torch.float32), col("min_p", torch.float32), col("rep_pen", torch.float32),
                   col("rep_pen_range", torch.long), gens)._with_uses()

    def select(self, rows: list[int]) -> "SamplingParams":
        idx = torch.tensor(rows, device=self.temperature.device)
        return SamplingParams(self.temperature[idx], self.top_k[idx], self.top_p[idx], self.typical[idx],
                              self.min_p[idx], self.rep_pen[idx], self.rep_pen_range[idx],
                              [self.generators[i] for i in rows])._with_uses()

    def _with_uses(self) -> "SamplingParams":
        self.uses = {
            "sampling": bool((self.temperature > 0).any()),
            "top_k": bool((self.top_k > 0).any()),
            "top_p": bool((self.top_p < 1).any()),
            "typical": bool((self.typical < 1).any()),
            "min_p": bool((self.min_p > 0).any()),
            "rep_pen": bool((self.rep_pen != 1).any()),
        }
        return self


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, history_valid: torch.Tensor,
                             p: SamplingParams) -> torch.Tensor:
    """CTRL's penalty, as KoboldAI and transformers apply it: the logit of every token seen in
    the row's last rep_pen_range context tokens is divided by rep_pen if positive, multiplied
    if negative. The context is left-aligned padding then tokens, so the last N positions are
    the last N tokens."""
    width = history.shape[1]
    position = torch.arange(width, device=history.device)
    in_range = (p.rep_pen_range == 0)[:, None] | (position[None, :] >= width - p.rep_pen_range[:, None])
    weight = (history_valid & in_range).to(logits.dtype)
    seen = torch.zeros_like(logits).scatter_add_(1, history, weight) > 0
    penalty = p.rep_pen[:, None]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _typical_removed(sorted_logits: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): keep the tokens whose surprise is closest to
    the distribution's entropy until they hold `mass` of the probability. Positions are those
    of `sorted_logits`; already-removed tokens are -inf there."""
    logp = torch.log_softmax(sorted_logits, dim=-1)
    prob = logp.exp()
    entropy = -(prob * logp.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
    order = (-logp - entropy).abs().argsort(dim=-1, stable=True)  # removed tokens: inf, last
    prob_in_order = prob.gather(1, order)
    before = prob_in_order.cumsum(-1) - prob_in_order
    remove_in_order = before >= mass[:, None]
    remove_in_order[:, 0] = False
    return torch.zeros_like(remove_in_order).scatter(1, order, remove_in_order)


def sample_next(logits: torch.Tensor, history: torch.Tensor, history_valid: torch.Tensor,
                p: SamplingParams) -> torch.Tensor:
    """The next token of every row (module docstring: sampling order). Each row draws exactly
    one uniform from its own generator per step, so its choices depend on nothing else."""
    logits = logits.float()
    if p.uses["rep_pen"]:
        logits = apply_repetition_penalty(logits, history, history_valid, p)
    greedy = logits.argmax(dim=-1)
    if not p.uses["sampling"]:
        return greedy
    n, vocab = logits.shape
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    removed = torch.zeros_like(sorted_logits, dtype=torch.bool)
    rank = torch.arange(vocab, device=logits.device)[None, :]

    def kept() -> torch.Tensor:
        return sorted_logits.masked_fill(removed, -math.inf)

    if p.uses["top_k"]:
        removed |= (p.top_k > 0)[:, None] & (rank >= p.top_k[:, None])
    if p.uses["typical"]:
        removed |= (p.typical < 1)[:, None] & _typical_removed(kept(), p.typical)
    if p.uses["top_p"]:
        prob = torch.softmax(kept(), dim=-1)
        before = prob.cumsum(-1) - prob  # mass of the more likely tokens
        removed |= (p.top_p < 1)[:, None] & (before >= p.top_p[:, None])
    if p.uses["min_p"]:
        prob = torch.softmax(kept(), dim=-1)
        removed |= prob < (p.min_p * prob.amax(dim=-1))[:, None]  # the top may be gone (typical)
    temperature = p.temperature.clamp(min=1e-6)[:, None]  # greedy rows' values are unused
    prob = torch.softmax(kept() / temperature, dim=-1)
    cdf = prob.double().cumsum(-1)
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in p.generators]).to(cdf.device)
    pick = (cdf < uniform[:, None] * cdf[:, -1:]).sum(-1).clamp(max=vocab - 1)
    sampled = sorted_ids.gather(1, pick[:, None]).squeeze(1)
    return torch.where(p.temperature > 0, sampled, greedy)


# ---------------------------------------------------------------------------------------------
# The decode loop


@dataclass(frozen=True)
class TokenEvent:
    """Row `row` produced a token; `delta` is the text it settles (often "", see `_Row`)."""

    row: int
    token_id: int
    delta: str


@dataclass(frozen=True)
class FinishEvent:
    row: int
    result: dict


FinishReason = Literal["length", "stop"]


class _Row:
    """One job's text while it decodes. `text` is the decoded completion; `streamed` is how much
    of it has been handed out as deltas: never text that a later token could still change (the
    replacement character of an unfinished UTF-8 sequence) or cut (a possible stop sequence
    start)."""

    def __init__(self, index: int, job: TextJob, prompt_tokens: int, tokenizer: PreTrainedTokenizerBase,
                 eos_ids: frozenset[int]):
        self.index, self.job, self.prompt_tokens = index, job, prompt_tokens
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.token_ids: list[int] = []  # completion tokens, EOS excluded
        self.completion_tokens = 0
        self.text = ""
        self.streamed = ""  # the text handed out so far, a prefix of every later `text`
        self.finish_reason: FinishReason | None = None

    def advance(self, token_id: int) -> str:
        """Take the next token; return the newly settled text (the rest, once finished)."""
        self.completion_tokens += 1
        if token_id in self.eos_ids:
            self.finish_reason = "stop"
        else:
            self.token_ids.append(token_id)
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False)
            cut = min((i for i in (self.text.find(s) for s in self.job.stop_sequence) if i >= 0), default=None)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
            elif self.completion_tokens >= self.job.max_length:
                self.finish_reason = "length"
        settled = self.text if self.finish_reason else self._settled()
        if not settled.startswith(self.streamed):
            # Would mean decode(ids[:n]) is not a prefix of decode(ids[:n+1]) beyond the held
            # back tail: streamed text cannot be taken back, so fail loudly.
            raise RuntimeError(f"row {self.index}: decoded text changed behind the streamed part")
        delta = settled[len(self.streamed):]
        self.streamed = settled
        return delta

    def _settled(self) -> str:
        text = self.text.rstrip("\ufffd")
        held = 0
        for stop in self.job.stop_sequence:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return text[: len(text) - held]

    def result(self) -> dict:
        return {"text": self.text, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "seed": self.job.seed}


class TextGenerator:
    """Runs text jobs on the llm family's models; no Ray needed."""

    def __init__(self, entries: list[ModelEntry] | list[dict], device: str | None = None):
        self.entries = family_entries(entries, FAMILY)
        self.device = device or default_device()

    def load(self, model_name: str) -> LoadedLLM:
        if model_name not in self.entries:
            raise ValueError(f"{model_name!r} is not one of this deployment's models: {sorted(self.entries)}")
        return load_llm(self.entries[model_name], self.device)

    def encode_prompt(self, loaded: LoadedLLM, job: TextJob) -> list[int]:
        """The job's prompt tokens, cut from the left to its prompt budget; JobRejected when the
        job does not fit the model."""
        entry = loaded.entry
        if job.model != entry.name:
            raise JobRejected(f"model: job is for {job.model!r}, not {entry.name!r}")
        if job.max_context_length > loaded.max_context_length:
            raise JobRejected(f"max_context_length: {entry.name} serves at most {loaded.max_context_length}, "
                             f"got {job.max_context_length}")
        if entry.max_length is not None and job.max_length > entry.max_length:
            raise JobRejected(f"max_length: {entry.name} generates at most {entry.max_length}, got {job.max_length}")
        tok = loaded.tokenizer
        if job.messages is not None:
            if not tok.chat_template:
                raise JobRejected(f"messages: {entry.name} has no chat template; send a prompt instead")
            text = tok.apply_chat_template([m.model_dump() for m in job.messages], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]  # the template wrote BOS itself
        else:
            ids = tok(job.prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise JobRejected("prompt: encodes to no tokens; a model needs at least one to continue from")
        return ids[-job.prompt_budget:]

    def generate_batch(self, loaded: LoadedLLM, jobs: list[TextJob] | list[dict],
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

    @torch.inference_mode()
    def stream_batch(self, loaded: LoadedLLM, jobs: list[TextJob] | list[dict],
                     prompt_ids: list[list[int]] | None = None) -> Iterator[list[TokenEvent | FinishEvent]]:
        """The decode loop as a generator of steps, each the list of that step's events: for
        every live row in row order its TokenEvent, followed by its FinishEvent if it ended.
        One forward pass per step for all live rows: prompts are left-padded (attention mask
        zero on the padding, positions counted from each row's first real token) and decoded
        against one KV cache; finished rows leave the batch (and the cache), so they cost
        nothing more and never change."""
        jobs = [j if isinstance(j, TextJob) else TextJob.from_dict(j) for j in jobs]
        if not jobs:
            return
        if prompt_ids is None:
            prompt_ids = [self.encode_prompt(loaded, j) for j in jobs]
        elif len(prompt_ids) != len(jobs):
            raise ValueError(f"prompt_ids: {len(prompt_ids)} prompts for {len(jobs)} jobs")
        dev, model = loaded.device, loaded.model
        rows = [_Row(i, job, len(ids), loaded.tokenizer, loaded.eos_token_ids)
                for i, (job, ids) in enumerate(zip(jobs, prompt_ids))]
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(jobs), width), loaded.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, width - len(ids):] = 1
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        params = SamplingParams.from_jobs(jobs, dev)
        history, history_valid = input_ids, mask.bool()

        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
        while True:
            tokens = sample_next(logits, history, history_valid, params)
            step: list[TokenEvent | FinishEvent] = []
            keep = []
            for i, (row, token_id) in enumerate(zip(rows, tokens.tolist())):
                step.append(TokenEvent(row.index, token_id, row.advance(token_id)))
                if row.finish_reason:
                    step.append(FinishEvent(row.index, row.result()))
                else:
                    keep.append(i)
            yield step
            if not keep:
                return
            if len(keep) < len(rows):
                idx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(idx)
                rows, params = [rows[i] for i in keep], params.select(keep)
                tokens, mask, history, history_valid = tokens[idx], mask[idx], history[idx], history_valid[idx]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
            history = torch.cat([history, tokens[:, None]], dim=1)
            history_valid = torch.cat([history_valid, history_valid.new_ones((len(rows), 1))], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                        past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1, :]


# ---------------------------------------------------------------------------------------------
# The Serve deployment


@serve.deployment(name="llm", max_ongoing_requests=64)
class LLMDeployment:
    def __init__(self, models: list[dict]):  # ModelEntry.model_dump() dicts
        self.generator = TextGenerator(models)
        # One decode loop at a time per replica: Serve runs the per-model sub-batches of one
        # batch concurrently, and two loops would only split the same cores / GPU.
        self._decode_lock = asyncio.Lock()
        self._where: dict | None = None

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_name: str) -> LoadedLLM:
        # Loading takes seconds to minutes: off the event loop, so the replica keeps answering.
        return await asyncio.to_thread(self.generator.load, model_name)

    async def generate(self, job: dict) -> dict:
        parsed = self._accept(job)
        async for item in self._batched(parsed):
            _raise_if_error(item)
            if "result" in item:
                return item["result"]
        raise RuntimeError(f"the batch ended without a result for {parsed.model!r}")

    async def generate_stream(self, job: dict) -> AsyncGenerator[dict, None]:
        parsed = self._accept(job)
        async for item in self._batched(parsed):
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
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[list[tuple[int, dict]] | None] = asyncio.Queue()

        def post(items: list[tuple[int, dict]]) -> None:  # from the decode thread: one call per step
            loop.call_soon_threadsafe(inbox.put_nowait, items)

        task = asyncio.create_task(self._decode_groups(jobs, post))
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
            # Closed early or not, the decode thread runs to its end; wait for it so the next
            # batch does not start beside it. Its failure, if any, went to the jobs above.
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
                    loaded = await self.get_model(model_name)
                except Exception as e:  # noqa: BLE001 - reported to each of its callers
                    reason = f"loading {model_name!r} failed: {type(e).__name__}: {e}"
                    post([(r, {"error": reason, "invalid": False}) for r in rows])
                    continue
                await asyncio.to_thread(self._decode_group, loaded, [(r, jobs[r]) for r in rows], post, where)

    def _decode_group(self, loaded: LoadedLLM, rows: list[tuple[int, TextJob]],
                      post: Callable[[list[tuple[int, dict]]], None], where: dict) -> None:
        """Blocking (runs in a thread): encode each prompt (a job that does not fit the model
        fails alone), then decode the rest together, posting each step's deltas and endings."""
        batch_rows, batch_jobs, batch_ids, refused = [], [], [], []
        for r, job in rows:
            try:
                batch_ids.append(self.generator.encode_prompt(loaded, job))
            except ValueError as e:
                refused.append((r, {"error": str(e), "invalid": True}))
                continue
            batch_rows.append(r)
            batch_jobs.append(job)
        if refused:
            post(refused)
        if not batch_jobs:
            return
        start = time.perf_counter()
        try:
            for step in self.generator.stream_batch(loaded, batch_jobs, prompt_ids=batch_ids):
                items: list[tuple[int, dict]] = []
                for event in step:
                    if isinstance(event, TokenEvent):
                        if event.delta:
                            items.append((batch_rows[event.row], {"delta": event.delta}))
                    else:
                        result = {**event.result, **where, "seconds": time.perf_counter() - start,
                                  "batch_size": len(batch_jobs)}
                        items.append((batch_rows[event.row], {"result": result}))
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
