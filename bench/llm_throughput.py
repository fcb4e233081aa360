"""Text generation throughput on tiny-llm: the batched decode loop (deployments/llm.py,
`TextGenerator.stream_batch`) against transformers' `model.generate`, one request at a time.

    .venv/bin/python bench/llm_throughput.py [--threads 2] [--max-length 64] [--concurrency 1 8 32]

For each concurrency c, c requests arrive together at t=0 (prompts of about 30 tokens, sampling
on: temperature 0.8, top_k 40, top_p 0.9, repetition penalty 1.1 over the whole context, each
request its own seed). Batched: one decode loop for all c. Sequential: a plain loop of
model.generate, request k starting when k-1 is done. Same model, same weights, same max_length,
same torch thread count on both sides.

Printed per side: generated tokens per second (all requests' tokens / wall time), and time to
first token from t=0, mean and worst over the c requests (the sequential worst includes
waiting for the requests before it, as a one-at-a-time server would make a client wait).
Each side runs --repeats times (same seeds, so the same tokens) and the fastest run is shown:
the machine is shared, and the fastest run is the one least disturbed by other work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from deployments.llm import TextGenerator, TextJob, TokenEvent  # noqa: E402
from models.tiny_llm import CORPUS  # noqa: E402

MODEL = {"name": "tiny-llm", "family": "llm", "weights": {"kind": "builtin", "path": "tiny-llm"}}
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.9, rep_pen=1.1, rep_pen_range=0, typical=1.0, min_p=0.0)
PROMPT_CHARS = 70  # about 30 tokens of the tiny tokenizer on this corpus


def prompts(count: int) -> list[str]:
    text = " ".join(CORPUS.split())
    step = (len(text) - PROMPT_CHARS) // max(count, 1)
    return [text[i * step: i * step + PROMPT_CHARS] for i in range(count)]


def batched(gen: TextGenerator, loaded, texts: list[str], max_length: int) -> dict:
    jobs = [TextJob.from_dict(dict(model="tiny-llm", prompt=t, seed=i, max_length=max_length,
                                   max_context_length=1024, **SAMPLING)) for i, t in enumerate(texts)]
    first: dict[int, float] = {}
    tokens = 0
    start = time.perf_counter()
    for step in gen.stream_batch(loaded, jobs):
        now = time.perf_counter() - start
        for event in step:
            if isinstance(event, TokenEvent):
                tokens += 1
                first.setdefault(event.row, now)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "ttft": list(first.values())}


class FirstTokenClock(BaseStreamer):
    """transformers calls put() with the prompt first, then with each new token."""

    def __init__(self, start: float):
        self.start, self.calls, self.first = start, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def sequential(loaded, texts: list[str], max_length: int) -> dict:
    model, tok = loaded.model, loaded.tokenizer
    tokens, ttft = 0, []
    start = time.perf_counter()
    for i, text in enumerate(texts):
        enc = tok(text, return_tensors="pt")
        clock = FirstTokenClock(start)
        torch.manual_seed(i)
        out = model.generate(**enc, max_new_tokens=max_length, do_sample=True, temperature=SAMPLING["temperature"],
                             top_k=SAMPLING["top_k"], top_p=SAMPLING["top_p"],
                             repetition_penalty=SAMPLING["rep_pen"], pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, streamer=clock)
        tokens += out.shape[1] - enc["input_ids"].shape[1]
        ttft.append(clock.first)
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "ttft": ttft}


def fastest(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["tokens"] / r["seconds"])


def line(name: str, r: dict) -> str:
    ms = [t * 1000 for t in r["ttft"]]
    return (f"  {name:<11} {r['tokens'] / r['seconds']:8.0f} tok/s   {r['tokens']:5d} tokens in {r['seconds']:6.2f} s"
            f"   TTFT mean {statistics.mean(ms):7.1f} ms, worst {max(ms):7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    parser.add_argument("--max-length", type=int, default=64, help="new tokens per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the fastest is shown")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    gen = TextGenerator([MODEL], device="cpu")
    loaded = gen.load("tiny-llm")
    params = sum(p.numel() for p in loaded.model.parameters())
    sample = prompts(max(args.concurrency))
    prompt_tokens = statistics.mean(len(loaded.tokenizer(t)["input_ids"]) for t in sample)
    print(f"tiny-llm: {params / 1e6:.1f}M parameters, vocab {len(loaded.tokenizer)}, torch threads "
          f"{torch.get_num_threads()}, max_length {args.max_length}, prompts {prompt_tokens:.0f} tokens on average")
    print(f"sampling: {SAMPLING}")
    batched(gen, loaded, sample[:2], 8)  # warm-up: first-call allocations, lazy imports
    sequential(loaded, sample[:1], 8)
    for c in args.concurrency:
        texts = prompts(c)
        b = fastest([batched(gen, loaded, texts, args.max_length) for _ in range(args.repeats)])
        s = fastest([sequential(loaded, texts, args.max_length) for _ in range(args.repeats)])
        speedup = (b["tokens"] / b["seconds"]) / (s["tokens"] / s["seconds"])
        print(f"concurrency {c}:  batched / sequential throughput = {speedup:.1f}x")
        print(line("batched", b))
        print(line("sequential", s))


if __name__ == "__main__":
    main()
