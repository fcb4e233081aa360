"""How a loaded pipeline is set up for the device it runs on: the diffusion deployment calls
`prepare` right after loading a model (deployments/diffusion/deployment.py), and warms the
replica up with one small generation before it takes requests.

- Precision (`pipeline_dtype`): float32 on a CPU (half-precision kernels there are missing or
  slow). On a GPU, half precision: float16 for SD 1.5 and SDXL, bfloat16 for Stable Cascade,
  whose stage C overflows float16 (float32 on the old GPUs without bfloat16); an entry whose
  weights say bfloat16 gets bfloat16. The catalog's `float32` default thus means "full
  precision where half precision does not pay": a GPU runs every image model in half.
- SDXL's own VAE overflows in float16. It keeps `force_upcast`, so every decode and encode runs
  it in float32 (the SDXL pipelines, the Layer Diffuse decoder and the QR passes all honour
  the flag), unless the entry names a VAE made for float16 (`vae:`, for SDXL
  madebyollin/sdxl-vae-fp16-fix), which is loaded in place of the checkpoint's.
- Attention: PyTorch's scaled_dot_product_attention (diffusers' AttnProcessor2_0, the default);
  `sdpa_everywhere` swaps any processor of the slow classic path for its SDPA twin, and
  `slow_attention` names what is left off SDPA (tests assert it is nothing).
- `compile: true` in the catalog: torch.compile of the denoisers (the UNet; Stable Cascade's
  two stage UNets), with nn.Module.compile, in place: LoRA loading, from_pipe and ControlNets
  see the same module. The first call of each new shape compiles (minutes for SDXL), which
  is what the replica's warm-up pays for at its native size.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import (
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor,
    AttnProcessor2_0,
)

from models.catalog import Family, ModelEntry

# The classic (unfused, python softmax) processors and their SDPA versions.
_SDPA_TWIN = {AttnProcessor: AttnProcessor2_0, AttnAddedKVProcessor: AttnAddedKVProcessor2_0}
# torch.compile options for `compile: true` (nn.Module.compile's keyword arguments).
COMPILE_OPTIONS: dict[str, Any] = {}


def pipeline_dtype(family: Family, device: str | torch.device, named: str = "float32",
                   bf16_supported: bool | None = None) -> torch.dtype:
    """The dtype a family's pipeline runs in on `device` (module docstring). `named`: the
    entry's weights.dtype; `bf16_supported`: whether the GPU has bfloat16 (asked of CUDA when
    None)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if named == "bfloat16" or family is Family.stable_cascade:
        return torch.bfloat16 if bf16_supported else torch.float32
    return torch.float16


def pipelines(loaded: Any) -> tuple:
    """A loaded model's pipelines: one, or Stable Cascade's (prior, decoder)."""
    return loaded if isinstance(loaded, tuple) else (loaded,)


def denoisers(loaded: Any) -> list[torch.nn.Module]:
    """The modules every step runs: the UNet, or Stable Cascade's prior and decoder UNets."""
    return [getattr(p, name) for p in pipelines(loaded) for name in ("unet", "prior", "decoder")
            if isinstance(getattr(p, name, None), torch.nn.Module)]


def sdpa_everywhere(module: torch.nn.Module) -> int:
    """Put every attention layer of `module` still on a classic processor on its SDPA twin;
    how many were changed. Custom processors (Layer Diffuse's, IP-Adapter's) are left alone."""
    changed = 0
    for m in module.modules():
        if isinstance(m, Attention) and type(m.processor) in _SDPA_TWIN:
            m.set_processor(_SDPA_TWIN[type(m.processor)]())
            changed += 1
    return changed


def slow_attention(module: torch.nn.Module) -> list[str]:
    """Names of the attention layers of `module` that would not run SDPA."""
    return [name for name, m in module.named_modules()
            if isinstance(m, Attention) and type(m.processor) in _SDPA_TWIN]


def prepare(loaded: Any, entry: ModelEntry, device: str | torch.device, dtype: torch.dtype | None = None) -> Any:
    """Set up a freshly loaded model (one pipeline, or Stable Cascade's pair) for `device`:
    precision (`dtype`, by default pipeline_dtype's), a float16-safe VAE, SDPA attention, and
    compile when the entry asks."""
    device = torch.device(device)
    dtype = dtype or pipeline_dtype(entry.family, device, entry.weights.dtype)
    for pipe in pipelines(loaded):
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                # Cast only what differs (casting a diffusers model warns, even to its own dtype).
                floats = {p.dtype for p in component.parameters() if p.is_floating_point()}
                component.to(device) if floats == {dtype} else component.to(device=device, dtype=dtype)
        if entry.vae is not None:
            swap_vae(pipe, entry.vae, device, dtype)
        elif entry.family is Family.stable_diffusion_xl and dtype is torch.float16:
            keep_vae_upcast(pipe)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                sdpa_everywhere(component)
    if entry.compile:
        for module in denoisers(loaded):
            if device.type == "cuda":
                module.to(memory_format=torch.channels_last)  # what the compiled convolutions want
            module.compile(**COMPILE_OPTIONS)
    return loaded


def keep_vae_upcast(pipe: Any) -> None:
    """SDXL's VAE in float16 is decoded and encoded in float32 (diffusers' force_upcast); a
    checkpoint whose config lost the flag gets it back."""
    if not getattr(pipe.vae.config, "force_upcast", False):
        pipe.vae.register_to_config(force_upcast=True)


def swap_vae(pipe: Any, source: str, device: torch.device, dtype: torch.dtype) -> None:
    """The entry's `vae` (a repo id or folder holding an AutoencoderKL, its config and weights)
    in place of the checkpoint's. Its own config says whether it needs the float32 upcast
    (the fp16-fix VAE: no)."""
    vae = AutoencoderKL.from_pretrained(source, dtype=dtype).to(device).eval()
    pipe.register_modules(vae=vae)


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether nn.Module.compile was applied to `module`."""
    return getattr(module, "_compiled_call_impl", None) is not None
