"""The text engines behind the LLM deployment (deployments/llm_engines/), without Ray.

What runs here, on a CPU without vLLM:
- the catalog entry -> engine choice and vLLM's engine arguments (what ray.serve.llm calls
  engine_kwargs), and its validation;
- our job parameters -> vllm.SamplingParams. vLLM is not installed here, so a stand-in `vllm`
  module is put in sys.modules whose SamplingParams / AsyncEngineArgs accept only field names
  copied from vLLM's own classes (vllm/sampling_params.py, engine/arg_utils.py). That proves we
  pass names vLLM has and the values we mean; it does not prove vLLM samples as we expect;
- the vLLM adapter's own work (token ids -> text, stop sequences, held-back streaming,
  aborting, warnings) fed by a scripted stand-in engine: the plumbing, not vLLM;
- a missing vllm package gives an error naming `pip install -e '.[vllm]'`, also through the
  deployment;
- one interface contract suite, parametrised over the engines: the builtin engine runs it
  here; the vllm case runs only where vllm and a CUDA GPU are (skipped otherwise);
- the horde API's answer names the parameters a served model's engine cannot honour.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from deployments.jobs import JobRejected, TextJob
from deployments.llm_engines import FinishEvent, TokenEvent, build_engine, engine_class
from deployments.llm_engines.builtin import BuiltinEngine
from deployments.llm_engines.vllm_engine import EngineUnavailable, VLLMEngine, engine_args, sampling_params
from models.catalog import ModelEntry
from models.tiny_llm import build_tiny_llm
from test_llm import LocalLLMDeployment

TINY = {"name": "tiny-llm", "family": "llm", "weights": {"kind": "builtin", "path": "tiny-llm"}}
PROMPT = "Once upon a time, in a kingdom by the sea, the dragon"

# Field names of vLLM's SamplingParams and (those we or the tests use of) AsyncEngineArgs.
VLLM_SAMPLING_FIELDS = {
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k",
    "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
    "prompt_logprobs", "detokenize", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "output_kind", "logit_bias", "allowed_token_ids", "extra_args", "bad_words",
}
VLLM_ENGINE_ARG_FIELDS = {
    "model", "tokenizer", "served_model_name", "dtype", "max_model_len", "seed", "gpu_memory_utilization",
    "max_num_seqs", "enforce_eager", "tensor_parallel_size", "trust_remote_code", "revision",
}


def job(**overrides) -> TextJob:
    base = dict(model="tiny-llm", prompt=PROMPT, seed=1, max_length=24, temperature=1.0, top_k=0, top_p=1.0,
                typical=1.0, min_p=0.0, rep_pen=1.0, rep_pen_range=0)
    base.update(overrides)
    return TextJob.from_dict(base)


# One event loop for every stream call: vLLM's engine stays bound to the loop it first ran on.
LOOP = asyncio.new_event_loop()


def collect(engine, jobs: list[TextJob]) -> tuple[list[dict], list[str], list[list]]:
    """(results, each row's concatenated deltas, each row's events) of one stream call."""
    async def run():
        ids = [await asyncio.to_thread(engine.encode_prompt, j) for j in jobs]
        return [step async for step in engine.stream(jobs, ids)]

    steps = LOOP.run_until_complete(run())
    events = [[e for s in steps for e in s if e.row == i] for i in range(len(jobs))]
    results = []
    for i, evs in enumerate(events):
        finishes = [e for e in evs if isinstance(e, FinishEvent)]
        assert len(finishes) == 1 and evs[-1] is finishes[0], f"row {i}: one FinishEvent, last"
        results.append(finishes[0].result)
    deltas = ["".join(e.delta for e in evs if isinstance(e, TokenEvent)) for evs in events]
    return results, deltas, events


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny Llama saved as a pretrained folder (model + tokenizer), as vLLM loads models."""
    folder = tmp_path_factory.mktemp("tiny-llm")
    model, tokenizer = build_tiny_llm()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def vllm_entry(folder, **overrides) -> ModelEntry:
    return ModelEntry.model_validate({
        "name": "tiny-llm", "family": "llm", "engine": "vllm",
        "weights": {"kind": "pretrained", "path": str(folder), "dtype": "bfloat16"},
        "engine_kwargs": {"gpu_memory_utilization": 0.2, "enforce_eager": True, "max_num_seqs": 32},
        **overrides})


# --- the interface contract, for every engine ---------------------------------------------------


