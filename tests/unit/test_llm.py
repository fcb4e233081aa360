"""The text-generation engine (deployments/llm.py) on the tiny built-in Llama
(models/tiny_llm.py), without Ray: tokenizer, chat template, loading, the job contract, batched
decoding (determinism, per-row sampling parameters, stop sequences, lengths, context cut),
streaming, the deployment's batch merging, and the catalog's llm family."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.llm import (
    FinishEvent,
    LLMDeployment,
    SamplingParams,
    TextGenerator,
    TextJob,
    TokenEvent,
    _Row,
    apply_repetition_penalty,
    sample_next,
)
from models.catalog import Catalog, Family, ModelEntry, load_catalog
from models.tiny_llm import CHAT_TEMPLATE, build_model, build_tiny_llm, build_tokenizer

TINY = {"name": "tiny-llm", "family": "llm", "weights": {"kind": "builtin", "path": "tiny-llm"}}
PROMPT = "Once upon a time, in a kingdom by the sea, the dragon"
# All filters off: a plain draw at temperature 1.
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, typical=1.0, min_p=0.0, rep_pen=1.0, rep_pen_range=0)


def job(**overrides) -> TextJob:
    base = dict(model="tiny-llm", prompt=PROMPT, seed=1, max_length=24, **PLAIN)
    base.update(overrides)
    if "messages" in overrides:
        base.pop("prompt")
    return TextJob.from_dict(base)


@pytest.fixture(scope="module")
def gen() -> TextGenerator:
    torch.set_num_threads(2)
    return TextGenerator([TINY], device="cpu")


@pytest.fixture(scope="module")
def loaded(gen):
    return gen.load("tiny-llm")


def texts(gen, loaded, jobs) -> list[str]:
    return [r["text"] for r in gen.generate_batch(loaded, jobs)]


# --- tokenizer and model ------------------------------------------------------------------------


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_tokenizer_round_trips_any_text(loaded, text):
    tok = loaded.tokenizer
    assert tok.decode(tok.encode(text, add_special_tokens=False), clean_up_tokenization_spaces=False) == text


@pytest.mark.timeout(30)
def test_tokenizer_handles_scripts_emoji_and_control_characters(loaded):
    tok = loaded.tokenizer
    for text in ["héllo wörld", "日本語のテキスト", "emoji 🐉🏰✨ and ZWJ 👩‍🚀", "tabs\tand\r\nnewlines\x00\x7f",
                 "  leading and trailing  ", "Ελληνικά, русский, עברית, العربية", "</s> <s> <pad> literal"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id  # Llama-style: BOS first
        assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
        assert tok.decode(ids[1:]) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert 300 <= len(tok) <= 2048


@pytest.mark.timeout(30)
def test_tokenizer_and_model_are_deterministic():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    m1, m2, m3 = build_model(len(a), seed=0), build_model(len(a), seed=0), build_model(len(a), seed=1)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
    state = torch.random.get_rng_state()
    build_tiny_llm(seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's random stream is untouched


@pytest.mark.timeout(30)
def test_chat_template_renders(loaded):
    tok = loaded.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>\n")
    # A chat job encodes exactly that text, BOS once (the template writes it).
    ids = TextGenerator([TINY]).encode_prompt(loaded, job(messages=messages))
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1


@pytest.mark.timeout(60)
def test_pretrained_folder_loads_through_from_pretrained(gen, loaded, tmp_path):
    loaded.model.save_pretrained(tmp_path)
    loaded.tokenizer.save_pretrained(tmp_path)
    entry = {"name": "tiny-llm-folder", "family": "llm", "weights": {"kind": "pretrained", "path": str(tmp_path)}}
    folder_gen = TextGenerator([entry], device="cpu")
    from_folder = folder_gen.load("tiny-llm-folder")
    assert type(from_folder.model).__name__ == "LlamaForCausalLM"
    assert from_folder.tokenizer.chat_template == CHAT_TEMPLATE
    assert from_folder.eos_token_ids == loaded.eos_token_ids and from_folder.pad_token_id == loaded.pad_token_id
    jobs = [job(temperature=0.0, max_length=32), job(temperature=1.0, seed=9, max_length=32),
            job(messages=[{"role": "user", "content": "hello"}], temperature=0.0)]
    want = gen.generate_batch(loaded, jobs)
    got = folder_gen.generate_batch(from_folder, [j.model_copy(update={"model": "tiny-llm-folder"}) for j in jobs])
    assert got == want


# --- determinism and batching -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_job_gives_the_same_text_alone_and_in_any_batch(gen, loaded):
    target = job(temperature=1.0, top_p=0.95, top_k=50, rep_pen=1.2, rep_pen_range=16, seed=7, max_length=40)
    alone = gen.generate_batch(loaded, [target])[0]
    assert gen.generate_batch(loaded, [target])[0] == alone  # run to run
    others = [
        job(prompt="Hi", seed=1, max_length=5),  # shorter prompt: more left padding; ends early
        job(prompt=PROMPT * 3, seed=2, temperature=1.5, max_length=60),  # longer prompt, longer run
        job(temperature=0.0, max_length=12),
        job(messages=[{"role": "user", "content": "What is the capital of France?"}], seed=3, typical=0.7, min_p=0.05),
        target,  # the same job twice in one batch: both rows give the same text
    ]
    for batch in ([target] + others, others[:2] + [target] + others[2:], others + [target]):
        results = gen.generate_batch(loaded, batch)
        for j, r in zip(batch, results):
            if j is target:
                assert r == alone
        # Every row of the batch is its own solo run.
        assert results == [gen.generate_batch(loaded, [j])[0] for j in batch]


@pytest.mark.timeout(30)
def test_different_seeds_give_different_text(gen, loaded):
    outs = texts(gen, loaded, [job(seed=s, temperature=1.5, max_length=16) for s in range(8)])
    assert len(set(outs)) == len(outs)


# --- sampling parameters ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_greedy_equivalents(gen, loaded):
    greedy, top_k1, tiny_top_p, full_min_p, other_seed = texts(gen, loaded, [
        job(temperature=0.0, max_length=32),
        job(temperature=1.3, top_k=1, seed=11, max_length=32),
        job(temperature=1.3, top_p=1e-6, seed=12, max_length=32),
        job(temperature=1.3, min_p=1.0, seed=13, max_length=32),
        job(temperature=0.0, seed=99, max_length=32),  # greedy ignores the seed
    ])
    assert greedy == top_k1 == tiny_top_p == full_min_p == other_seed


@pytest.mark.timeout(30)
def test_each_sampling_parameter_changes_the_text(gen, loaded):
    variants = {"temperature": 0.3, "top_k": 3, "top_p": 0.5, "typical": 0.3, "min_p": 0.3, "rep_pen": 2.0}
    base, *changed = texts(gen, loaded, [job(seed=5, max_length=32)] +
                           [job(seed=5, max_length=32, **{k: v}) for k, v in variants.items()])
    for (name, _), text in zip(variants.items(), changed):
        assert text != base, name
    # Repetition penalty acts under greedy decoding too.
    greedy, penalized = texts(gen, loaded, [job(temperature=0.0, max_length=48),
                                            job(temperature=0.0, max_length=48, rep_pen=3.0)])
    assert greedy != penalized
    # Its range decides which tokens it penalizes (the whole context vs the last 4 tokens).
    whole, last4 = texts(gen, loaded, [job(seed=5, max_length=32, rep_pen=3.0, rep_pen_range=0),
                                       job(seed=5, max_length=32, rep_pen=3.0, rep_pen_range=4)])
    assert len({base, whole, last4}) == 3


def draws(logits: list[float], count: int = 300, **params) -> list[int]:
    """`count` rows of the same logits, each with its own seed: the tokens sample_next picks."""
    jobs = [job(seed=s, **params) for s in range(count)]
    p = SamplingParams.from_jobs(jobs, torch.device("cpu"))
    batch = torch.tensor([logits] * count)
    history = torch.zeros((count, 1), dtype=torch.long)
    return sample_next(batch, history, torch.zeros_like(history, dtype=torch.bool), p).tolist()


@pytest.mark.timeout(30)
def test_filters_keep_exactly_the_tokens_they_should():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert set(draws(logits)) == {0, 1, 2, 3}
    assert set(draws(logits, temperature=0.0)) == {0}
    assert set(draws(logits, top_k=2)) == {0, 1}
    assert set(draws(logits, top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(logits, top_p=0.5)) == {0}  # the top token alone holds 0.5
    assert set(draws(logits, min_p=0.5)) == {0, 1}  # >= 0.25
    assert set(draws(logits, min_p=0.2)) == {0, 1, 2}  # >= 0.1
    # Filters chain: top_k=3 leaves 0.5/0.3/0.15, renormalised 0.526/0.316/0.158; then top_p=0.8
    # keeps 0 and 1 (0.526 < 0.8 <= 0.842).
    assert set(draws(logits, top_k=3, top_p=0.8)) == {0, 1}
    # Typical: with probabilities 0.4/0.3/0.3 the entropy (1.09 nats) is nearer the 0.3 tokens'
    # surprise (1.20) than the 0.4 token's (0.92), so a small mass keeps a 0.3 token only.
    typical = [math.log(p) for p in (0.4, 0.3, 0.3)]
    assert set(draws(typical)) == {0, 1, 2}
    kept = set(draws(typical, typical=0.2))
    assert len(kept) == 1 and 0 not in kept
    assert set(draws(typical, typical=0.5)) == {1, 2}  # 0.3 < 0.5 <= 0.6
    assert set(draws(typical, typical=0.2, min_p=0.9)) == kept  # min_p measures from what is left
    # Temperature sharpens or flattens: fewer draws of the top token when hot.
    hot, cold = draws(logits, temperature=3.0), draws(logits, temperature=0.3)
    assert cold.count(0) > draws(logits).count(0) > hot.count(0)


@pytest.mark.timeout(30)
def test_repetition_penalty_window():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]] * 3)
    # Context: one padding position (id 2, masked), then tokens 0, 1, 3.
    history = torch.tensor([[2, 0, 1, 3]] * 3)
    valid = torch.tensor([[False, True, True, True]] * 3)
    p = SamplingParams.from_jobs([job(rep_pen=2.0, rep_pen_range=0), job(rep_pen=2.0, rep_pen_range=2),
                                  job(rep_pen=1.0)], torch.device("cpu"))
    out = apply_repetition_penalty(logits, history, valid, p)
    assert out[0].tolist() == [1.0, -2.0, 0.5, 1.5, 1.0]  # whole context; the padding id is not seen
    assert out[1].tolist() == [2.0, -2.0, 0.5, 1.5, 1.0]  # the last 2 tokens only
    assert out[2].tolist() == logits[2].tolist()


# --- stopping, lengths, context -----------------------------------------------------------------


@pytest.mark.timeout(30)
def test_max_length_is_exact_and_longer_runs_extend_shorter_ones(gen, loaded):
    lengths = [1, 5, 37, 64]
    results = gen.generate_batch(loaded, [job(seed=3, max_length=n) for n in lengths])
    for n, r in zip(lengths, results):
        assert (r["finish_reason"], r["completion_tokens"]) == ("length", n)
        assert r["prompt_tokens"] == len(loaded.tokenizer(PROMPT)["input_ids"]) and r["seed"] == 3
    longest = results[-1]["text"]
    for r in results[:-1]:  # same seed, same tokens: a shorter run is the start of a longer one
        assert longest.startswith(r["text"].rstrip("\ufffd"))


@pytest.mark.timeout(30)
def test_stop_sequence_cuts_the_text(gen, loaded):
    full = gen.generate_batch(loaded, [job(temperature=0.0, max_length=40)])[0]["text"]
    stop = full[14:17]
    assert "\ufffd" not in stop and full.find(stop) > 0
    expected = full[: full.find(stop)]
    for stops in ([stop], ["never appears in this text", stop], [stop, full[20:24]]):
        r = gen.generate_batch(loaded, [job(temperature=0.0, max_length=40, stop_sequence=stops)])[0]
        assert (r["text"], r["finish_reason"]) == (expected, "stop")
        assert r["completion_tokens"] < 40
    # The earliest stop in the text wins, whatever its place in the list.
    r = gen.generate_batch(loaded, [job(temperature=0.0, max_length=40, stop_sequence=[full[20:24], full[5:8]])])[0]
    assert r["text"] == full[: full.find(full[5:8])]


class ForceEosFromCall(torch.nn.Module):
    """Wraps a causal LM so that from its `first`-th forward call on, EOS is the top logit."""

    def __init__(self, model, eos: int, first: int):
        super().__init__()
        self.model, self.eos, self.first, self.calls = model, eos, first, 0

    def forward(self, **kwargs):
        self.calls += 1
        out = self.model(**kwargs)
        if self.calls >= self.first:
            out.logits[..., self.eos] = 1e4
        return out


@pytest.mark.timeout(30)
def test_eos_ends_a_row_with_stop(gen, loaded):
    plain = gen.generate_batch(loaded, [job(temperature=0.0, max_length=30)])[0]
    eos = next(iter(loaded.eos_token_ids))
    forced = dataclasses.replace(loaded, model=ForceEosFromCall(loaded.model, eos, first=4))
    r = gen.generate_batch(forced, [job(temperature=0.0, max_length=30)])[0]
    # Calls 1-3 (prefill + 2 steps) give 3 tokens, call 4 gives EOS: counted, not in the text.
    assert (r["finish_reason"], r["completion_tokens"]) == ("stop", 4)
    assert plain["text"].startswith(r["text"].rstrip("\ufffd")) and r["text"] != plain["text"]


@pytest.mark.timeout(30)
def test_context_is_cut_from_the_left(gen, loaded):
    tok = loaded.tokenizer
    suffix = " and the knight shared his bread, and the dragon told stories of the old days."
    a, b = "The lighthouse keeper climbed the stairs." + suffix, "Completely different words here!" + suffix
    keep = len(tok(suffix, add_special_tokens=False)["input_ids"]) - 2
    ids_a, ids_b = tok(a)["input_ids"], tok(b)["input_ids"]
    assert ids_a[-keep:] == ids_b[-keep:] and ids_a[:-keep] != ids_b[:-keep]  # the premise
    max_length = 20
    cut = dict(max_length=max_length, max_context_length=keep + max_length, seed=4)
    assert gen.encode_prompt(loaded, job(prompt=a, **cut)) == ids_a[-keep:]
    ra, rb = gen.generate_batch(loaded, [job(prompt=a, **cut), job(prompt=b, **cut)])
    assert ra["prompt_tokens"] == rb["prompt_tokens"] == keep
    assert ra["text"] == rb["text"]
    # With room for the whole prompts, the different beginnings give different text.
    wa, wb = gen.generate_batch(loaded, [job(prompt=a, seed=4, max_length=20), job(prompt=b, seed=4, max_length=20)])
    assert (wa["prompt_tokens"], wb["prompt_tokens"]) == (len(ids_a), len(ids_b))
    assert wa["text"] != wb["text"]


# --- streaming ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_streamed_deltas_concatenate_to_the_final_text(gen, loaded):
    full = gen.generate_batch(loaded, [job(temperature=0.0, max_length=40)])[0]["text"]
    jobs = [job(temperature=0.0, max_length=40, stop_sequence=[full[14:17]])]  # a stop that hits
    # Hot sampling makes stray bytes (unfinished UTF-8); common stop prefixes make held-back text.
    jobs += [job(seed=s, temperature=2.0, max_length=10 + 7 * s, stop_sequence=["e t", "\n\n", "zq"])
             for s in range(10)]
    deltas: dict[int, list[str]] = {i: [] for i in range(len(jobs))}
    finished: list[tuple[int, dict]] = []
    results = gen.generate_batch(loaded, jobs, on_token=lambda i, d: deltas[i].append(d),
                                 on_finish=lambda i, r: finished.append((i, r)))
    for i, r in enumerate(results):
        assert "".join(deltas[i]) == r["text"]
        assert all(deltas[i])  # no empty deltas
    assert results[0]["finish_reason"] == "stop"
    assert sorted(finished, key=lambda f: f[0]) == list(enumerate(results))
    assert results == [gen.generate_batch(loaded, [j])[0] for j in jobs]  # callbacks change nothing


@pytest.mark.timeout(30)
def test_unsettled_text_is_held_back(loaded):
    tok = loaded.tokenizer
    byte_token = {c: tok.convert_tokens_to_ids(c) for c in "xabc"}  # single byte-level symbols
    byte_token.update({"é1": tok.convert_tokens_to_ids("Ã"), "é2": tok.convert_tokens_to_ids("©")})  # C3 A9
    eos = next(iter(loaded.eos_token_ids))

    def feed(pieces: list[str], stops=("abc",), max_length=20) -> tuple[list[str], _Row]:
        row = _Row(0, job(stop_sequence=list(stops), max_length=max_length), 1, tok, loaded.eos_token_ids)
        return [row.advance(eos if p == "eos" else byte_token[p]) for p in pieces], row

    # "ab" might start "abc": held until "x" shows it does not.
    deltas, row = feed(["x", "a", "b", "x"])
    assert deltas == ["x", "", "", "abx"] and row.finish_reason is None
    # It does: the text ends before the stop sequence, and nothing of it was streamed.
    deltas, row = feed(["x", "a", "b", "c"])
    assert deltas == ["x", "", "", ""] and (row.text, row.finish_reason) == ("x", "stop")
    # Half a UTF-8 character waits for its other half.
    deltas, row = feed(["x", "é1", "é2"])
    assert deltas == ["x", "", "é"]
    # At the end whatever was held goes out, even half a character; EOS adds no text.
    deltas, row = feed(["a", "é1", "eos"])
    assert deltas == ["", "", "a\ufffd"] and (row.finish_reason, row.completion_tokens) == ("stop", 3)
    deltas, row = feed(["x", "a"], max_length=2)
    assert deltas == ["x", "a"] and row.finish_reason == "length"


@pytest.mark.timeout(30)
def test_stream_batch_reports_each_row_when_it_ends(gen, loaded):
    jobs = [job(seed=1, max_length=3), job(seed=2, max_length=9)]
    steps = list(gen.stream_batch(loaded, jobs))
    assert len(steps) == 9
    assert [len([e for e in s if isinstance(e, TokenEvent)]) for s in steps] == [2] * 3 + [1] * 6
    ends = [(k, e.row) for k, s in enumerate(steps) for e in s if isinstance(e, FinishEvent)]
    assert ends == [(2, 0), (8, 1)]  # the short row ends at its third step, not with the batch


# --- the job contract ---------------------------------------------------------------------------


BAD_FIELDS = [
    ({"model": ""}, "model"),
    ({"model": None}, "model"),
    ({"seed": None}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"max_length": 0}, "max_length"),
    ({"max_length": 8.5}, "max_length"),
    ({"max_length": True}, "max_length"),
    ({"max_context_length": 24}, "max_context_length"),  # not above max_length (24)
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"typical": 1.5}, "typical"),
    ({"min_p": -0.01}, "min_p"),
    ({"rep_pen": 0.9}, "rep_pen"),
    ({"rep_pen_range": -1}, "rep_pen_range"),
    ({"stop_sequence": "\n"}, "stop_sequence"),
    ({"stop_sequence": ["ok", ""]}, r"stop_sequence\[1\]"),
    ({"prompt": None}, "prompt / messages"),
    ({"prompt": 42}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "prompt / messages"),  # both given
    ({"tfs": 0.9}, "tfs"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("overrides, field", BAD_FIELDS)
def test_bad_fields_are_refused_by_name(overrides, field):
    d = dict(model="tiny-llm", prompt="hi", seed=1, max_length=24)
    d.update(overrides)
    with pytest.raises(ValueError, match=field):
        TextJob.from_dict(d)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("messages, field", [
    ([], "messages"),
    ("hi", "messages"),
    ([{"role": "user"}], r"messages\[0\]"),
    ([{"role": "user", "content": "hi"}, {"role": "", "content": "x"}], r"messages\[1\]"),
    ([{"role": "user", "content": "hi", "name": "bob"}], r"messages\[0\]"),
])
def test_bad_messages_are_refused(messages, field):
    with pytest.raises(ValueError, match=field):
        TextJob.from_dict(dict(model="tiny-llm", messages=messages, seed=1))


@pytest.mark.timeout(30)
def test_defaults_and_json_numbers():
    j = TextJob.from_dict({"model": "m", "prompt": "p", "seed": 3, "max_length": 80.0, "temperature": 1,
                           "top_k": None, "stop_sequence": None})
    assert (j.max_length, j.max_context_length, j.temperature, j.top_k, j.stop_sequence) == (80, 1024, 1.0, 100, ())
    assert j.prompt_budget == 1024 - 80


@pytest.mark.timeout(30)
def test_jobs_that_do_not_fit_the_model_are_refused(gen, loaded):
    with pytest.raises(ValueError, match="max_context_length"):
        gen.encode_prompt(loaded, job(max_context_length=4096))  # the tiny model has 2048 positions
    limited = dataclasses.replace(loaded, entry=ModelEntry.model_validate({**TINY, "max_length": 16}))
    with pytest.raises(ValueError, match="max_length"):
        gen.encode_prompt(limited, job(max_length=17))
    no_template = copy.deepcopy(loaded.tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="messages"):
        gen.encode_prompt(dataclasses.replace(loaded, tokenizer=no_template),
                          job(messages=[{"role": "user", "content": "hi"}]))
    with pytest.raises(ValueError, match="not one of this deployment's models"):
        gen.load("nope")
    with pytest.raises(ValueError, match="not llm models"):
        TextGenerator([{"name": "x", "family": "stable_diffusion_1",
                        "weights": {"kind": "builtin", "path": "tiny-sd15"}}])
    with pytest.raises(ValueError, match="no builtin LLM"):
        TextGenerator([{**TINY, "weights": {"kind": "builtin", "path": "huge-llm"}}]).load("tiny-llm")


# --- the deployment's batch merging, without Serve ----------------------------------------------


class LocalLLMDeployment(LLMDeployment.func_or_class):
    """The deployment class with what needs a Serve replica replaced: the multiplexed model
    cache (a plain dict here) and the replica's location."""

    def __init__(self, models):
        super().__init__(models)
        self.models: dict = {}

    async def get_model(self, model_name):
        if model_name not in self.models:
            self.models[model_name] = self.generator.load(model_name)
        return self.models[model_name]

    def _replica_location(self):
        return {"node_id": "node-1", "replica": "replica-1"}


