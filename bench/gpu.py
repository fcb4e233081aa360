"""The GPU path at full size, with random weights: SD 1.5, SDXL, Stable Cascade (stage C + B) and
a ~1B-parameter Llama, built from their published configurations in code (nothing downloaded).

    .venv/bin/python bench/gpu.py                # on whatever GPU torch finds
    .venv/bin/python bench/gpu.py --cpu-check    # the same code paths, tiny models, CPU, < 2 min

Images: 512x512 (SD 1.5) and 1024x1024 (SDXL, Cascade), 30 steps, n = 1 and 4, each measured
two ways on the same weights and GPU:
- ours: the diffusion deployment's code path without Serve's RPC: DiffusionGenerator.load
  (models/loaders.py, then deployments/diffusion/acceleration.py: half precision, SDPA, SDXL's
  VAE upcast) and .generate (tasks.py / cascade.py: the job's sampler k_euler with Karras
  sigmas, per-seed CPU generators, one pipeline call for n images). The replica then encodes
  each image as WebP: `webp s/img` shows that cost, not counted in `s/image`.
- bare: the same components in a plain diffusers pipeline called as its docs show
  (its default scheduler, one CUDA generator, num_images_per_prompt=n).
Each is warmed up once at its size and n (2 steps), then timed once; it/s = steps / seconds
of the whole call (text encoding and VAE decode included), s/image = seconds / n. The summary
gives ours / bare in images per second (goal >= 0.97 at n = 1) and ours' n = 4 over n = 1
(goal >= 1.3). Peak GPU memory: torch.cuda.max_memory_allocated over the timed call.

Text: tokens per second at 1, 8 and 32 requests arriving together (prompts of ~30 tokens,
128 new tokens each, temperature 0.8, top_p 0.9, rep_pen 1.1 over the whole context),
through the text engines' own interface (deployments/llm_engines: what the LLM deployment
calls): builtin (one batch, as serve.batch hands it over) and vLLM (each job its own request;
only where vllm is installed, else said so). vLLM's engine runs in its own process, so its
memory is the GPU's used memory (torch.cuda.mem_get_info) while it runs, its KV cache
reservation (gpu_memory_utilization) included.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMWuerstchenScheduler,
    EulerDiscreteScheduler,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, LlamaConfig, LlamaForCausalLM  # noqa: E402

from deployments.diffusion import acceleration, cascade  # noqa: E402
from deployments.diffusion.common import encode_webp  # noqa: E402
from deployments.diffusion.deployment import DiffusionGenerator  # noqa: E402
from deployments.jobs import ImageJob, TextJob  # noqa: E402
from deployments.llm_engines import build_engine  # noqa: E402
from models import tiny, tiny_llm  # noqa: E402
from models.catalog import Family, ModelEntry  # noqa: E402

PROMPT = "a lighthouse on a cliff above a stormy sea, oil painting, dramatic light"

# --- the published configurations ----------------------------------------------------------------
# SD 1.5 (runwayml/stable-diffusion-v1-5 unet/config.json, vae/config.json), SDXL base 1.0
# (stabilityai/stable-diffusion-xl-base-1.0), Stable Cascade (Stability's StageC / StageB
# defaults, as diffusers' scripts/convert_stable_cascade.py builds them), OpenAI CLIP ViT-L/14
# and OpenCLIP ViT-bigG/14 text towers, and TinyLlama-1.1B's Llama config. The tokenizer is the
# tiny one (models/tiny.py): its ids fit the real vocabularies, and prompts pad to 77 tokens.
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, latent_channels=4, norm_num_groups=32)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu")
_CT, _CTA = ("SDCascadeResBlock", "SDCascadeTimestepBlock"), ("SDCascadeResBlock", "SDCascadeTimestepBlock",
                                                              "SDCascadeAttnBlock")
CASCADE_PRIOR = dict(in_channels=16, out_channels=16, timestep_ratio_embedding_dim=64, patch_size=1,
                     conditioning_dim=2048, block_out_channels=(2048, 2048), num_attention_heads=(32, 32),
                     down_num_layers_per_block=(8, 24), up_num_layers_per_block=(24, 8),
                     down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
                     block_types_per_layer=(_CTA, _CTA), clip_text_in_channels=1280,
                     clip_text_pooled_in_channels=1280, clip_image_in_channels=768, clip_seq=4,
                     dropout=(0.1, 0.1), self_attn=True, timestep_conditioning_type=("sca", "crp"),
                     switch_level=(False,))
CASCADE_DECODER = dict(in_channels=4, out_channels=4, timestep_ratio_embedding_dim=64, patch_size=4,
                       conditioning_dim=1280, block_out_channels=(320, 640, 1280, 1280),
                       num_attention_heads=(-1, -1, 20, 20), down_num_layers_per_block=(2, 6, 28, 6),
                       up_num_layers_per_block=(6, 28, 6, 2), down_blocks_repeat_mappers=(1, 1, 1, 1),
                       up_blocks_repeat_mappers=(3, 3, 2, 2), block_types_per_layer=(_CT, _CT, _CTA, _CTA),
                       clip_text_pooled_in_channels=1280, clip_seq=4, effnet_in_channels=16,
                       pixel_mapper_in_channels=3, dropout=(0.0, 0.0, 0.1, 0.1), self_attn=True,
                       timestep_conditioning_type=("sca",), switch_level=None)
PAELLA_VQ = dict(in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=12,
                 embed_dim=384, latent_channels=4, num_vq_embeddings=8192, scale_factor=0.3764)
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _on_gpu(make, dtype: torch.dtype):
    """Build a module straight on the GPU (random init there: seconds, not minutes), cast."""
    with torch.device("cuda"):
        return make().to(dtype).eval()


def _clip(config: dict, projection: bool, dtype: torch.dtype, tok) -> torch.nn.Module:
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **config)
    return _on_gpu(lambda: (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg), dtype)


def _sd_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                  beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")


def full_sd15() -> StableDiffusionPipeline:
    tok, fp16 = tiny.build_tokenizer(), torch.float16
    return StableDiffusionPipeline(
        vae=_on_gpu(lambda: AutoencoderKL(**SD_VAE, sample_size=512, scaling_factor=0.18215), fp16),
        text_encoder=_clip(CLIP_L, False, fp16, tok), tokenizer=tok,
        unet=_on_gpu(lambda: UNet2DConditionModel(**SD15_UNET), fp16), scheduler=_sd_scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)


def full_sdxl() -> StableDiffusionXLPipeline:
    tok, fp16 = tiny.build_tokenizer(), torch.float16
    return StableDiffusionXLPipeline(
        vae=_on_gpu(lambda: AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True), fp16),
        text_encoder=_clip(CLIP_L, False, fp16, tok), text_encoder_2=_clip(CLIP_BIG_G, True, fp16, tok),
        tokenizer=tok, tokenizer_2=tiny.build_tokenizer(),
        unet=_on_gpu(lambda: UNet2DConditionModel(**SDXL_UNET), fp16), scheduler=_sd_scheduler())


def full_cascade() -> tuple[StableCascadePriorPipeline, StableCascadeDecoderPipeline]:
    tok, dtype = tiny.build_tokenizer(), acceleration.pipeline_dtype(Family.stable_cascade, "cuda")
    text_encoder = _clip(CLIP_BIG_G, True, dtype, tok)
    prior = StableCascadePriorPipeline(prior=_on_gpu(lambda: StableCascadeUNet(**CASCADE_PRIOR), dtype),
                                       text_encoder=text_encoder, tokenizer=tok, scheduler=DDPMWuerstchenScheduler())
    decoder = StableCascadeDecoderPipeline(
        decoder=_on_gpu(lambda: StableCascadeUNet(**CASCADE_DECODER), dtype), text_encoder=text_encoder,
        tokenizer=tok, scheduler=DDPMWuerstchenScheduler(), vqgan=_on_gpu(lambda: PaellaVQModel(**PAELLA_VQ), dtype))
    return prior, decoder


def full_llm():
    tokenizer = tiny_llm.build_tokenizer()
    model = _on_gpu(lambda: LlamaForCausalLM(LlamaConfig(pad_token_id=tokenizer.pad_token_id, **LLAMA_1B)),
                    torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


# --- measuring -----------------------------------------------------------------------------------


def timed(call, device: torch.device) -> tuple[float, float, object]:
    """(seconds, peak GiB allocated, result) of call()."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return seconds, peak, result


