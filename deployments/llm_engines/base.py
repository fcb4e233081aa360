"""The text engine interface: what the LLM deployment (deployments/llm.py) asks of an engine,
whichever runs the model, and the text bookkeeping every engine shares.

    engine = build_engine(entry, device)        # deployments/llm_engines/__init__.py
    ids = engine.encode_prompt(job)             # JobRejected when the job does not fit the model
    async for step in engine.stream(jobs, prompt_ids):
        for event in step: ...                  # TokenEvent, then FinishEvent when a row ends

An engine holds one loaded model (`entry`, its tokenizer, its context limit and EOS tokens).
`stream` runs a list of jobs and yields steps: lists of events, each row's TokenEvent for the
tokens it produced (with the text that settled, often "") and its FinishEvent once it ended,
carrying the result (deployments/llm.py's module docstring: text, finish_reason,
prompt_tokens, completion_tokens, seed, warnings). `warnings` names the job's parameters the
engine could not honour (ModelEntry.unsupported_text_params), [] when it honoured them all.

What a row's text is, where a stop sequence cuts it, what streams and what is held back, is
decided here (`TextRow`) from the sampled token ids, for every engine alike: the engines differ
only in how they pick the tokens. `gathers_batches` tells the deployment whether to gather
requests that arrive together into one `stream` call (the builtin loop decodes one batch at
a time) or to hand each request over as it comes (vLLM schedules requests itself).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from transformers import PreTrainedTokenizerBase

from deployments.jobs import JobRejected, TextJob
from models.catalog import ModelEntry

FinishReason = Literal["length", "stop"]


@dataclass(frozen=True)
class TokenEvent:
    """Row `row` produced a token; `delta` is the text it settles (often "", see `TextRow`).
    `token_id` None: no new token, the text held back until the engine ended the row."""

    row: int
    token_id: int | None
    delta: str


@dataclass(frozen=True)
class FinishEvent:
    row: int
    result: dict


Step = list[TokenEvent | FinishEvent]


class TextRow:
    """One job's text while it decodes. `text` is the decoded completion; `streamed` is how much
    of it has been handed out as deltas: never text that a later token could still change (the
    replacement character of an unfinished UTF-8 sequence) or cut (a possible stop sequence
    start)."""

    def __init__(self, index: int, job: TextJob, prompt_tokens: int, tokenizer: PreTrainedTokenizerBase,
                 eos_ids: frozenset[int], warnings: list[str] | tuple[str, ...] = ()):
        self.index, self.job, self.prompt_tokens = index, job, prompt_tokens
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.warnings = list(warnings)
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
            # Without NUL characters: byte-level vocabularies (Llama's <0x00>, the tiny model's
            # byte symbols) can sample one, PostgreSQL text cannot hold it, and the API refuses
            # it in a worker's submit; dropping a character keeps every earlier text a prefix.
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False
                                              ).replace("\x00", "")
            cut = min((i for i in (self.text.find(s) for s in self.job.stop_sequence) if i >= 0), default=None)
            if cut is not None:
                self.text = self.text[:cut]
                self.finish_reason = "stop"
            elif self.completion_tokens >= self.job.max_length:
                self.finish_reason = "length"
        return self._settle(self.text if self.finish_reason else self._settled())

    def end(self, reason: FinishReason) -> str:
        """The engine stopped the row on its own (say its own stop-string check or length
        limit fired where ours had not yet): finish with `reason`; return the rest of the text."""
        self.finish_reason = reason
        return self._settle(self.text)

    def _settle(self, settled: str) -> str:
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
                "completion_tokens": self.completion_tokens, "seed": self.job.seed,
                "warnings": list(self.warnings)}

    def events(self, token_id: int) -> Step:
        """The events of taking `token_id`: its TokenEvent, and the FinishEvent if it ended the row."""
        step: Step = [TokenEvent(self.index, token_id, self.advance(token_id))]
        if self.finish_reason:
            step.append(FinishEvent(self.index, self.result()))
        return step


def eos_ids(tokenizer: PreTrainedTokenizerBase, generation_config: object | None) -> set[int]:
    """EOS ids from the tokenizer and the generation config: chat models often end turns with a
    token the tokenizer does not call EOS (Qwen's <|im_end|>) but generation_config does."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


class TextEngine(ABC):
    """One loaded text model and the engine that runs it (module docstring)."""

    kind: ClassVar[str]
    gathers_batches: ClassVar[bool]

    entry: ModelEntry
    tokenizer: PreTrainedTokenizerBase
    max_context_length: int  # the entry's limit, or the model's own position limit
    eos_token_ids: frozenset[int]

    def encode_prompt(self, job: TextJob) -> list[int]:
        """The job's prompt tokens, cut from the left to its prompt budget; JobRejected when the
        job does not fit the model."""
        entry = self.entry
        if job.model != entry.name:
            raise JobRejected(f"model: job is for {job.model!r}, not {entry.name!r}")
        if job.max_context_length > self.max_context_length:
            raise JobRejected(f"max_context_length: {entry.name} serves at most {self.max_context_length}, "
                              f"got {job.max_context_length}")
        if entry.max_length is not None and job.max_length > entry.max_length:
            raise JobRejected(f"max_length: {entry.name} generates at most {entry.max_length}, got {job.max_length}")
        tok = self.tokenizer
        if job.messages is not None:
            if not tok.chat_template:
                raise JobRejected(f"messages: {entry.name} has no chat template; send a prompt instead")
            text = tok.apply_chat_template([m.model_dump() for m in job.messages], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]  # the template wrote BOS itself
        else:
            ids = tok(job.prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise JobRejected("prompt: encodes to no tokens; a model needs at least one to continue from")
        return ids[-job.prompt_budget:]

    def unsupported_params(self, job: TextJob) -> list[str]:
        """The job's parameters this engine cannot honour (named in the result's `warnings`)."""
        return self.entry.unsupported_text_params(job.model_dump())

    def new_rows(self, jobs: list[TextJob], prompt_ids: list[list[int]]) -> list[TextRow]:
        if len(prompt_ids) != len(jobs):
            raise ValueError(f"prompt_ids: {len(prompt_ids)} prompts for {len(jobs)} jobs")
        return [TextRow(i, job, len(ids), self.tokenizer, self.eos_token_ids, self.unsupported_params(job))
                for i, (job, ids) in enumerate(zip(jobs, prompt_ids))]

    @classmethod
    @abstractmethod
    def load(cls, entry: ModelEntry, device: str | torch.device) -> "TextEngine":
        """The entry's model, loaded and ready to stream."""

    @abstractmethod
    def stream(self, jobs: list[TextJob], prompt_ids: list[list[int]]) -> AsyncIterator[Step]:
        """Run the jobs (their prompts already encoded); yield steps of events (module
        docstring). Every job gets exactly one FinishEvent unless the stream raises."""

    def close(self) -> None:
        """Free what the engine holds beyond Python objects (processes, GPU memory)."""
