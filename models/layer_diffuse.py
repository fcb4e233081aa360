"""`params.transparent`: Layer Diffuse for SD 1.5 and SDXL, images with a real alpha channel.

Why: the AI Horde's engine makes transparent images with Layer Diffuse (arXiv 2402.17113). The
UNet is nudged into a "transparent latent space" (an ordinary-looking latent that also encodes
alpha) and a separate transparent decoder (models/layer_diffuse_decoder.py) reads RGBA back out
of the normal VAE decode and the latent. The nudge comes from the published files in
`LayerDiffusion/layerdiffusion-v1`, in two forms this module reproduces key for key:

- SD 1.5, `layer_sd15_transparent_attn.safetensors`: "attention sharing" units (the reference
  loaders build them with one frame and no control input and load them with strict=True) that
  replace the 32 self/cross attentions of SD 1.5's transformer blocks, numbered 0-31 in the order
  input_blocks 1,2,4,5,7,8 / output_blocks 3-11 / middle_block (attn1 then attn2 each). Unit `i`
  holds `hookers.layers.{i}.` + `to_{q,k,v,out}_lora.0.{down,up}.weight` (rank-256 factors
  [rank, in] and [out, rank] whose product is added to the attention's own q/k/v/out weights)
  and `temporal_{i,q,k,v,o}.{weight,bias}` + `temporal_n.{weight,bias}` (a LayerNorm, an input
  projection and an attention across frames, here a single frame, added as a second residual).
  The unit's output replaces the attention's: `o = attn'(h)` with the merged weights, then
  `o + temporal(h + o)`.
- SDXL, `layer_xl_transparent_conv.safetensors`: weight offsets for every UNet layer except the
  attention q/k/v projections ("all layers that are not q,k,v", per the release notes), stored as
  `diffusion_model.<LDM key>::diff::0`, merged by adding them to the weights. Required here:
  every parameter under input/middle/output blocks and `out`; time and label embeddings are
  accepted if present (published converters of these delta files know no such keys, but the
  release notes do not rule them out).

Both are applied reversibly (attention processors restored, original weights copied back), so one
replica serves transparent and plain jobs alike; every file key must map onto this UNet (with the
right shape) and every key this UNet needs must be in the file, or loading fails naming the keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from models.layer_diffuse_decoder import (
    SIZE_MULTIPLE,
    TINY,
    TransparentVAEDecoder,
    check_keys,
    decode_rgba,
    load_decoder,
    name_keys,
)
from models.ldm_export import unet_to_ldm

__all__ = [
    "SD15", "SDXL", "PUBLISHED_FILES", "Injection", "LayerDiffuse", "SD15AttentionInjection",
    "SDXLConvInjection", "TransparentVAEDecoder", "build_tiny_transparent", "decode_rgba",
    "generate_transparent", "inject_sd15_attention", "inject_sdxl_conv", "load_layer_diffuse",
    "save_layer_diffuse", "sd15_attention_layout", "sd15_attention_targets", "sdxl_conv_layout",
]

SD15, SDXL = "stable_diffusion_1", "stable_diffusion_xl"
# Published file names in LayerDiffusion/layerdiffusion-v1: (injection, transparent decoder).
PUBLISHED_FILES = {
    SD15: ("layer_sd15_transparent_attn.safetensors", "layer_sd15_vae_transparent_decoder.safetensors"),
    SDXL: ("layer_xl_transparent_conv.safetensors", "vae_transparent_decoder.safetensors"),
}
SD15_RANK = 256  # the published rank; files carry theirs and are loaded at it

# The 32 attentions of SD 1.5 in the published unit order (LDM names).
SD15_ATTENTIONS: tuple[str, ...] = tuple(
    f"{block}.1.transformer_blocks.0.attn{a}"
    for block in [f"input_blocks.{i}" for i in (1, 2, 4, 5, 7, 8)]
    + [f"output_blocks.{i}" for i in range(3, 12)]
    + ["middle_block"]
    for a in (1, 2)
)
_QKV = re.compile(r"\.attn[12]\.to_[qkv]\.weight$")
_CONV_REQUIRED = ("input_blocks.", "middle_block.", "output_blocks.", "out.")
_CONV_OPTIONAL = ("time_embed.", "label_emb.")  # accepted and applied if a file has them


def _ldm_to_diffusers(unet) -> dict[str, str]:
    """LDM parameter name -> diffusers parameter name for this UNet (the config-derived map the
    single-file exporter uses, so it holds for full-size and tiny UNets alike). LoRA adapters
    loaded through PEFT are looked through: their own tensors are skipped and a wrapped layer's
    `base_layer` weight stands for the layer."""
    names = {k.replace(".base_layer.", "."): k for k in unet.state_dict() if ".lora_" not in k}
    return unet_to_ldm(names, unet.config)


class Injection:
    """A validated Layer Diffuse patch for one UNet. `apply()` / `remove()`, or `with`; removal
    restores the UNet exactly. `consumed_keys` is the set of file keys it used (all of them)."""

    family: str

    def __init__(self, unet, consumed_keys: set[str]):
        self.unet = unet
        self.consumed_keys = frozenset(consumed_keys)
        self.active = False

    def apply(self) -> Injection:
        if self.active:
            raise RuntimeError("Layer Diffuse injection is already applied to this UNet")
        self._apply()
        self.active = True
        return self

    def remove(self) -> None:
        if self.active:
            self._remove()
            self.active = False

    def __enter__(self) -> Injection:
        if not self.active:
            self.apply()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _apply(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        raise NotImplementedError


# ---- SD 1.5: attention sharing units -------------------------------------------------------


class _LowRank(nn.Module):
    """`down` [rank, in] and `up` [out, rank]: their product is added to a Linear's weight.
    Computed as `base(x) + up(down(x))` (the same sum, without materialising the merged weight),
    so it also composes with a LoRA adapter wrapped around `base`."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return base(x) + self.up(self.down(x))


