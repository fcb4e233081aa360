"""Built-in random-weight adapters for the tiny pipelines of `models/tiny.py`.

They exist so that tests and the embedded demo exercise the real adapter path (a .safetensors
file on disk, loaded by diffusers' `load_lora_weights` / `load_textual_inversion`) without
downloading anything. Each is seeded, so the same name always gives the same tensors.

- LoRAs are written in kohya's key layout (`lora_unet_*`, `lora_te*_*` with `lora_down`,
  `lora_up` and `alpha`), the layout of nearly every LoRA on CivitAI, so the tiny ones go
  through the same key conversion as the real ones. They cover the UNet's attention
  projections (only the mid block has attention in the tiny UNets) and every text encoder
  attention projection.
- Textual inversions use A1111's layouts: SD 1.5 `{"emb_params": [n, 32]}`, SDXL
  `{"clip_l": [n, 32], "clip_g": [n, 48]}`.

Magnitudes are chosen so an adapter at strength 1 visibly changes a 128x128, 4-step image
(random tiny weights are small; a LoRA delta of the same scale would be lost in the noise).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

_RANK = 4
_ATTN = ("to_q", "to_k", "to_v", "to_out_0")
_MID = "lora_unet_mid_block_attentions_0_transformer_blocks_0"
_TE_LAYERS = 5  # models.tiny._text_config: num_hidden_layers
_TE_PROJ = ("q_proj", "k_proj", "v_proj", "out_proj")


def _pair(g: torch.Generator, out_f: int, in_f: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    down = torch.randn(_RANK, in_f, generator=g) * scale
    up = torch.randn(out_f, _RANK, generator=g) * scale
    return down, up


def _add(sd: dict[str, torch.Tensor], key: str, down: torch.Tensor, up: torch.Tensor) -> None:
    sd[f"{key}.lora_down.weight"] = down.contiguous()
    sd[f"{key}.lora_up.weight"] = up.contiguous()
    # alpha == rank: kohya's scale alpha/rank is 1, so the file's deltas are used as written.
    sd[f"{key}.alpha"] = torch.tensor(float(_RANK))


def _lora(seed: int, unet_inner: int, cross_dim: int, encoders: dict[str, int], scale: float) -> dict[str, torch.Tensor]:
    """A kohya LoRA for a tiny UNet whose mid block is `unet_inner` wide and attends to
    `cross_dim`-wide text, plus every attention projection of the named text encoders
    (`{kohya prefix: hidden width}`)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for attn, ctx in (("attn1", unet_inner), ("attn2", cross_dim)):
        for proj in _ATTN:
            in_f = ctx if proj in ("to_k", "to_v") else unet_inner
            _add(sd, f"{_MID}_{attn}_{proj}", *_pair(g, unet_inner, in_f, scale))
    for prefix, width in encoders.items():
        for layer in range(_TE_LAYERS):
            for proj in _TE_PROJ:
                key = f"{prefix}_text_model_encoder_layers_{layer}_self_attn_{proj}"
                _add(sd, key, *_pair(g, width, width, scale))
    return sd


def tiny_lora() -> dict[str, torch.Tensor]:
    """SD 1.5 tiny: mid block 16 wide, text 32 wide, one text encoder (`lora_te`)."""
    return _lora(1001, 16, 32, {"lora_te": 32}, 0.6)


def tiny_lora_2() -> dict[str, torch.Tensor]:
    """A second SD 1.5 LoRA (another seed), for tests that combine or switch LoRAs."""
    return _lora(1002, 16, 32, {"lora_te": 32}, 0.6)


def tiny_lora_xl() -> dict[str, torch.Tensor]:
    """SDXL tiny: mid block 16 wide, cross-attention over both encoders (32 + 48)."""
    return _lora(1003, 16, 80, {"lora_te1": 32, "lora_te2": 48}, 0.6)


def tiny_ti() -> dict[str, torch.Tensor]:
    """SD 1.5 tiny: 3 vectors of the text encoder's width (32), A1111's `emb_params` layout."""
    g = torch.Generator().manual_seed(2001)
    return {"emb_params": torch.randn(3, 32, generator=g) * 2.0}


def tiny_ti_xl() -> dict[str, torch.Tensor]:
    """SDXL tiny: 2 vectors per encoder (clip_l 32, clip_g 48), the SDXL embedding layout."""
    g = torch.Generator().manual_seed(2002)
    return {"clip_l": torch.randn(2, 32, generator=g) * 2.0, "clip_g": torch.randn(2, 48, generator=g) * 2.0}


# AdapterEntry.source.path for kind == "builtin" -> the state dict it names.
BUILTIN_ADAPTERS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "tiny-lora": tiny_lora,
    "tiny-lora-2": tiny_lora_2,
    "tiny-lora-xl": tiny_lora_xl,
    "tiny-ti": tiny_ti,
    "tiny-ti-xl": tiny_ti_xl,
}


def save_builtin(name: str, path: str | Path) -> Path:
    """Write the built-in adapter `name` to `path` as .safetensors (atomically: a temporary
    file renamed into place, so a concurrent reader never sees half a file)."""
    if name not in BUILTIN_ADAPTERS:
        raise KeyError(f"no built-in adapter {name!r}; known: {sorted(BUILTIN_ADAPTERS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{id(path)}.tmp")
    save_file(BUILTIN_ADAPTERS[name](), str(tmp), metadata={"format": "pt", "rayhorde_builtin": name})
    tmp.replace(path)
    return path