@pytest.mark.timeout(60)
def test_run_batch_groups_by_model_streams_and_isolates_bad_jobs(gen, loaded):
    second = {**TINY, "name": "tiny-llm-b"}
    deployment = LocalLLMDeployment([TINY, second])
    jobs = [job(seed=1, max_length=6), job(max_context_length=4096),  # the second cannot fit the model
            job(seed=2, max_length=12).model_copy(update={"model": "tiny-llm-b"}),
            job(seed=3, max_length=20, stop_sequence=["e"])]

    async def collect():
        return [items async for items in deployment.run_batch(jobs)]

    rounds = asyncio.run(collect())
    assert all(len(items) == len(jobs) for items in rounds)
    per_job = [[items[i] for items in rounds] for i in range(len(jobs))]
    for i, items in enumerate(per_job):
        live = [it for it in items if it is not StopIteration]
        assert all(it is StopIteration for it in items[len(live):])  # nothing after the end
        last = live[-1]
        if i == 1:
            assert last["invalid"] is True and "max_context_length" in last["error"]
            continue
        result = last["result"]
        assert "".join(it["delta"] for it in live) == result["text"]
        assert (result["node_id"], result["replica"]) == ("node-1", "replica-1") and result["seconds"] > 0
        solo = gen.generate_batch(loaded, [jobs[i].model_copy(update={"model": "tiny-llm"})])[0]
        assert {k: result[k] for k in solo} == solo
    # Each model's jobs were decoded together: two tiny-llm jobs, one tiny-llm-b job.
    sizes = [next(it for it in reversed(items) if it is not StopIteration)["result"]["batch_size"]
             for items in (per_job[0], per_job[2], per_job[3])]
    assert sizes == [2, 1, 2]


