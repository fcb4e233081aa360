"""Text engines: what runs an llm-family model behind the LLM deployment (deployments/llm.py).

The catalog entry names its engine (`engine: builtin | vllm`, models/catalog.py) and
`build_engine` picks the class, as ray.serve.llm's builder picks the engine of its one
LLMServer deployment class from the LLMConfig. Every engine implements `TextEngine`
(base.py); the deployment above them is the same whichever runs a model.

- builtin (builtin.py): our batched decode loop over transformers; CPU or GPU, the default.
- vllm (vllm_engine.py): vLLM on a GPU, from the optional extra `pip install -e '.[vllm]'`.
"""

from __future__ import annotations

import torch

from deployments.llm_engines.base import FinishEvent, Step, TextEngine, TextRow, TokenEvent
from models.catalog import ModelEntry

__all__ = ["FinishEvent", "Step", "TextEngine", "TextRow", "TokenEvent", "build_engine", "engine_class"]


def engine_class(kind: str) -> type[TextEngine]:
    """The engine class for a catalog entry's `engine` (importing it does not import vLLM)."""
    if kind == "builtin":
        from deployments.llm_engines.builtin import BuiltinEngine

        return BuiltinEngine
    if kind == "vllm":
        from deployments.llm_engines.vllm_engine import VLLMEngine

        return VLLMEngine
    raise ValueError(f"engine: {kind!r} is not a text engine; known: builtin, vllm")


def build_engine(entry: ModelEntry, device: str | torch.device) -> TextEngine:
    """The entry's model, loaded into the engine it names."""
    return engine_class(entry.engine).load(entry, device)
