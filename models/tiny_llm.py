"""A tiny random-weight Llama and its tokenizer, built entirely in code, for tests, the
embedded demo and the text-generation benchmark.

The tokenizer is a byte-level BPE trained in-process (the `tokenizers` library, a few
milliseconds) on the small corpus below. Its alphabet holds all 256 byte symbols, so any text,
any script, any emoji, tokenizes and decodes back unchanged. It adds `<s>` in front of every
encoded text as Llama's tokenizer does, ends turns with `</s>` and pads with `<pad>`; its chat
template (Jinja, in `tokenizer.chat_template`) renders `<|role|>` headers, so
`apply_chat_template` works as on a real chat model.

The model is `LlamaForCausalLM` with every width cut down (3.2M parameters: 4 layers, hidden
256, 4 heads sharing 2 KV heads), weights from seeded torch init, so the same seed always builds
the same model. A forward pass costs real arithmetic, which makes the batched-vs-sequential
benchmark meaningful, yet the model builds in about 0.1 s. Its output is noise, but
deterministic noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
TARGET_VOCAB_SIZE = 1024  # an upper bound: training stops earlier when the corpus runs out of pairs
MAX_CONTEXT_LENGTH = 2048  # the model's max_position_embeddings

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Written for this file. Plain prose, chat turns and a little code, so the merges cover the
# kinds of text the horde sends; any text outside it still tokenizes, byte by byte.
CORPUS = """\
Once upon a time, in a kingdom by the sea, there lived an old lighthouse keeper and his cat.
Every night the keeper climbed the stairs, lit the lamp and watched the ships pass in the dark.
The cat slept on the warm stones by the lamp and dreamed of fish, of birds and of summer.
One winter a storm came from the north. The wind broke the windows and the rain put out the
fire, but the keeper carried oil up the stairs again and again until morning came.
When the sun rose, the people of the town walked to the rocks and thanked him.
"You kept the light burning," said the captain. "Without it we would have been lost."
The keeper smiled. "The light is not mine," he said. "It belongs to everyone at sea."

The dragon flew over the mountains, above the forest and across the river to the castle.
A knight in silver armour waited at the gate with a sword, a shield and a very small horse.
"Why do you come here?" asked the knight. "I am hungry," said the dragon, "and I am tired."
So they sat together by the fire, and the knight shared his bread, and the dragon told
stories of the old days, when the world was young and the stars were close to the ground.

User: Hello! Can you help me write a short story about a robot who learns to paint?
Assistant: Of course. Here is a short story. The robot was built to sweep floors, but one
day it found a box of paints in the attic. It painted the sky, then the sea, then a portrait
of the family that owned it. They hung the painting in the hall and called it art.
User: That is lovely. Can you make it longer and add a dog?
Assistant: Sure! The family also had a dog named Biscuit, who followed the robot everywhere.
User: What is the capital of France?
Assistant: The capital of France is Paris.
User: Explain how a rainbow forms, in simple words.
Assistant: Sunlight is made of many colours. When it passes through raindrops, the light
bends and splits, and each colour comes out at a slightly different angle.

def generate(prompt, max_length=80, temperature=0.7):
    tokens = tokenize(prompt)
    for step in range(max_length):
        logits = model(tokens)
        tokens.append(sample(logits, temperature))
    return detokenize(tokens)

The numbers are 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64, 100, 128, 256, 512 and 1024.
Questions? Answers! Lists: first, second, third; quotes "like this" and 'like that'.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on CORPUS (deterministic: same corpus, same merges) and wrap it
    as a transformers tokenizer with bos/eos/pad and the chat template."""
    bpe = Tokenizer(BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    bpe.train_from_iterator([CORPUS], trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False,  # decoding must give back the exact text
        model_max_length=MAX_CONTEXT_LENGTH,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama, in eval mode, float32; the same seed gives the same weights."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as the real Llamas
        max_position_embeddings=MAX_CONTEXT_LENGTH,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Wider than Llama's 0.02, so the random logits have a clear top token: greedy decoding
        # then never hinges on float rounding (batched vs alone), and sampling is not uniform.
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    caller_rng = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        # Building a model must not move the caller's global random stream.
        torch.random.set_rng_state(caller_rng)
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_tiny_llm(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    tokenizer = build_tokenizer()
    return build_model(len(tokenizer), seed), tokenizer


# The builtin LLMs a catalog entry `weights: {kind: builtin, path: <name>}` can name.
BUILTIN: dict[str, Callable[[], tuple[LlamaForCausalLM, PreTrainedTokenizerBase]]] = {
    "tiny-llm": build_tiny_llm,
}