# --- the catalog --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_catalog_llm_family():
    assert Family.llm.kind == "text" and Family.stable_diffusion_xl.kind == "image"
    assert Family.stable_diffusion_1.native_side == 512
    with pytest.raises(ValueError, match="not an image family"):
        Family.llm.native_side
    catalog = load_catalog("configs/models.yaml")
    tiny, qwen = catalog.get("tiny-llm"), catalog.get("Qwen/Qwen2.5-0.5B-Instruct")
    assert tiny.family is Family.llm and tiny.weights.kind == "builtin" and tiny.max_context_length == 2048
    assert qwen.weights.kind == "pretrained" and qwen.weights.dtype == "bfloat16"
    assert {e.name for e in catalog.by_family()[Family.llm]} == {"tiny-llm", "Qwen/Qwen2.5-0.5B-Instruct"}
    bad = [
        ({"weights": {"kind": "single_file", "path": "x.safetensors"}}, "single_file"),
        ({"weights": {"kind": "pretrained", "path": "x", "config": "y"}}, "config and decoder_path"),
        ({"requirements": {"min_steps": 5}}, "requirements"),
        ({"max_context_length": 100, "max_length": 100}, "max_length must be below"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            ModelEntry.model_validate({**TINY, **overrides})
    with pytest.raises(ValueError, match="llm models only"):
        Catalog.model_validate({"models": [{"name": "sd", "family": "stable_diffusion_1",
                                            "weights": {"kind": "builtin", "path": "tiny-sd15"},
                                            "max_context_length": 1024}]})
