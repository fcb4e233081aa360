"""The job contract: what the dispatcher and `rayhorde worker` hand a model deployment.

One pydantic model per kind, written once and imported by `cluster/` and `deployments/` alike:

- `ImageJob`: one pipeline call of a diffusion family, one image per seed. It names its
  `workflow` (models/workflows.py), so the dispatcher knows what it starts.
- `TextJob`: one generation of the LLM deployment.

Each is built from a claim (`from_claim`, the dispatcher: a claimed queue row) or from a pop
payload (`from_pop`, `rayhorde worker`: the AI Horde's wire format) with one constructor each,
and checked here, so a deployment never validates by hand. A job a deployment cannot run
because of what it asks (not because a replica died) raises `JobRejected`: the dispatcher then
records it `faulted` at once with the reason instead of retrying it.

Nothing here imports torch: the module is cheap to import wherever jobs are built.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from models.adapters import MAX_LORAS, MAX_TIS, LoraSpec, TiSpec
from models.catalog import Family
from models.postprocess.registry import PostProcessorName
from models.workflows import (
    DEFAULT_DENOISE,
    DEFAULT_HIRES_DENOISE,
    ControlType,
    Workflow,
    choose_workflow,
)

SEED_SPACE = 2**32  # the horde's seed range
MAX_PROMPT_CHARS = 50_000
MAX_EXTRA_SOURCES = 5


class JobRejected(ValueError):
    """A job that cannot run as given (its input, not a failure of the replica): recorded as
    `faulted` with this message at once, never retried. A ValueError, so code that checks
    input errors the usual way keeps working."""


def is_rejection(exc: BaseException) -> bool:
    """Whether a deployment refused the job for its input (JobRejected, which Ray re-raises
    as a RayTaskError that is also an instance of the cause) rather than failing to run it."""
    return isinstance(exc, JobRejected) or isinstance(getattr(exc, "cause", None), JobRejected)


def _whole_number(value: Any) -> Any:
    """JSON may send 80.0 for 80; a fraction, a bool or a string is a mistake, not a number."""
    if isinstance(value, bool) or not (isinstance(value, int) or
                                       (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"must be an integer, got {value!r}")
    return int(value)


def _finite_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return float(value)


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]
Number = Annotated[float, BeforeValidator(_finite_number)]


class _Job(BaseModel):
    # Unknown fields are refused: a parameter someone forgot to map is an error, not a silently
    # ignored setting. JSON null means the default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @classmethod
    def parse(cls, data: Any):
        """The job from a dict, or JobRejected naming the first bad field."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise JobRejected(f"a {cls.__name__} must be a dict, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise JobRejected(_first_error(e)) from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ""
    for part in err["loc"]:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = err["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


# ------------------------------------------------------------------------------------- images


class ExtraSource(BaseModel):
    """One more image prompt of a remix, with its strength (the source itself has 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    image: bytes = Field(max_length=64 * 1024 * 1024)
    strength: Annotated[Number, Field(ge=0, le=5)] = 1.0


class ExtraText(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    text: str = Field(max_length=2000)
    reference: str = Field(min_length=1, max_length=64)


class ImageJob(_Job):
    """One pipeline call: `len(seeds)` images of one prompt. Stable Cascade ignores
    `sampler_name`, `karras` and `clip_skip` (deployments/diffusion/cascade.py says why)."""

    model: str = Field(min_length=1, max_length=255)
    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seeds: tuple[Annotated[WholeNumber, Field(ge=0, lt=2**64)], ...] = Field(min_length=1, max_length=20)
    width: Annotated[WholeNumber, Field(ge=64, le=3072, multiple_of=8)] = 512
    height: Annotated[WholeNumber, Field(ge=64, le=3072, multiple_of=8)] = 512
    steps: Annotated[WholeNumber, Field(ge=1, le=500)] = 30
    cfg_scale: Annotated[Number, Field(ge=0, le=100)] = 7.0
    sampler_name: str = Field("k_euler", max_length=32)
    karras: bool = True
    clip_skip: Annotated[WholeNumber, Field(ge=1, le=12)] = 1
    tiling: bool = False  # accepted, not implemented (seamless tiling needs circular padding)
    workflow: Workflow = Workflow.txt2img
    # Lossless PNG bytes (the API stores them so), or any PIL-readable bytes from a worker's
    # download: decoded in the deployment. The mask's white is "repaint".
    source_image: bytes | None = Field(None, max_length=64 * 1024 * 1024)
    source_mask: bytes | None = Field(None, max_length=64 * 1024 * 1024)
    denoising_strength: Annotated[Number, Field(ge=0.01, le=1)] = DEFAULT_DENOISE
    hires_fix_denoising_strength: Annotated[Number, Field(ge=0.01, le=1)] = DEFAULT_HIRES_DENOISE
    # LoRAs and textual inversions, by catalog name (models/adapters.py resolves them).
    loras: tuple[LoraSpec, ...] = Field((), max_length=MAX_LORAS)
    tis: tuple[TiSpec, ...] = Field((), max_length=MAX_TIS)
    # ControlNet: the source is annotated into a control map (or is one: image_is_control).
    control_type: ControlType | None = None
    image_is_control: bool = False
    return_control_map: bool = False
    control_strength: Annotated[Number, Field(ge=0, le=5)] = 1.0
    # Remix: up to 5 more image prompts for Stable Cascade, each with its strength.
    extra_source_images: tuple[ExtraSource, ...] = Field((), max_length=MAX_EXTRA_SOURCES)
    # Post-processing after the generation (models/postprocess/registry.py names and order).
    post_processing: tuple[PostProcessorName, ...] = Field((), max_length=8)
    facefixer_strength: Annotated[Number, Field(ge=0, le=1)] = 0.5
    # QR codes: the AI Horde's extra_texts ({text, reference}; models/qr.py reads them).
    extra_texts: tuple[ExtraText, ...] = Field((), max_length=20)

    @model_validator(mode="after")
    def _workflow_inputs(self) -> "ImageJob":
        if self.workflow in (Workflow.img2img, Workflow.inpainting, Workflow.outpainting) \
                and self.source_image is None:
            raise ValueError(f"source_image: the {self.workflow.value} workflow needs one")
        if self.workflow in (Workflow.txt2img, Workflow.transparent) and self.source_image is not None:
            raise ValueError(f"source_image: the {self.workflow.value} workflow takes none")
        if self.source_mask is not None and self.source_image is None:
            raise ValueError("source_mask: given without a source_image")
        if self.workflow in (Workflow.controlnet, Workflow.remix) and self.source_image is None:
            raise ValueError(f"source_image: the {self.workflow.value} workflow needs one")
        if self.workflow is Workflow.controlnet and self.control_type is None:
            raise ValueError("control_type: the controlnet workflow needs one")
        if self.extra_source_images and self.workflow is not Workflow.remix:
            raise ValueError("extra_source_images: only the remix workflow takes them")
        if (self.workflow is Workflow.qr_code) != bool(self.extra_texts):
            raise ValueError("extra_texts: the qr_code workflow needs them, and only it takes them")
        return self

    @classmethod
    def from_claim(cls, family: Family, jobs: list["ClaimedImage"], source_image: bytes | None,
                   source_mask: bytes | None, extra_sources: list[dict] | None = None) -> "ImageJob":
        """The job for claimed generations of one request (one pipeline call, a seed each).
        The source bytes are the ones stored with the request; `extra_sources` its remix
        images ({image: bytes, strength})."""
        first, p = jobs[0], jobs[0].params
        return cls.parse({
            "model": first.model, "prompt": first.prompt, "negative_prompt": first.negative_prompt,
            **_image_params(family, p, first.source_processing, source_image is not None),
            "seeds": [j.seed for j in jobs],
            "source_image": source_image, "source_mask": source_mask,
            "extra_source_images": extra_sources or None,
        })

    @classmethod
    def from_pop(cls, family: Family, model: str, payload: dict, count: int,
                 source_processing: str | None, source_image: bytes | None,
                 source_mask: bytes | None, extra_sources: list[dict] | None = None) -> "ImageJob":
        """The job for an image pop (the AI Horde's payload): the prompt split on "###" into
        positive and negative, one seed per image counting up from the payload's seed."""
        positive, _, negative = str(payload.get("prompt") or "").partition("###")
        seed = str(payload.get("seed") if payload.get("seed") is not None else "").strip()
        if not (seed.isascii() and seed.isdigit()):
            raise JobRejected(f"seed: {payload.get('seed')!r} is not a number")
        first = int(seed) % SEED_SPACE
        params = {**payload, "steps": payload.get("ddim_steps", payload.get("steps"))}
        return cls.parse({
            "model": model, "prompt": positive.strip(), "negative_prompt": negative.strip(),
            **_image_params(family, params, source_processing, source_image is not None),
            "seeds": [(first + i) % SEED_SPACE for i in range(count)],
            "source_image": source_image, "source_mask": source_mask,
            "extra_source_images": extra_sources or None,
        })


def _image_params(family: Family, p: dict, source_processing: str | None, has_source: bool) -> dict:
    """The job fields that come from a request's params (stored, or a pop payload's)."""
    try:
        workflow = choose_workflow(
            family, width=int(p["width"]), height=int(p["height"]),
            source_processing=source_processing, has_source=has_source,
            hires_fix=bool(p.get("hires_fix")), transparent=bool(p.get("transparent")),
            control_type=p.get("control_type"), workflow=p.get("workflow"))
    except (KeyError, TypeError, ValueError) as e:
        raise JobRejected(f"width, height: {e!r}") from None
    return {
        "width": p["width"], "height": p["height"], "steps": p.get("steps"),
        "cfg_scale": p.get("cfg_scale"), "sampler_name": p.get("sampler_name"),
        "karras": p.get("karras"), "clip_skip": p.get("clip_skip"), "tiling": p.get("tiling"),
        "workflow": workflow.value,
        "denoising_strength": p.get("denoising_strength"),
        "hires_fix_denoising_strength": p.get("hires_fix_denoising_strength"),
        "loras": p.get("loras"), "tis": p.get("tis"),
        "control_type": p.get("control_type"), "image_is_control": p.get("image_is_control"),
        "return_control_map": p.get("return_control_map"),
        "control_strength": p.get("control_strength"),
        "extra_texts": p.get("extra_texts") or None,
        "post_processing": p.get("post_processing") or None,
        "facefixer_strength": p.get("facefixer_strength"),
    }


class ClaimedImage(Protocol):
    """What from_claim reads of a claimed queue row (api/db/queue.py ClaimedJob)."""

    model: str
    prompt: str
    negative_prompt: str
    seed: int
    params: dict
    source_processing: str | None


# --------------------------------------------------------------------------------------- text


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: str = Field(min_length=1, max_length=64)
    content: str = Field(max_length=MAX_PROMPT_CHARS)


class TextJob(_Job):
    """One generation (contract in deployments/llm.py's module docstring)."""

    model: str = Field(min_length=1, max_length=255)
    seed: WholeNumber
    prompt: str | None = Field(None, max_length=1_000_000)
    messages: tuple[Message, ...] | None = Field(None, min_length=1, max_length=1000)
    max_length: Annotated[WholeNumber, Field(ge=1)] = 80
    max_context_length: Annotated[WholeNumber, Field(ge=2)] = 1024
    temperature: Annotated[Number, Field(ge=0)] = 0.7
    top_k: Annotated[WholeNumber, Field(ge=0)] = 100
    top_p: Annotated[Number, Field(gt=0, le=1)] = 0.92
    typical: Annotated[Number, Field(ge=0, le=1)] = 1.0
    min_p: Annotated[Number, Field(ge=0, le=1)] = 0.0
    rep_pen: Annotated[Number, Field(ge=1)] = 1.1
    rep_pen_range: Annotated[WholeNumber, Field(ge=0)] = 320
    stop_sequence: tuple[Annotated[str, Field(min_length=1, max_length=1000)], ...] = \
        Field((), max_length=32)

    @model_validator(mode="after")
    def _check(self) -> "TextJob":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt / messages: give exactly one of them")
        if self.max_context_length <= self.max_length:
            raise ValueError(f"max_context_length: must exceed max_length ({self.max_length}) to "
                             f"leave room for the prompt, got {self.max_context_length}")
        return self

    @property
    def prompt_budget(self) -> int:
        """How many prompt tokens fit: the whole context must hold prompt + generated text."""
        return self.max_context_length - self.max_length

    @classmethod
    def from_dict(cls, d: Any) -> "TextJob":
        return cls.parse(d)

    @classmethod
    def from_claim(cls, job: "ClaimedText") -> "TextJob":
        """The job for one claimed text generation: its own seed, the prompt or (chat
        requests) the messages the model's chat template renders."""
        params = {k: v for k, v in job.params.items() if k in TEXT_PARAMS}
        if "messages" not in job.params:
            params["prompt"] = job.prompt
        else:
            params["messages"] = job.params["messages"]
        return cls.parse({"model": job.model, "seed": job.seed, **params})

    @classmethod
    def from_pop(cls, model: str, payload: dict, seed: int) -> "TextJob":
        """The job for a text pop (KoboldAI parameters). The horde's text protocol hands
        workers no seed: the caller draws one, so n generations of one prompt differ."""
        params = {k: payload[k] for k in TEXT_PARAMS if payload.get(k) is not None}
        return cls.parse({"model": model, "prompt": str(payload.get("prompt") or ""),
                          "seed": seed, **params})


# The sampling parameters a text job takes from a request or a pop payload: every field but
# the model, seed and input.
TEXT_PARAMS: tuple[str, ...] = tuple(
    k for k in TextJob.model_fields if k not in ("model", "seed", "prompt", "messages"))


class ClaimedText(Protocol):
    model: str
    prompt: str
    seed: int
    params: dict


Kind = Literal["image", "text"]
