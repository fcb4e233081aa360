"""Image interrogation for the alchemy form `interrogation`: rank our own term lists by CLIP.

The idea is clip-interrogator's (the code is ours): embed every term of each category's list
once with CLIP's text tower, embed the image with its vision tower, and report each category's
terms by cosine similarity, best first, with `confidence = round(cosine * 100, 2)`.

The term lists live in terms/<category>.txt, one term per line. A real CLIP (for example
`openai/clip-vit-large-patch14`: model, tokenizer and preprocessing in one folder) loads with
`load_interrogator`; `build_tiny_interrogator(seed)` builds a random, tiny one for tests and the
embedded demo, with the offline tokenizer of models/tiny.py.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

CATEGORIES = ("tags", "sites", "artists", "flavors", "mediums", "movements", "techniques")
TERMS_DIR = Path(__file__).parent / "terms"
TEXT_BATCH = 128  # terms embedded per text-tower call

# CLIPImageProcessor needs torchvision in transformers 5 (and falls back to this with a warning).
ImageProcessor = CLIPImageProcessorPil


def load_term_lists(directory: str | os.PathLike[str] | None = None) -> dict[str, list[str]]:
    """`{category: terms}` from `<directory>/<category>.txt` for every category in CATEGORIES
    (default: the lists shipped in terms/). Lines are stripped; blank lines are skipped. A
    missing or empty file, or a term listed twice, is an error."""
    folder = Path(directory) if directory is not None else TERMS_DIR
    lists: dict[str, list[str]] = {}
    for category in CATEGORIES:
        path = folder / f"{category}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"no term list for {category!r}: {path} is missing")
        terms = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not terms:
            raise ValueError(f"{path} lists no terms")
        repeated = sorted({t for t in terms if terms.count(t) > 1})
        if repeated:
            raise ValueError(f"{path} lists {', '.join(map(repr, repeated))} more than once")
        lists[category] = terms
    return lists


class Interrogator:
    """A CLIP model, its tokenizer and image preprocessing, and the terms it ranks."""

    def __init__(self, model: CLIPModel, tokenizer, image_processor, terms: dict[str, list[str]]) -> None:
        if set(terms) != set(CATEGORIES) or not all(terms[c] for c in CATEGORIES):
            raise ValueError(f"terms must give a non-empty list for each of {CATEGORIES}, got {sorted(terms)}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.terms = {c: list(terms[c]) for c in CATEGORIES}
        # {category: (n_terms, dim) unit vectors on the model's device}: filled on first use.
        # The lock keeps concurrent first calls (the deployment's threads) from each computing it.
        self._text_embeddings: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: str | torch.device) -> Interrogator:
        with self._lock:
            self.model.to(device)
            if self._text_embeddings is not None:
                self._text_embeddings = {c: e.to(device) for c, e in self._text_embeddings.items()}
        return self

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dim) unit-length text embeddings, float32, TEXT_BATCH texts per call."""
        chunks = []
        for start in range(0, len(texts), TEXT_BATCH):
            batch = self.tokenizer(texts[start:start + TEXT_BATCH], padding=True, truncation=True,
                                   max_length=self.model.config.text_config.max_position_embeddings,
                                   return_tensors="pt").to(self.model.device)
            features = self.model.get_text_features(input_ids=batch.input_ids,
                                                    attention_mask=batch.attention_mask).pooler_output
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1))
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_image(self, image: Image.Image) -> torch.Tensor:
        """(dim,) unit-length image embedding, float32."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = self.image_processor(images=[rgb], return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.model.device, dtype=self.model.dtype)
        features = self.model.get_image_features(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1)[0]

    def text_embeddings(self) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._text_embeddings is None:
                self._text_embeddings = {c: self.embed_texts(self.terms[c]) for c in CATEGORIES}
            return self._text_embeddings

    def interrogate(self, image: Image.Image, top_k: int = 5) -> dict[str, list[dict]]:
        """`{category: [{"text": term, "confidence": cosine * 100 rounded to 2 places}]}` for
        every category, best first (ties keep list order), at most `top_k` terms each."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        texts = self.text_embeddings()
        image_embedding = self.embed_image(image)
        result: dict[str, list[dict]] = {}
        for category in CATEGORIES:
            cosines = (texts[category] @ image_embedding).cpu()
            # A stable sort, so equal scores keep the list's order and results are reproducible.
            order = torch.sort(cosines, descending=True, stable=True).indices[:top_k]
            terms = self.terms[category]
            result[category] = [{"text": terms[i], "confidence": round(float(cosines[i]) * 100, 2)}
                                for i in order.tolist()]
        return result

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Model, tokenizer and image preprocessing in one folder, as OpenAI's CLIP repos are.
        The terms are not saved: they are this code's lists (or the loader's `terms`)."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def load_interrogator(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                      terms: dict[str, list[str]] | None = None,
                      dtype: torch.dtype = torch.float32) -> Interrogator:
    """The CLIP in `path` ranking `terms` (default: `load_term_lists()`). Refuses weights that
    lack any of the model's tensors: transformers would fill them randomly."""
    path = os.fspath(path)
    model, info = CLIPModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"{path!r} is not a complete CLIP model: missing {shown}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = ImageProcessor.from_pretrained(path)
    terms = terms if terms is not None else load_term_lists()
    return Interrogator(model.to(device), tokenizer, image_processor, terms)


def build_tiny_interrogator(seed: int = 0) -> Interrogator:
    """A random, tiny CLIP (32x32 input, 2 layers of width 32 per tower, projection 16) with
    models/tiny.py's offline tokenizer, ranking the shipped term lists. Weights come from `seed`
    (the caller's RNG is left alone)."""
    from models.tiny import _seeded, build_tokenizer  # imports diffusers' pipelines: only here

    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = _seeded(seed, lambda: CLIPModel(config))
    image_processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return Interrogator(model, tokenizer, image_processor, load_term_lists())
