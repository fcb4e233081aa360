"""Image captions for the alchemy form `caption`, with transformers' BLIP.

`Captioner` wraps a `BlipForConditionalGeneration` and its `BlipProcessor` (the layout of
`Salesforce/blip-image-captioning-base` / `-large`: model, tokenizer and preprocessing in one
folder). Captions are unconditional (no text prompt) and greedy, so the same image and weights
always give the same caption.

`build_tiny_captioner(seed)` builds a random, tiny BLIP with a small WordPiece vocabulary
written here, for tests and the embedded demo: nothing is downloaded. Its captions are word
salad from that vocabulary, but they depend on the image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
)

# At least this many caption tokens before the end-of-caption token may be chosen (fewer when
# max_new_tokens is smaller). A real BLIP rarely stops sooner; a random one could stop at once.
MIN_NEW_TOKENS = 5


class Captioner:
    """A BLIP captioning model and its processor; `caption` runs a batch at once."""

    def __init__(self, model: BlipForConditionalGeneration, processor: BlipProcessor) -> None:
        self.model = model.eval()
        self.processor = processor
        tokenizer = processor.tokenizer
        text_config = model.config.text_config
        # Special tokens (padding, unknown, [CLS], [MASK], BLIP's [DEC] start token) are never
        # chosen: decoding skips them, so a caption of only those would come out empty. The
        # end-of-caption token ([SEP]) stays allowed.
        special = set(tokenizer.all_special_ids) | {text_config.bos_token_id, text_config.pad_token_id}
        self._suppressed = sorted(i for i in special if i is not None and i != text_config.sep_token_id)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device) -> Captioner:
        self.model.to(device)
        return self

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], max_new_tokens: int = 30,
                min_new_tokens: int = MIN_NEW_TOKENS) -> list[str]:
        """One caption per image, in order: greedy decoding, stripped, never empty."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        if not images:
            return []
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.model.device, dtype=self.model.dtype)
        sequences = self.model.generate(
            pixel_values=pixels,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max(1, min(min_new_tokens, max_new_tokens)),
            do_sample=False,
            num_beams=1,
            suppress_tokens=self._suppressed,
        )
        # BLIP returns the prompt (its one start token) first: drop it rather than rely on the
        # tokenizer knowing it is special (a checkpoint's tokenizer may not say so).
        captions = [text.strip() for text in
                    self.processor.tokenizer.batch_decode(sequences[:, 1:], skip_special_tokens=True)]
        if any(not c for c in captions):  # cannot happen with the suppressed tokens; say so if it does
            raise RuntimeError(f"BLIP produced an empty caption: {captions!r}")
        return captions

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Model, tokenizer and preprocessing in one folder, as the Salesforce repos are."""
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def load_captioner(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Captioner:
    """The captioner in `path` (a `save_pretrained` folder or a downloaded Salesforce BLIP
    captioning repo). Refuses weights that lack any of the model's tensors: transformers would
    fill them randomly and caption nonsense."""
    path = os.fspath(path)
    model, info = BlipForConditionalGeneration.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{path!r} is not a complete BLIP captioning model: missing {shown}")
    return Captioner(model.to(device), BlipProcessor.from_pretrained(path))


# -- the tiny captioner ---------------------------------------------------------------------------

# BERT's special tokens first (the ids BlipTextConfig's defaults assume for [PAD]), then BLIP's
# [DEC] start token.
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
_WORDS = (
    "a an the of and in on with at by near under over next to from two three some group "
    "photo picture painting drawing illustration sketch render image close up view "
    "man woman person people child boy girl face hand cat dog bird horse cow fish "
    "tree trees flower flowers grass forest mountain mountains river lake ocean sea beach "
    "sky cloud clouds sun moon star stars night day snow rain water fire light dark "
    "city street road building house castle bridge room table chair window door car boat "
    "train plane robot dragon red blue green yellow orange purple pink black white gray "
    "brown gold silver small large big old young tall long bright colorful "
    "sitting standing walking running flying lying holding looking wearing "
    "is are it its this that there top front back side"
).split()


def _tiny_vocab() -> dict[str, int]:
    """Special tokens, the caption words above, then single letters and digits and their
    word-piece continuations (##x), so that any lower-case ASCII text tokenizes."""
    pieces = [*"abcdefghijklmnopqrstuvwxyz0123456789"]
    tokens = [*_SPECIAL, *_WORDS, *pieces, *(f"##{p}" for p in pieces), *".,'-!?:;()"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def build_tiny_captioner(seed: int = 0) -> Captioner:
    """A random, tiny BLIP (32x32 input, 2 layers of width 32 in each tower) with a WordPiece
    tokenizer over `_tiny_vocab()`. Weights come from `seed` (the caller's RNG is left alone).

    The weights are drawn wider than BLIP's default (std 0.1, not 0.02 and 1e-10): with the
    defaults, the image's contribution is so small that every image gets the same caption.
    """
    from models.tiny import _seeded  # imports diffusers' pipelines: only here

    vocab = _tiny_vocab()
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = BlipProcessor(image_processor, tokenizer)
    std = 0.1
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            bos_token_id=vocab["[DEC]"], pad_token_id=vocab["[PAD]"], sep_token_id=vocab["[SEP]"],
            eos_token_id=vocab["[SEP]"], initializer_range=std,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=std),
        projection_dim=16,
        initializer_range=std,
    )
    model = _seeded(seed, lambda: BlipForConditionalGeneration(config))
    return Captioner(model, processor)
