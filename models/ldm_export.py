"""Write diffusers pipelines out as original-format single-file checkpoints.

This is the inverse of diffusers' single-file key conversion
(`diffusers.loaders.single_file_utils.convert_ldm_*`), so that tests can push a tiny model
through the real `from_single_file` path. Unlike diffusers' old export script, which hardcodes
SD 1.5's 4 levels x 2 layers, the UNet and VAE maps here are derived from the model's config,
so they work for the cut-down tiny models as well as for full-size ones.

Layouts written:
- SD 1.5: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE),
  `cond_stage_model.transformer.text_model.*` (CLIP ViT-L text encoder, HF layout).
- SDXL: the same UNet/VAE prefixes, `conditioner.embedders.0.transformer.text_model.*`
  (CLIP-L, HF layout) and `conditioner.embedders.1.model.*` (OpenCLIP bigG layout:
  resblocks, fused q/k/v `in_proj`, `text_projection` stored transposed).
- Stable Cascade: one file per stage holding only that stage's UNet, with fused
  `attn.in_proj_*` attention and (stage B) `clip_mapper`, as Stability's stage_b / stage_c files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def _rename(sd: dict[str, torch.Tensor], prefixes: list[tuple[str, str]], what: str) -> dict:
    out = {}
    for key, value in sd.items():
        for old, new in prefixes:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise KeyError(f"{what}: no original-format name for {key!r}")
    return out


def unet_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel -> LDM `openaimodel.UNetModel` names (without the model prefix).
    LDM numbers its blocks flat: input block 0 is conv_in, then per level `layers` (resnet,
    attention) pairs and a downsampler; output blocks hold `layers + 1` pairs per level, the
    last one also the upsampler (at .1, or .2 after an attention)."""
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    prefixes = list(_UNET_TOP.items())
    for b in range(n):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            prefixes += [(f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0."),
                         (f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1.")]
        if b < n - 1:
            prefixes.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (layers + 1)}.0.op."))
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            prefixes += [(f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0."),
                         (f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1.")]
        if b < n - 1:
            slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
            prefixes.append((f"up_blocks.{b}.upsamplers.0.", f"output_blocks.{b * (layers + 1) + layers}.{slot}."))
    prefixes += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
                 ("mid_block.resnets.1.", "middle_block.2.")]
    # Resnet internals have LDM names of their own; attention (SpatialTransformer) ones match.
    sd = {k: v for k, v in sd.items()}
    for key in [k for k in sd if ".resnets." in k]:
        head, _, tail = key.rpartition(".resnets.")
        idx, sub, rest = tail.split(".", 2)
        sd[f"{head}.resnets.{idx}.{_RESNET.get(sub, sub)}.{rest}"] = sd.pop(key)
    return _rename(sd, prefixes, "unet")


def vae_to_ldm(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """AutoencoderKL -> LDM `AutoencoderKL` names (without `first_stage_model.`). The decoder's
    levels are numbered bottom-up in LDM, the mid attention is 1x1 convs there."""
    n = len(config["block_out_channels"])
    prefixes = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out."),
                ("encoder.conv_", "encoder.conv_"), ("decoder.conv_", "decoder.conv_"),
                ("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for i in range(n):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                     (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                     (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),
                     (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.") for k in range(2)]
        prefixes += [(f"{part}.mid_block.attentions.0.{a}.", f"{part}.mid.attn_1.{b}.") for a, b in attn.items()]
    out = _rename(sd, prefixes, "vae")
    out = {k.replace("conv_shortcut", "nin_shortcut"): v for k, v in out.items()}
    for k, v in out.items():
        if ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            out[k] = v.reshape(*v.shape, 1, 1)
    return out


def clip_to_hf_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys as the LDM checkpoints keep them: HF layout under `text_model.`
    (transformers >= 5.6 dropped that level from CLIPTextModel itself)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def clip_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP text tower names (SDXL's second encoder)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"),
           "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for a, b in names.items():
                out[f"{dst}{b}.{kind}"] = sd.pop(f"{src}{a}.{kind}")
    if sd:
        raise KeyError(f"open_clip: no original-format name for {sorted(sd)}")
    return out


def save_checkpoint(sd: dict[str, torch.Tensor], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))
    return path


def _unet_vae(pipe) -> dict[str, torch.Tensor]:
    unet = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    vae = vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    return {**{"model.diffusion_model." + k: v for k, v in unet.items()},
            **{"first_stage_model." + k: v for k, v in vae.items()}}


def export_sd15(pipe, path: str | Path) -> Path:
    """One SD 1.5 `.safetensors` checkpoint (UNet + VAE + text encoder) from a pipeline."""
    te = clip_to_hf_ldm(pipe.text_encoder.state_dict())
    return save_checkpoint({**_unet_vae(pipe), **{"cond_stage_model.transformer." + k: v for k, v in te.items()}}, path)


def export_sdxl(pipe, path: str | Path) -> Path:
    """One SDXL `.safetensors` checkpoint (UNet + VAE + both text encoders)."""
    te1 = clip_to_hf_ldm(pipe.text_encoder.state_dict())
    te2 = clip_to_open_clip(pipe.text_encoder_2.state_dict())
    return save_checkpoint({**_unet_vae(pipe),
                  **{"conditioner.embedders.0.transformer." + k: v for k, v in te1.items()},
                  **{"conditioner.embedders.1.model." + k: v for k, v in te2.items()}}, path)


def cascade_unet_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """StableCascadeUNet -> Stability's stage B / C names: diffusers splits the
    nn.MultiheadAttention of each attention block into to_q/k/v/out, and renames stage B's
    `clip_mapper` (stage C, the one with a `clip_txt_mapper`, keeps its names)."""
    sd, out = dict(sd), {}
    heads = {k[: -len(".to_q.weight")] for k in sd if k.endswith(".to_q.weight")}
    for head in heads:
        for kind in ("weight", "bias"):
            out[f"{head}.attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{head}.to_{p}.{kind}") for p in "qkv"])
            out[f"{head}.attn.out_proj.{kind}"] = sd.pop(f"{head}.to_out.0.{kind}")
    stage_b = "clip_txt_mapper.weight" not in sd
    for key, value in sd.items():
        if stage_b and key.startswith("clip_txt_pooled_mapper."):
            key = "clip_mapper." + key[len("clip_txt_pooled_mapper."):]
        out[key] = value
    return out


def export_cascade_stage(unet, path: str | Path) -> Path:
    """One Stable Cascade stage (prior = stage C, decoder = stage B) as its original file."""
    return save_checkpoint(cascade_unet_to_original(unet.state_dict()), path)
