"""Putting resolved LoRAs and textual inversions (TIs) into a diffusers pipeline, per job.

Loading is the slow part (reading the file, injecting PEFT layers), so each pipeline keeps
what it has loaded, keyed by file content (`ResolvedAdapter.adapter_name`): a LoRA the
pipeline already holds costs one `set_adapters` call. At most `max_loras` LoRAs stay loaded
per pipeline (least recently used deleted first); TIs likewise, up to `max_tis` tokens.

Every job sets the pipeline's whole LoRA state: the job's LoRAs active at the job's weights,
every other loaded LoRA inactive, and `disable_lora()` when the job has none, so nothing leaks
from one job into the next. The caller must not run two jobs on one pipeline at once
(`deployments.diffusion.common.ReplicaRunner` runs one call at a time).

Textual inversion strength: diffusers has no prompt weighting (ComfyUI's `(embedding:x:1.2)`),
so a strength other than 1 scales the embedding vectors themselves; each distinct strength
(rounded to 0.01) is a token of its own.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from models.adapters import AdapterLoadFailed, LoraSpec, ResolvedAdapter, TiSpec

DENOISERS = ("unet", "transformer")  # components that take the LoRA's `model` strength


@dataclass
class _PipeState:
    loras: OrderedDict = field(default_factory=OrderedDict)  # adapter name -> components, LRU order
    tis: OrderedDict = field(default_factory=OrderedDict)  # token -> None, LRU order
    lora_enabled: bool = True


_states: "weakref.WeakKeyDictionary[object, _PipeState]" = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def _state(pipe) -> _PipeState:
    with _states_lock:
        return _states.setdefault(pipe, _PipeState())


def loaded_loras(pipe) -> list[str]:
    """Adapter names this module has loaded into `pipe`, least recently used first."""
    return list(_state(pipe).loras)


def loaded_tis(pipe) -> list[str]:
    return list(_state(pipe).tis)


def apply_adapters(pipe, loras: list[tuple[LoraSpec, ResolvedAdapter]], tis: list[tuple[TiSpec, ResolvedAdapter]],
                   prompt: str, negative_prompt: str, max_loras: int = 8, max_tis: int = 32) -> tuple[str, str]:
    """Make `pipe` run with exactly these adapters; returns the prompts with trigger words
    and TI tokens put in. Raises AdapterLoadFailed for a file diffusers cannot load."""
    st = _state(pipe)
    _set_loras(pipe, st, loras, max(max_loras, len(loras)))
    for spec, res in loras:
        prompt = _inject_trigger(prompt, spec.inject_trigger, res.triggers)
    for spec, res in tis:
        token = _load_ti(pipe, st, res, spec.strength, max(max_tis, len(tis)))
        if spec.inject_ti == "prompt":
            prompt = f"{token} {prompt}"  # first, so CLIP's 77-token cut never drops it
        elif spec.inject_ti == "negprompt":
            negative_prompt = f"{token} {negative_prompt}"
        else:  # the prompt refers to it itself, as the horde's `embedding:NAME`
            ref = re.compile(rf"\bembedding:{re.escape(spec.name)}(?![\w.-])")
            prompt, negative_prompt = ref.sub(token, prompt), ref.sub(token, negative_prompt)
    return prompt, negative_prompt


def _set_loras(pipe, st: _PipeState, loras: list, limit: int) -> None:
    if not loras:
        if st.loras and st.lora_enabled:
            pipe.disable_lora()
            st.lora_enabled = False
        return
    wanted = {res.adapter_name for _, res in loras}
    weights: dict[str, dict[str, float]] = {}
    for spec, res in loras:
        name = res.adapter_name
        if name not in st.loras:
            _evict(pipe, st, wanted, limit - 1)
            st.loras[name] = _load_lora(pipe, res)
        st.loras.move_to_end(name)
        # The same file twice in one job: the deltas add up, so the strengths do.
        w = weights.setdefault(name, {c: 0.0 for c in st.loras[name]})
        for c in w:
            w[c] += spec.model if c in DENOISERS else spec.clip
    if not st.lora_enabled:
        pipe.enable_lora()
        st.lora_enabled = True
    pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))


def _evict(pipe, st: _PipeState, keep: set[str], room: int) -> None:
    for old in [n for n in st.loras if n not in keep][: max(0, len(st.loras) - room)]:
        pipe.delete_adapters(old)
        del st.loras[old]


def _load_lora(pipe, res: ResolvedAdapter) -> tuple[str, ...]:
    """Load one LoRA file; returns the components it has weights for (its `set_adapters`
    weight keys: passing one it lacks makes diffusers warn on every job)."""
    name = res.adapter_name
    try:
        with _quiet_transformers():
            pipe.load_lora_weights(str(res.path), adapter_name=name)
    except Exception as e:  # a LyCORIS variant, a file for another architecture, a corrupt file
        try:
            pipe.delete_adapters(name)  # drop whatever part was injected before the failure
        except Exception:
            pass
        raise AdapterLoadFailed(res.name, f"{type(e).__name__}: {str(e)[:200]}") from None
    parts = tuple(c for c, names in pipe.get_list_adapters().items() if name in names)
    if not parts:
        raise AdapterLoadFailed(res.name, "no weights matched this model")
    return parts


@contextlib.contextmanager
def _quiet_transformers():
    """transformers 5 prints a "LOAD REPORT" table calling every adapter already in a text
    encoder MISSING when another is loaded (the weights are right: the tests check the
    images), plus a progress bar per load; in a replica's log that is noise per job."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # PEFT warns on every adapter after the first one
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _ti_vectors(sd: dict[str, torch.Tensor], key: str | None) -> torch.Tensor:
    """The embedding matrix [n, width] of an A1111/CivitAI TI file: SDXL files hold `clip_l`
    and `clip_g`, SD 1.x ones `emb_params` (or a single tensor under any name)."""
    if key is not None:
        t = sd.get(key)
    elif "emb_params" in sd:
        t = sd["emb_params"]
    elif "clip_l" in sd:
        t = sd["clip_l"]
    else:
        t = next(iter(sd.values())) if len(sd) == 1 else None
    if t is None:
        raise KeyError(f"expected {key or 'emb_params'} among {sorted(sd)[:5]}")
    return t.unsqueeze(0) if t.ndim == 1 else t