class _AttentionUnit(nn.Module):
    """One attention's share of the SD 1.5 file (one frame, no control input)."""

    def __init__(self, attn, rank: int):
        super().__init__()
        hidden = attn.to_k.out_features

        def lora(lin: nn.Linear) -> nn.ModuleList:
            return nn.ModuleList([_LowRank(lin.in_features, lin.out_features, rank)])

        self.to_q_lora, self.to_k_lora = lora(attn.to_q), lora(attn.to_k)
        self.to_v_lora, self.to_out_lora = lora(attn.to_v), lora(attn.to_out[0])
        self.temporal_i = nn.Linear(hidden, hidden)
        self.temporal_n = nn.LayerNorm(hidden, eps=1e-6)
        self.temporal_q = nn.Linear(hidden, hidden)
        self.temporal_k = nn.Linear(hidden, hidden)
        self.temporal_v = nn.Linear(hidden, hidden)
        self.temporal_o = nn.Linear(hidden, hidden)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class LayerDiffuseAttnProcessor:
    """diffusers attention processor running an `_AttentionUnit` in place of the attention.
    A plain object (not an nn.Module) so the UNet's state_dict never changes while patched."""

    def __init__(self, unit: _AttentionUnit):
        self.unit = unit

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        u, h = self.unit, hidden_states
        ctx = h if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens, channels = h.shape
        q = u.to_q_lora[0](h, attn.to_q)
        k = u.to_k_lora[0](ctx, attn.to_k)
        v = u.to_v_lora[0](ctx, attn.to_v)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, ctx.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        o = F.scaled_dot_product_attention(
            _heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads), attn_mask=attention_mask
        )
        o = attn.to_out[1](u.to_out_lora[0](_merge(o).to(q.dtype), attn.to_out[0]))
        # Second residual: attention across the frame axis (one frame here) of norm(h + o).
        t = u.temporal_i(u.temporal_n(h + o)).reshape(batch * tokens, 1, channels)
        tq, tk, tv = (_heads(m(t), attn.heads) for m in (u.temporal_q, u.temporal_k, u.temporal_v))
        t = u.temporal_o(_merge(F.scaled_dot_product_attention(tq, tk, tv)))
        return o + t.reshape(batch, tokens, channels)


