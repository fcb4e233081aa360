"""The image workflows and the rules that pick one for a request: which workflow a job runs,
whether hires fix applies, the hires fix's first-pass size and second-pass steps.

Pure functions over plain values (no torch), so the API (validation, prices, queue features),
the dispatcher and the deployments all use the same rules. The numbers are the AI Horde's
(shared/horde-facts.md, "Features by workflow").
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Literal

from models.catalog import Family


# The AI Horde's ControlNet control types (models/annotators makes each map).
ControlType = Literal["canny", "hed", "depth", "normal", "openpose", "seg", "scribble",
                      "fakescribbles", "hough"]


class Workflow(str, Enum):
    """What one image job runs. The dispatcher routes on it; each has a task in
    deployments/diffusion/tasks.py."""

    txt2img = "txt2img"
    img2img = "img2img"
    inpainting = "inpainting"
    outpainting = "outpainting"
    hires_fix = "hires_fix"  # a first pass at the family's native size, then a second pass
    transparent = "transparent"  # Layer Diffuse: RGBA out
    # Multi-step workflows: Ray task graphs (deployments/workflows/).
    controlnet = "controlnet"  # annotator -> guided pass
    remix = "remix"  # Stable Cascade: encode each image in parallel -> stage C -> stage B
    qr_code = "qr_code"  # render layers -> split passes -> scan check

    @property
    def painting(self) -> bool:
        return self in (Workflow.inpainting, Workflow.outpainting)

    @property
    def graph(self) -> bool:
        """Whether it runs as a task graph of several nodes rather than one pipeline call."""
        return self in (Workflow.controlnet, Workflow.remix, Workflow.qr_code)


# SDXL's training buckets around 1024x1024 (the hires fix's first pass picks the nearest aspect).
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
                (768, 1344), (1536, 640), (640, 1536))
CASCADE_FIRST_PASS_MAX_SIDE = 1024
DEFAULT_HIRES_DENOISE = 0.65
DEFAULT_DENOISE = 1.0  # img2img without denoising_strength: the horde's default


def first_pass_size(family: Family, width: int, height: int) -> tuple[int, int]:
    """The hires fix's first-pass size: SD 1.5 scales the shorter side to 512 (sides floored to
    multiples of 64), SDXL takes the bucket nearest the aspect ratio, Stable Cascade caps the
    longer side at 1024 (multiples of 128, which its stage B needs)."""
    if family is Family.stable_diffusion_1:
        scale = 512 / min(width, height)
        return (max(64, int(width * scale) // 64 * 64), max(64, int(height * scale) // 64 * 64))
    if family is Family.stable_diffusion_xl:
        aspect = width / height
        return min(SDXL_BUCKETS, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(aspect)))
    if family is Family.stable_cascade:
        scale = min(1.0, CASCADE_FIRST_PASS_MAX_SIDE / max(width, height))
        return (max(128, int(width * scale) // 128 * 128), max(128, int(height * scale) // 128 * 128))
    raise ValueError(f"{family.value} has no hires fix")


def hires_fix_applies(family: Family, width: int, height: int, painting: bool) -> bool:
    """Whether a request's `hires_fix` runs: never for in/outpainting; not for images within the
    family's native size on each side (SD 1.5: 512, SDXL and Cascade: 1024); and not where the
    first pass would be no smaller than the image (nothing left to fix)."""
    if painting or family.kind != "image":
        return False
    native = family.native_side
    if width <= native and height <= native:
        return False
    w1, h1 = first_pass_size(family, width, height)
    return w1 * h1 < width * height


def hires_second_pass_steps(steps: int, denoise: float, width: int, height: int,
                            native_side: int) -> int:
    """The AI Horde's step count of the hires fix's second pass, for a request of `steps` at
    `width` x `height`, second-pass denoise `denoise`, on a family of native side N:
    f = (W*H/N^2) / (3*512/N); u = round(3 + (S-3) d^2); u = round(u * 2^f / 2.25);
    +3 when S <= 18; clamped to [min(6, S), S]."""
    n = native_side
    f = (width * height / n**2) / (3 * 512 / n)
    u = round(3 + (steps - 3) * denoise**2)
    u = round(u * 2**f / 2.25)
    if steps <= 18:
        u += 3
    return max(min(6, steps), min(u, steps))


def choose_workflow(family: Family, *, width: int, height: int, source_processing: str | None,
                    has_source: bool, hires_fix: bool, transparent: bool,
                    control_type: str | None = None, workflow: str | None = None) -> Workflow:
    """The one workflow a request's jobs run. The API has refused the combinations that no
    workflow runs (api/image_workflows.py) before this is asked."""
    if workflow == "qr_code":
        return Workflow.qr_code
    if has_source and source_processing == "remix":
        return Workflow.remix
    if control_type:
        return Workflow.controlnet
    if transparent:
        return Workflow.transparent
    painting = has_source and source_processing in ("inpainting", "outpainting")
    if painting:
        return Workflow(source_processing)
    if hires_fix and hires_fix_applies(family, width, height, painting=False):
        return Workflow.hires_fix  # its first pass is img2img when there is a source
    if has_source:
        return Workflow.img2img
    return Workflow.txt2img