def _real_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module", params=["builtin", "vllm"])
def engine(request, tiny_folder):
    if request.param == "builtin":
        torch.set_num_threads(2)
        loaded = build_engine(ModelEntry.model_validate(TINY), "cpu")
    else:
        if not _real_vllm():
            pytest.skip("the vllm engine needs the vllm package and a CUDA GPU (pip install -e '.[vllm]')")
        loaded = build_engine(vllm_entry(tiny_folder), "cuda")
    yield loaded
    loaded.close()


@pytest.mark.timeout(120)
def test_contract_streams_text_that_adds_up(engine):
    jobs = [job(seed=s, max_length=n) for s, n in ((1, 12), (2, 20), (3, 5))]
    results, deltas, events = collect(engine, jobs)
    for j, r, text, evs in zip(jobs, results, deltas, events):
        assert text == r["text"] and r["seed"] == j.seed
        assert r["finish_reason"] in ("length", "stop") and 1 <= r["completion_tokens"] <= j.max_length
        assert r["completion_tokens"] == len([e for e in evs if isinstance(e, TokenEvent) and e.token_id is not None])
        assert r["prompt_tokens"] == len(engine.encode_prompt(j)) and r["warnings"] == []
    assert any(r["finish_reason"] == "length" for r in results)


@pytest.mark.timeout(120)
def test_contract_seeds_reproduce_and_differ(engine):
    same = [job(seed=7, max_length=16), job(seed=7, max_length=16)]
    first, _, _ = collect(engine, same)
    again, _, _ = collect(engine, same[:1])
    assert first[0]["text"] == first[1]["text"] == again[0]["text"]
    others, _, _ = collect(engine, [job(seed=s, max_length=16) for s in (8, 9, 10)])
    assert len({r["text"] for r in others + first[:1]}) >= 3


@pytest.mark.timeout(120)
def test_contract_stop_sequence_cuts_the_text(engine):
    greedy = job(temperature=0.0, max_length=40)
    (free,), _, _ = collect(engine, [greedy])
    text = free["text"]
    stop = text[10:13]
    assert len(text) > 13 and stop.strip(), f"the greedy text is too short to test with: {text!r}"
    (cut,), (streamed,), _ = collect(engine, [greedy.model_copy(update={"stop_sequence": (stop,)})])
    assert cut["text"] == text[:text.find(stop)] == streamed
    assert cut["finish_reason"] == "stop" and cut["completion_tokens"] < free["completion_tokens"]


@pytest.mark.timeout(120)
def test_contract_max_length_is_a_hard_limit(engine):
    lengths = (1, 6, 17)
    results, _, _ = collect(engine, [job(seed=s, max_length=n) for s, n in zip((4, 5, 6), lengths)])
    for n, r in zip(lengths, results):
        assert r["completion_tokens"] == n if r["finish_reason"] == "length" else r["completion_tokens"] <= n
    assert results[0]["completion_tokens"] == 1  # EOS or not, one token is all it may make
    assert any(r["finish_reason"] == "length" for r in results)


@pytest.mark.timeout(120)
def test_contract_warnings_name_what_the_engine_cannot_honour(engine):
    asks = job(typical=0.5, rep_pen=1.2, rep_pen_range=64, max_length=6)
    (r,), _, _ = collect(engine, [asks])
    expected = {"builtin": [], "vllm": ["typical", "rep_pen_range"]}[engine.kind]
    assert r["warnings"] == expected == engine.unsupported_params(asks)
    (plain,), _, _ = collect(engine, [job(typical=1.0, rep_pen=1.2, rep_pen_range=0, max_length=6)])
    assert plain["warnings"] == []


@pytest.mark.timeout(60)
def test_contract_jobs_that_do_not_fit_are_refused(engine):
    with pytest.raises(JobRejected, match="max_context_length"):
        engine.encode_prompt(job(max_context_length=engine.max_context_length + 1))
    with pytest.raises(JobRejected, match="model"):
        engine.encode_prompt(job(model="another-model"))


# --- the catalog entry -> the engine and its configuration --------------------------------------