class SD15AttentionInjection(Injection):
    family = SD15

    def __init__(self, unet, state_dict: dict[str, torch.Tensor]):
        targets = sd15_attention_targets(unet)  # unit index -> diffusers attention module name
        rank = _sd15_rank(state_dict)
        with torch.device("meta"):
            units = self._units(unet, targets, rank)
        expected = {k: tuple(v.shape) for k, v in units.state_dict().items()}
        check_keys(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, "SD 1.5 attention injection")
        units = units.to_empty(device="cpu")
        units.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        self.units = units.eval()
        self.targets = targets
        self._saved: dict[str, object] = {}
        super().__init__(unet, set(state_dict))

    @staticmethod
    def _units(unet, targets: dict[int, str], rank: int) -> nn.Module:
        """Container whose state_dict keys are the file's: `hookers.layers.{i}.…`."""
        root, hookers = nn.Module(), nn.Module()
        hookers.layers = nn.ModuleDict(
            {str(i): _AttentionUnit(unet.get_submodule(name), rank) for i, name in targets.items()}
        )
        root.hookers = hookers
        return root

    def _apply(self) -> None:
        p = next(self.unet.parameters())
        self.units.to(p.device, p.dtype)
        for i, name in self.targets.items():
            attn = self.unet.get_submodule(name)
            self._saved[name] = attn.processor
            attn.set_processor(LayerDiffuseAttnProcessor(self.units.hookers.layers[str(i)]))

    def _remove(self) -> None:
        for name, processor in self._saved.items():
            self.unet.get_submodule(name).set_processor(processor)
        self._saved.clear()


def sd15_attention_targets(unet) -> dict[int, str]:
    """Published unit index -> diffusers module name, for the attentions this UNet has (all 32
    for SD 1.5; the tiny UNet has only the middle block's, units 30 and 31)."""
    ldm = _ldm_to_diffusers(unet)
    targets = {}
    for i, name in enumerate(SD15_ATTENTIONS):
        diffusers_name = ldm.get(f"{name}.to_q.weight")
        if diffusers_name is not None:
            targets[i] = diffusers_name.replace(".base_layer.", ".").removesuffix(".to_q.weight")
    if not targets:
        raise ValueError("this UNet has none of SD 1.5's transformer-block attentions")
    return targets


def _sd15_rank(state_dict: dict[str, torch.Tensor]) -> int:
    for key, value in state_dict.items():
        if key.endswith("_lora.0.down.weight"):
            return int(value.shape[0])
    raise KeyError("SD 1.5 attention injection: no `*_lora.0.down.weight` key, missing keys")


def sd15_attention_layout(unet, rank: int = SD15_RANK) -> dict[str, tuple[int, ...]]:
    """(key -> shape) a `layer_sd15_transparent_attn` file must have for this UNet."""
    with torch.device("meta"):
        units = SD15AttentionInjection._units(unet, sd15_attention_targets(unet), rank)
    return {k: tuple(v.shape) for k, v in units.state_dict().items()}


def inject_sd15_attention(unet, state_dict: dict[str, torch.Tensor]) -> SD15AttentionInjection:
    """Validate `state_dict` against `unet` and patch its attentions; `.remove()` (or leaving a
    `with` block) puts the original processors back."""
    return SD15AttentionInjection(unet, state_dict).apply()


# ---- SDXL: weight offsets ------------------------------------------------------------------


def sdxl_conv_layout(unet) -> tuple[dict[str, str], dict[str, str]]:
    """(required, optional) maps file key -> diffusers parameter name for a
    `layer_xl_transparent_conv` file: every parameter under input/middle/output blocks and `out`
    except attention q/k/v weights is required; time/label embeddings are optional."""
    required, optional = {}, {}
    for ldm, name in _ldm_to_diffusers(unet).items():
        key = f"diffusion_model.{ldm}::diff::0"
        if ldm.startswith(_CONV_REQUIRED) and not _QKV.search(ldm):
            required[key] = name
        elif ldm.startswith(_CONV_OPTIONAL):
            optional[key] = name
    return required, optional


class SDXLConvInjection(Injection):
    family = SDXL

    def __init__(self, unet, state_dict: dict[str, torch.Tensor], weight: float = 1.0):
        required, optional = sdxl_conv_layout(unet)
        names = {**optional, **required}  # file key -> diffusers parameter name
        missing = sorted(set(required) - set(state_dict))
        extra = sorted(set(state_dict) - set(names))
        if missing or extra:
            raise KeyError(f"SDXL conv injection: missing keys {name_keys(missing)}; unexpected keys {name_keys(extra)}")
        params = dict(unet.named_parameters())
        expected = {k: tuple(params[names[k]].shape) for k in state_dict}
        check_keys(expected, {k: tuple(v.shape) for k, v in state_dict.items()}, "SDXL conv injection")
        self.deltas = {names[k]: v for k, v in state_dict.items()}
        self.weight = weight
        self._originals: dict[str, torch.Tensor] = {}
        super().__init__(unet, set(state_dict))

    @torch.no_grad()
    def _apply(self) -> None:
        params = dict(self.unet.named_parameters())
        try:
            for name, delta in self.deltas.items():
                p = params[name]
                self._originals[name] = p.detach().to("cpu", copy=True)
                p.copy_((p.float() + self.weight * delta.to(p.device, torch.float32)).to(p.dtype))
        except BaseException:
            self._remove()  # never leave a half-patched UNet behind
            raise

    @torch.no_grad()
    def _remove(self) -> None:
        params = dict(self.unet.named_parameters())
        for name, original in self._originals.items():
            params[name].copy_(original.to(params[name].device))  # exact, not a subtraction
        self._originals.clear()


