"""The builtin text engine: our own batched decode loop over a transformers causal LM (CPU or
GPU, nothing beyond the base install), the `engine: builtin` of a catalog entry and the default.

Sampling order per row, every step: repetition penalty, top_k, typical, top_p, min_p (each
renormalising what the previous one kept), temperature, then one uniform draw from the row's
own generator. A token always survives: top_k, top_p and min_p keep the most likely token left,
typical keeps the most typical one (which may not be the most likely). A row's tokens depend
only on its own job (prompt, seed, parameters), never on the other rows of its batch: exactly so
on CPU in float32 (tested); on a GPU, kernels picked by batch shape may round a logit
differently, which can rarely flip a sampled token relative to the same job run alone.

Batching: the deployment gathers the requests that arrive together (`gathers_batches`) and
hands them to `stream` as one batch, decoded as one loop: one forward pass per step for all
live rows against one KV cache. A request arriving while a batch decodes waits for that batch
to end (no continuous batching: that is what the vllm engine is for).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from deployments.jobs import TextJob
from deployments.llm_engines.base import FinishEvent, Step, TextEngine, eos_ids
from models import tiny_llm
from models.catalog import Family, ModelEntry

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BuiltinEngine(TextEngine):
    """A transformers model and its tokenizer, decoded by `decode_steps`."""

    kind: ClassVar[str] = "builtin"
    gathers_batches: ClassVar[bool] = True

    entry: ModelEntry
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    max_context_length: int
    eos_token_ids: frozenset[int]
    pad_token_id: int  # fills the left padding; masked out, so any valid id would do

    @classmethod
    def load(cls, entry: ModelEntry, device: str | torch.device) -> "BuiltinEngine":
        return load_llm(entry, device)

    async def stream(self, jobs: list[TextJob], prompt_ids: list[list[int]]) -> AsyncIterator[Step]:
        """`decode_steps` in a worker thread, its steps handed to the event loop as they come.
        Closing the stream early stops the loop at its next step."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        closed = threading.Event()
        end = object()

        def run() -> None:
            try:
                for step in decode_steps(self, jobs, prompt_ids):
                    if closed.is_set():
                        return
                    loop.call_soon_threadsafe(inbox.put_nowait, step)
            except Exception as e:  # noqa: BLE001 - raised again on the event loop
                loop.call_soon_threadsafe(inbox.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(inbox.put_nowait, end)

        worker = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            while (item := await inbox.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            closed.set()
            await worker


def torch_dtype(dtype_name: str, device: torch.device) -> torch.dtype:
    """The entry's dtype, except that float16 on a CPU becomes float32 (as models/loaders.py:
    CPU half-precision kernels are missing or slow; bfloat16 is kept)."""
    dtype = _DTYPES[dtype_name]
    return torch.float32 if dtype is torch.float16 and device.type == "cpu" else dtype


def load_llm(entry: ModelEntry, device: str | torch.device) -> BuiltinEngine:
    """The entry's model and tokenizer: builtin (models/tiny_llm.py) or from_pretrained of a
    Hugging Face repo id or a local folder holding both (as save_pretrained writes them)."""
    if entry.family is not Family.llm:
        raise ValueError(f"{entry.name} is a {entry.family.value} model, not {Family.llm.value}")
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
    eos = eos_ids(tokenizer, model.generation_config)
    if not eos:
        raise ValueError(f"{entry.name}: neither the tokenizer nor the generation config names an EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    return BuiltinEngine(entry, model, tokenizer, device, int(limit), frozenset(eos), pad)


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


@torch.inference_mode()
def decode_steps(engine: BuiltinEngine, jobs: list[TextJob], prompt_ids: list[list[int]]) -> Iterator[Step]:
    """The decode loop as a generator of steps, each the list of that step's events: for
    every live row in row order its TokenEvent, followed by its FinishEvent if it ended.
    One forward pass per step for all live rows: prompts are left-padded (attention mask
    zero on the padding, positions counted from each row's first real token) and decoded
    against one KV cache; finished rows leave the batch (and the cache), so they cost
    nothing more and never change."""
    if not jobs:
        return
    rows = engine.new_rows(jobs, prompt_ids)
    dev, model = engine.device, engine.model
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(jobs), width), engine.pad_token_id, dtype=torch.long)
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
        step: Step = []
        keep = []
        for i, (row, token_id) in enumerate(zip(rows, tokens.tolist())):
            step += row.events(token_id)
            if not isinstance(step[-1], FinishEvent):
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