def test_catalog_entry_chooses_the_engine(tiny_folder):
    assert engine_class("builtin") is BuiltinEngine and engine_class("vllm") is VLLMEngine
    assert ModelEntry.model_validate(TINY).engine == "builtin"
    assert isinstance(build_engine(ModelEntry.model_validate(TINY), "cpu"), BuiltinEngine)
    with pytest.raises(ValueError, match="not a text engine"):
        engine_class("tgi")
    bad = [
        ({**TINY, "engine": "vllm"}, "pretrained weights only"),
        ({**TINY, "engine_kwargs": {"max_num_seqs": 4}}, "engine_kwargs are for the vllm engine"),
        ({**TINY, "engine": "tgi"}, "engine"),
        (vllm_entry(tiny_folder).model_dump() | {"engine_kwargs": {"model": "x"}}, r"may not set \['model'\]"),
        (vllm_entry(tiny_folder).model_dump() | {"engine_kwargs": {"max_model_len": 9}}, "max_model_len"),
        ({"name": "sd", "family": "stable_diffusion_1", "weights": {"kind": "builtin", "path": "tiny-sd15"},
          "engine": "vllm"}, "llm models only"),
        ({**TINY, "compile": True}, "compile and vae are for image models"),
    ]
    for data, message in bad:
        with pytest.raises(ValueError, match=message):
            ModelEntry.model_validate(data)


def test_engine_args_follow_the_entry(tiny_folder):
    entry = vllm_entry(tiny_folder, max_context_length=1024)
    args = engine_args(entry, 1024)
    assert args == {"model": str(tiny_folder), "tokenizer": str(tiny_folder), "served_model_name": "tiny-llm",
                    "dtype": "bfloat16", "max_model_len": 1024, "seed": 0, "gpu_memory_utilization": 0.2,
                    "enforce_eager": True, "max_num_seqs": 32}
    assert set(args) <= VLLM_ENGINE_ARG_FIELDS


# --- a stand-in vllm module: the names and values we hand vLLM -----------------------------------


class _Strict:
    """Records its keyword arguments; refuses any name the real class does not have."""

    FIELDS: set[str] = set()

    def __init__(self, **kwargs):
        unknown = set(kwargs) - self.FIELDS
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        self.kwargs = kwargs


class ScriptedEngine:
    """Answers each request with cumulative outputs of `script` token ids, `per_output` new
    ones at a time, as vLLM's AsyncLLM streams them: finished at max_tokens ("length") or
    at the script's end (`end_reason`). Records requests and aborts."""

    def __init__(self, script: list[int], per_output: int = 2, end_reason: str = "stop", fail_after: int | None = None):
        self.script, self.per_output, self.end_reason, self.fail_after = script, per_output, end_reason, fail_after
        self.requests: list[tuple] = []
        self.aborted: list[str] = []
        self.shut_down = False

    async def generate(self, prompt, params, request_id):
        self.requests.append((prompt, params, request_id))
        limit = params.kwargs["max_tokens"]
        tokens = self.script[:limit]
        for end in range(self.per_output, len(tokens) + self.per_output, self.per_output):
            if self.fail_after is not None and end > self.fail_after:
                raise RuntimeError("the engine died")
            done = end >= len(tokens)
            reason = ("length" if len(tokens) == limit else self.end_reason) if done else None
            yield SimpleNamespace(finished=done, outputs=[SimpleNamespace(token_ids=tokens[:end], finish_reason=reason)])
            await asyncio.sleep(0)

    async def abort(self, request_id):
        self.aborted.append(request_id)

    def shutdown(self):
        self.shut_down = True


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = type("SamplingParams", (_Strict,), {"FIELDS": VLLM_SAMPLING_FIELDS})
    module.AsyncEngineArgs = type("AsyncEngineArgs", (_Strict,), {"FIELDS": VLLM_ENGINE_ARG_FIELDS})
    module.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    module.built = []

    class AsyncLLMEngine:
        @staticmethod
        def from_engine_args(args):
            module.built.append(args)
            return module.engine

    module.AsyncLLMEngine = AsyncLLMEngine
    module.engine = ScriptedEngine([])
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_job_parameters_map_onto_vllm_sampling_params(fake_vllm):
    j = job(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, rep_pen=1.15, seed=2**64 - 1, max_length=33,
            stop_sequence=["\n\n", "User:"])
    params = sampling_params(fake_vllm, j, frozenset({2, 7}))
    assert params.kwargs == {"n": 1, "temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
                             "repetition_penalty": 1.15, "seed": (2**64 - 1) % 2**63, "max_tokens": 33,
                             "stop": ["\n\n", "User:"], "stop_token_ids": [2, 7], "skip_special_tokens": True}
    # Off means the same on both sides: top_k 0, min_p 0, top_p 1, rep_pen 1; temperature 0 is greedy.
    off = sampling_params(fake_vllm, job(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, rep_pen=1.0), frozenset({2}))
    assert {k: off.kwargs[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "stop")} == \
        {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0, "stop": None}