def inject_sdxl_conv(unet, state_dict: dict[str, torch.Tensor], weight: float = 1.0) -> SDXLConvInjection:
    """Validate `state_dict` against `unet` and add the offsets (times `weight`) to its weights;
    `.remove()` copies the saved originals back."""
    return SDXLConvInjection(unet, state_dict, weight).apply()


# ---- files, tiny stand-ins, generation -----------------------------------------------------


@dataclass
class LayerDiffuse:
    """What `load_layer_diffuse` returns: the (not yet applied) injection and the decoder."""

    family: str
    injection: Injection
    decoder: TransparentVAEDecoder


def _injection(family: str, unet, state_dict: dict[str, torch.Tensor]) -> Injection:
    if family == SD15:
        return SD15AttentionInjection(unet, state_dict)
    if family == SDXL:
        return SDXLConvInjection(unet, state_dict)
    raise ValueError(f"transparent images are for SD 1.5 and SDXL only, not {family!r}")


def load_layer_diffuse(injection_path: str | Path, decoder_path: str | Path, family: str, unet) -> LayerDiffuse:
    """Load and validate both files for `unet` (strict: refused naming any bad key)."""
    injection = _injection(family, unet, load_file(str(injection_path)))
    return LayerDiffuse(family, injection, load_decoder(load_file(str(decoder_path))))


def save_layer_diffuse(directory: str | Path, family: str, injection_sd: dict, decoder_sd: dict) -> tuple[Path, Path]:
    """Write the two state dicts under their published file names; returns the two paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = tuple(directory / name for name in PUBLISHED_FILES[family])
    for path, sd in zip(paths, (injection_sd, decoder_sd)):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return paths


def build_tiny_transparent(family: str, unet, seed: int = 0, rank: int = 8) -> tuple[dict, dict]:
    """Seeded random (injection, decoder) state dicts in the published key layout, sized for
    `unet` (e.g. the tiny pipelines of models/tiny.py), so tests load them the real way."""
    gen = torch.Generator().manual_seed(seed)
    if family == SD15:
        layout = sd15_attention_layout(unet, rank)
        injection = {
            k: (torch.ones(s) if k.endswith("temporal_n.weight") else torch.zeros(s)) + 0.1 * torch.randn(s, generator=gen)
            for k, s in layout.items()
        }
    elif family == SDXL:
        required, _ = sdxl_conv_layout(unet)
        params = dict(unet.named_parameters())
        injection = {k: 0.05 * torch.randn(params[n].shape, generator=gen) for k, n in required.items()}
    else:
        raise ValueError(f"transparent images are for SD 1.5 and SDXL only, not {family!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        decoder = TransparentVAEDecoder(TINY)
    with torch.no_grad():  # spread the alpha channel around 0.5 so random weights give a real mask
        decoder.conv_out.weight.mul_(4.0)
        decoder.conv_out.bias[0] = 0.5
    return injection, decoder.state_dict()


def _check_size(pipe, pipe_kwargs: dict) -> None:
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    width, height = pipe_kwargs.get("width") or default, pipe_kwargs.get("height") or default
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(
            f"transparent images need width and height multiples of {SIZE_MULTIPLE}, got width={width} height={height}"
        )


def generate_transparent(pipe, family: str, files: LayerDiffuse, augment: bool = True, **pipe_kwargs) -> list[Image.Image]:
    """Run `pipe` under the injection with `output_type="latent"`, remove the injection, then
    decode RGBA (VAE decode + transparent decoder). `pipe_kwargs` go to the pipeline as is."""
    if files.family != family:
        raise ValueError(f"Layer Diffuse files are for {files.family}, not {family}")
    if files.injection.unet is not pipe.unet:
        raise ValueError("Layer Diffuse files were validated against another UNet")
    _check_size(pipe, pipe_kwargs)
    with files.injection:
        latents = pipe(**pipe_kwargs, output_type="latent").images
    p = next(pipe.unet.parameters())
    files.decoder.to(p.device, p.dtype)
    return decode_rgba(pipe, files.decoder, latents, augment=augment)