def bare_call(loaded, family: Family, side: int, steps: int, n: int, device: torch.device):
    """The same components as a plain diffusers pipeline call, as its docs show."""
    gen = torch.Generator(device.type).manual_seed(0)
    if family is Family.stable_cascade:
        prior, decoder = loaded
        prior_steps, decoder_steps = cascade.split_steps(steps)
        embeddings = prior(PROMPT, width=side, height=side, num_inference_steps=prior_steps,
                           num_images_per_prompt=n, generator=gen).image_embeddings
        return decoder(image_embeddings=embeddings, prompt=PROMPT, num_inference_steps=decoder_steps,
                       generator=gen, output_type="pil").images
    return loaded(PROMPT, width=side, height=side, num_inference_steps=steps, num_images_per_prompt=n,
                  generator=gen).images


def diffusion(label: str, family: Family, builtin: str, side: int, steps: int, device: torch.device) -> list[dict]:
    entry = {"name": label, "family": family.value, "weights": {"kind": "builtin", "path": builtin}}
    ours = DiffusionGenerator(family, [entry], device=str(device))
    loaded = ours.load(label)
    # The bare pipeline: the same modules, its own scheduler object in its first state.
    bare = tuple(type(p)(**p.components) for p in acceleration.pipelines(loaded))
    for pipe, original in zip(bare, acceleration.pipelines(loaded)):
        pipe.scheduler = type(original.scheduler).from_config(original.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
    bare = bare if family is Family.stable_cascade else bare[0]
    rows = []
    for n in (1, 4):
        def job(k: int) -> ImageJob:
            return ImageJob(model=label, prompt=PROMPT, seeds=tuple(range(n)), width=side, height=side, steps=k)

        paths = {"ours": lambda k: ours.generate(loaded, job(k)),
                 "bare": lambda k: bare_call(bare, family, side, k, n, device)}
        for path, run in paths.items():
            run(2)  # warm-up at this size and n
            seconds, peak, images = timed(lambda: run(steps), device)
            encode = time.perf_counter()
            if path == "ours":
                [encode_webp(im) for im in images]
            row = {"model": label, "size": side, "steps": steps, "n": n, "path": path, "seconds": seconds,
                   "it/s": steps / seconds, "s/image": seconds / n, "peak GiB": peak,
                   "webp s/img": (time.perf_counter() - encode) / n if path == "ours" else None}
            assert len(images) == n and images[0].size == (side, side), (label, path, n)
            rows.append(row)
    return rows


def text_jobs(engine, count: int, max_tokens: int) -> tuple[list[TextJob], list[list[int]]]:
    corpus = " ".join(tiny_llm.CORPUS.split())
    step = (len(corpus) - 70) // max(count, 1)
    jobs = [TextJob(model=engine.entry.name, prompt=corpus[i * step: i * step + 70], seed=i, max_length=max_tokens,
                    max_context_length=1024, temperature=0.8, top_k=0, top_p=0.9, rep_pen=1.1, rep_pen_range=0)
            for i in range(count)]
    return jobs, [engine.encode_prompt(j) for j in jobs]


def text(engine, kind: str, concurrency: list[int], max_tokens: int, device: torch.device) -> list[dict]:
    """One event loop for all runs: vLLM's engine stays bound to the loop it first ran on."""
    async def run(jobs, ids) -> int:
        tokens = 0
        async for step in engine.stream(jobs, ids):
            tokens += sum(1 for e in step if getattr(e, "token_id", None) is not None)
        return tokens

    async def all_runs() -> list[dict]:
        await run(*text_jobs(engine, 2, 8))  # warm-up
        rows = []
        for c in concurrency:
            jobs, ids = text_jobs(engine, c, max_tokens)
            before = used_gib(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            tokens = await run(jobs, ids)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
            if kind == "vllm":  # its memory is another process's: the GPU's used memory
                peak = max(before, used_gib(device))
            rows.append({"engine": kind, "concurrency": c, "tokens": tokens, "seconds": seconds,
                         "tokens/s": tokens / seconds, "peak GiB": peak})
        return rows

    return asyncio.run(all_runs())


def used_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


# --- printing ------------------------------------------------------------------------------------


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ips = {(r["path"], r["n"]): r["n"] / r["seconds"] for r in rows if r["model"] == model}
        out.append({"model": model, "ours/bare n=1": ips["ours", 1] / ips["bare", 1],
                    "ours/bare n=4": ips["ours", 4] / ips["bare", 4],
                    "ours n=4 / n=1 images/s": ips["ours", 4] / ips["ours", 1]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-check", action="store_true", help="tiny models on the CPU, same code paths")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30; --cpu-check 3)")
    parser.add_argument("--max-tokens", type=int, help="new tokens per text request (default 128; --cpu-check 8)")
    parser.add_argument("--only", nargs="+", choices=["sd15", "sdxl", "cascade", "llm"],
                        default=["sd15", "sdxl", "cascade", "llm"])
    args = parser.parse_args()
    check = args.cpu_check
    if not check and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --cpu-check, or on a GPU machine")
    device = torch.device("cpu" if check else "cuda")
    steps, max_tokens = args.steps or (3 if check else 30), args.max_tokens or (8 if check else 128)
    if check:
        torch.set_num_threads(2)
        name = "cpu (tiny models)"
    else:
        name = torch.cuda.get_device_name()
        # The full-size builders, under names the catalog's `builtin` weights can give.
        tiny.BUILTIN.update({"full-sd15": full_sd15, "full-sdxl": full_sdxl, "full-cascade": full_cascade})
        tiny_llm.BUILTIN["full-llm-1b"] = full_llm
    print(f"# rayhorde GPU benchmark on {name}: torch {torch.__version__}, steps {steps}")
    families = [("sd15", Family.stable_diffusion_1, "tiny-sd15", "full-sd15", 64, 512),
                ("sdxl", Family.stable_diffusion_xl, "tiny-sdxl", "full-sdxl", 64, 1024),
                ("cascade", Family.stable_cascade, "tiny-cascade", "full-cascade", 128, 1024)]
    images = []
    for label, family, tiny_name, full_name, tiny_side, side in families:
        if label in args.only:
            images += diffusion(label, family, tiny_name if check else full_name, tiny_side if check else side,
                                steps, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if images:
        print("\n## images\n")
        print(table(images, ["model", "size", "steps", "n", "path", "it/s", "s/image", "peak GiB", "webp s/img"]))
        print("\n## images: ours against bare diffusers, and batching\n")
        print(table(summary(images), ["model", "ours/bare n=1", "ours/bare n=4", "ours n=4 / n=1 images/s"]))
    if "llm" in args.only:
        print(f"\n## text: {max_tokens} new tokens per request\n")
        entry = ModelEntry.model_validate({"name": "llm", "family": "llm", "weights": {
            "kind": "builtin", "path": "tiny-llm" if check else "full-llm-1b", "dtype": "float32" if check else "bfloat16"}})
        engine = build_engine(entry, device)
        params = sum(p.numel() for p in engine.model.parameters())
        rows = text(engine, "builtin", [1, 8, 32], max_tokens, device)
        vllm_note = "vllm: not installed here (pip install -e '.[vllm]' on a GPU node); skipped"
        if importlib.util.find_spec("vllm") is not None and not check:
            rows += vllm_rows(engine, max_tokens, device)
            vllm_note = None
        del engine
        print(f"model: {params / 1e6:.1f}M parameters\n")
        print(table(rows, ["engine", "concurrency", "tokens", "seconds", "tokens/s", "peak GiB"]))
        if vllm_note:
            print(f"\n{vllm_note}")


def vllm_rows(builtin_engine, max_tokens: int, device: torch.device) -> list[dict]:
    """The same random 1B model, saved and served by vLLM (it loads from a folder)."""
    with tempfile.TemporaryDirectory() as folder:
        builtin_engine.model.save_pretrained(folder)
        builtin_engine.tokenizer.save_pretrained(folder)
        builtin_engine.model.to("cpu")
        torch.cuda.empty_cache()
        entry = ModelEntry.model_validate({
            "name": "llm", "family": "llm", "engine": "vllm", "max_context_length": 2048,
            "weights": {"kind": "pretrained", "path": folder, "dtype": "bfloat16"},
            "engine_kwargs": {"gpu_memory_utilization": 0.5, "max_num_seqs": 64}})
        engine = build_engine(entry, device)
        try:
            return text(engine, "vllm", [1, 8, 32], max_tokens, device)
        finally:
            engine.close()


if __name__ == "__main__":
    main()