def test_vllm_engine_loads_from_the_entry(fake_vllm, tiny_folder):
    entry = vllm_entry(tiny_folder, max_context_length=1024)
    engine = build_engine(entry, "cpu")
    assert isinstance(engine, VLLMEngine) and engine.engine is fake_vllm.engine
    (args,) = fake_vllm.built
    assert args.kwargs == engine_args(entry, 1024)
    assert engine.max_context_length == 1024 and engine.eos_token_ids == frozenset({2})
    assert engine.tokenizer.chat_template  # the folder's tokenizer: chat jobs encode as on builtin
    # Without max_context_length: the model's own position limit, as for the builtin engine.
    assert build_engine(vllm_entry(tiny_folder), "cpu").max_context_length == 2048
    engine.close()
    assert fake_vllm.engine.shut_down
    fake_vllm.AsyncEngineArgs.FIELDS = VLLM_ENGINE_ARG_FIELDS - {"enforce_eager"}
    with pytest.raises(ValueError, match="engine_kwargs: .*enforce_eager"):
        build_engine(vllm_entry(tiny_folder), "cpu")


def test_missing_vllm_names_the_extra(monkeypatch, tiny_folder):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(EngineUnavailable, match=r"pip install -e '\.\[vllm\]'") as raised:
        build_engine(vllm_entry(tiny_folder), "cuda")
    assert "tiny-llm" in str(raised.value) and "engine: builtin" in str(raised.value)


# --- the vLLM adapter on scripted engine outputs -------------------------------------------------


def scripted_engine(fake_vllm, tiny_folder, text: str, **script) -> VLLMEngine:
    engine = build_engine(vllm_entry(tiny_folder), "cpu")
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    engine.engine = fake_vllm.engine = ScriptedEngine(ids, **script)
    return engine


def test_vllm_adapter_streams_stops_and_aborts(fake_vllm, tiny_folder):
    engine = scripted_engine(fake_vllm, tiny_folder, " the dragon flew over the mountains and the river")
    jobs = [job(stop_sequence=["over"], max_length=40), job(max_length=3, typical=0.5, rep_pen=1.1, rep_pen_range=9)]
    results, deltas, _ = collect(engine, jobs)
    assert results[0]["text"] == deltas[0] == " the dragon flew "
    assert results[0]["finish_reason"] == "stop" and results[0]["warnings"] == []
    assert results[1]["finish_reason"] == "length" and results[1]["completion_tokens"] == 3
    assert results[1]["warnings"] == ["typical", "rep_pen_range"] and deltas[1] == results[1]["text"]
    # Each job was one vLLM request, its prompt the ids encode_prompt gave, its params ours.
    prompts = [r[0]["prompt_token_ids"] for r in fake_vllm.engine.requests]
    assert prompts == [engine.encode_prompt(j) for j in jobs]
    assert [r[1].kwargs["max_tokens"] for r in fake_vllm.engine.requests] == [40, 3]
    # The stopped row's request was aborted (vLLM had more to send); the finished one was not.
    assert fake_vllm.engine.aborted == [fake_vllm.engine.requests[0][2]]


def test_vllm_adapter_ends_a_row_where_vllm_does(fake_vllm, tiny_folder):
    # vLLM stopped (say at EOS it saw, or its own stop-string check) where TextRow had not:
    # the row ends "stop" with everything it held back ("ab" could have begun "abc").
    engine = scripted_engine(fake_vllm, tiny_folder, " xx ab", per_output=1, end_reason="stop")
    (r,), (streamed,), (events,) = collect(engine, [job(stop_sequence=["abc"], max_length=40)])
    assert (r["text"], r["finish_reason"], streamed) == (" xx ab", "stop", " xx ab")
    assert events[-2].token_id is None and events[-2].delta.endswith("ab")


def test_vllm_adapter_reports_an_engine_failure(fake_vllm, tiny_folder):
    engine = scripted_engine(fake_vllm, tiny_folder, " the dragon flew over the mountains", fail_after=2)
    with pytest.raises(RuntimeError, match="the engine died"):
        collect(engine, [job(max_length=20)])


# --- through the deployment, without Serve ------------------------------------------------------


