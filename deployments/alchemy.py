"""The alchemy deployment: the AI Horde's `caption`, `interrogation` and `nsfw` forms
(models/alchemy/), one Serve deployment for the three.

    handle.caption.remote(image_bytes)            -> str
    handle.interrogate.remote(image_bytes, top_k) -> {"tags": [{"text", "confidence"}], ...}
    handle.nsfw.remote([image_bytes, ...])        -> [bool, ...]

Each form's model loads on its first request, once (loads are serialised by one lock), and
stays. A form's model work runs one request at a time (per form) in a worker thread, so the
replica's event loop stays free for the other forms and for queueing, and one model never holds
two requests' activations at once. Its replicas' size and autoscaling come from the Serve config.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from ray import serve

from deployments.diffusion.common import decode_source
from deployments.jobs import JobRejected
from models.alchemy.registry import ALCHEMY_FORMS, AlchemyModelEntry, load

T = TypeVar("T")
SOURCE_FIELD = "source_image"


@serve.deployment(name="alchemy", max_ongoing_requests=8)
class AlchemyDeployment:
    def __init__(self, entries: list[dict], nsfw_strictness: float = 0.0):
        """`entries`: AlchemyModelEntry dicts, the forms this replica serves (each at most once);
        `nsfw_strictness`: the safety checker's adjustment (Settings.nsfw_strictness)."""
        self.nsfw_strictness = float(nsfw_strictness)
        parsed = [AlchemyModelEntry.model_validate(d) for d in entries]
        names = [e.name for e in parsed]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"alchemy entries name {', '.join(repeated)} more than once")
        self.entries = {e.name: e for e in parsed}
        self.device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
        self.models: dict[str, Any] = {}
        self.load_lock = asyncio.Lock()
        self.run_locks = {name: asyncio.Lock() for name in ALCHEMY_FORMS}

    async def _model(self, name: str) -> Any:
        if name not in self.entries:
            raise JobRejected(f"form {name!r} is not served here (serving: {', '.join(self.entries) or 'none'})")
        if name in self.models:  # loaded: no need to wait behind another form's load
            return self.models[name]
        async with self.load_lock:
            if name not in self.models:  # a failed load is not kept: the next request tries again
                self.models[name] = await asyncio.to_thread(load, self.entries[name], self.device)
        return self.models[name]

    async def _run(self, name: str, work: Callable[[Any], T]) -> T:
        """`work(model)` in a worker thread, one at a time per form. The image bytes are
        decoded inside `work` too: decoding a large image is CPU work as well."""
        model = await self._model(name)
        async with self.run_locks[name]:
            return await asyncio.to_thread(work, model)

    async def caption(self, image: bytes) -> str:
        """A caption of one image (WebP, PNG or JPEG bytes)."""
        return await self._run("caption", lambda m: m.caption([decode_source(image, SOURCE_FIELD)])[0])

    async def interrogate(self, image: bytes, top_k: int = 5) -> dict:
        """`{category: [{"text": term, "confidence": float}, ...]}`, best first, at most `top_k`
        terms for each of tags, sites, artists, flavors, mediums, movements, techniques."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise JobRejected(f"top_k must be a positive integer, got {top_k!r}")
        return await self._run("interrogation",
                               lambda m: m.interrogate(decode_source(image, SOURCE_FIELD), top_k))

    async def nsfw(self, images: list[bytes]) -> list[bool]:
        """The safety checker's verdict for each image, in order, in batches."""
        def field(i: int) -> str:  # which image of a batch was bad
            return SOURCE_FIELD if len(images) == 1 else f"{SOURCE_FIELD}[{i}]"

        def work(checker) -> list[bool]:
            decoded = [decode_source(data, field(i)) for i, data in enumerate(images)]
            return [verdict.nsfw for verdict in checker.check(decoded, self.nsfw_strictness)]

        return await self._run("nsfw", work)