def _load_ti(pipe, st: _PipeState, res: ResolvedAdapter, strength: float, limit: int) -> str:
    strength = round(strength, 2)
    token = f"<ti-{res.sha256[:12]}>" if strength == 1 else f"<ti-{res.sha256[:12]}@{strength:g}>"
    if token in st.tis:
        st.tis.move_to_end(token)
        return token
    encoders = [(pipe.tokenizer, pipe.text_encoder, None)]
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL: one table per encoder
        encoders = [(pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")]
    for old in list(st.tis)[: max(0, len(st.tis) - (limit - 1))]:
        _unload_ti(pipe, encoders, old)
        del st.tis[old]
    try:
        sd = load_file(str(res.path))
        for tok, enc, key in encoders:
            vec = _ti_vectors(sd, key)
            width = enc.get_input_embeddings().weight.shape[1]
            if vec.ndim != 2 or vec.shape[1] != width or not 0 < vec.shape[0] <= 75:
                raise ValueError(f"embedding of shape {tuple(vec.shape)}, the text encoder is {width} wide")
            with _quiet_transformers():  # "new embeddings initialized from a normal distribution": then overwritten
                pipe.load_textual_inversion(vec.float() * strength, token=token, tokenizer=tok, text_encoder=enc)
    except Exception as e:
        _unload_ti(pipe, encoders, token)  # a half-loaded SDXL TI would stay in one encoder
        raise AdapterLoadFailed(res.name, f"{type(e).__name__}: {str(e)[:200]}") from None
    st.tis[token] = None
    return token


def _unload_ti(pipe, encoders: list, token: str) -> None:
    """Remove `token` and its extra vectors (`token_1`, ... for a multi-vector TI)."""
    extra = re.compile(rf"{re.escape(token)}_\d+")
    for tok, enc, _ in encoders:
        tokens = [t for t in tok.added_tokens_encoder if t == token or extra.fullmatch(t)]
        if tokens:
            pipe.unload_textual_inversion(tokens, tokenizer=tok, text_encoder=enc)


def _inject_trigger(prompt: str, how: str | None, triggers: list[str]) -> str:
    """inject_trigger: "any" -> the first trained word, "all" -> all of them, any other text
    -> that text if it is one of them (case-insensitive); appended to the prompt."""
    if not how or not triggers:
        return prompt
    if how.lower() == "any":
        words = triggers[:1]
    elif how.lower() == "all":
        words = triggers
    else:
        words = [how] if how.strip().lower() in {t.strip().lower() for t in triggers} else []
    return ", ".join([prompt, *words]) if words else prompt