def test_deployment_hands_vllm_requests_straight_to_the_engine(fake_vllm, tiny_folder):
    deployment = LocalLLMDeployment([vllm_entry(tiny_folder).model_dump(mode="json")])
    assert not deployment.generator.gathers_batches("tiny-llm")  # no serve.batch in between
    engine = scripted_engine(fake_vllm, tiny_folder, " the dragon flew over the mountains")
    deployment.models["tiny-llm"] = engine

    async def run():
        streamed = [item async for item in deployment.generate_stream(
            job(stop_sequence=["mountains"], typical=0.3, rep_pen=1.1, rep_pen_range=32).model_dump())]
        whole = await deployment.generate(job(max_length=2).model_dump())
        return streamed, whole

    streamed, whole = asyncio.run(run())
    result = streamed[-1]["result"]
    assert "".join(i["delta"] for i in streamed) == result["text"] == " the dragon flew over the "
    assert all(i["delta"] for i in streamed[:-1])
    assert result["warnings"] == ["typical", "rep_pen_range"] and result["batch_size"] == 1
    assert (result["node_id"], result["replica"]) == ("node-1", "replica-1")
    assert whole["completion_tokens"] == 2 and whole["finish_reason"] == "length"


def test_deployment_reports_the_missing_extra(monkeypatch, tiny_folder):
    monkeypatch.setitem(sys.modules, "vllm", None)
    deployment = LocalLLMDeployment([vllm_entry(tiny_folder).model_dump(mode="json")])
    with pytest.raises(RuntimeError, match=r"loading 'tiny-llm' failed: EngineUnavailable: .*pip install -e '\.\[vllm\]'"):
        asyncio.run(deployment.generate(job().model_dump()))


# --- the horde API's answer ---------------------------------------------------------------------


def test_horde_answer_names_parameters_the_engine_cannot_honour(sqlite_db, tmp_path):
    import yaml
    from fastapi.testclient import TestClient

    from api.app import create_app
    from conftest import ROOT, make_ctx

    catalog = yaml.safe_load(open(f"{ROOT}/configs/models.yaml"))
    catalog["models"].append({"name": "gpu-llm", "family": "llm", "engine": "vllm", "max_context_length": 4096,
                              "weights": {"kind": "pretrained", "path": "org/some-llm", "dtype": "bfloat16"}})
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    ctx = make_ctx(sqlite_db, tmp_path, catalog_path=str(path), served_models=["tiny-llm", "gpu-llm"])
    headers = {"apikey": "0000000000", "Client-Agent": "rayhorde-tests:1:none"}
    with TestClient(create_app(ctx)) as client:
        def warnings(models, **params):
            r = client.post("/api/v2/generate/text/async", headers=headers,
                            json={"prompt": "Hello", "models": models, "params": params})
            assert r.status_code == 202, r.text
            return [w["message"] for w in r.json().get("warnings") or []]

        assert warnings(["gpu-llm"], typical=0.5, rep_pen_range=64) == [
            "params.typical: not implemented by the vllm engine of gpu-llm; generated without it there",
            "params.rep_pen_range: not implemented by the vllm engine of gpu-llm; generated without it there"]
        assert warnings([], typical=0.5) == [  # no model named: any served one may run it
            "params.typical: not implemented by the vllm engine of gpu-llm; generated without it there"]
        assert warnings(["tiny-llm"], typical=0.5, rep_pen_range=64) == []  # the builtin engine has both
        assert warnings(["gpu-llm"], typical=1.0, rep_pen_range=0) == []  # off: nothing to miss
        assert warnings(["gpu-llm"], rep_pen=1.0, rep_pen_range=64) == []  # no penalty, no window


def test_generated_text_never_holds_a_nul_character():
    """A byte-level vocabulary can sample the NUL byte; the text a row hands out (and records)
    leaves it out, so it can be stored in PostgreSQL and submitted by an HTTP worker."""
    from deployments.jobs import TextJob
    from deployments.llm_engines.base import TextRow
    from models.tiny_llm import build_tokenizer

    tok = build_tokenizer()
    nul = next(i for i in range(len(tok)) if "\x00" in tok.decode([i]))
    a = next(i for i in range(len(tok)) if tok.decode([i]) == "a")
    job = TextJob(model="tiny-llm", seed=1, prompt="p", max_length=8)
    row = TextRow(0, job, 1, tok, frozenset())
    deltas = [row.advance(t) for t in (a, nul, a, nul)]
    assert "".join(deltas) + row.end("length") == row.text == "aa"
