"""A tiny random-weight Llama GGUF file for offline tests.

`write_tiny_gguf(path)` writes a ~160 KB GGUF file that transformers can load both ways:

    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)

The model is a 2-layer Llama (hidden 32, 4 heads, 2 KV heads) with random F32 weights, so its output
is gibberish; it is only meant to exercise loading, chat templating, tokenization and generation.
The tokenizer is a byte-level BPE (llama.cpp's "gpt2" tokenizer model) trained here on a few
sentences, with SmolLM2-style ChatML special tokens and chat template. Everything is built from
fixed inputs and seeds, so the file is the same on every call, and nothing touches the network.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

# Model shape. head_dim = HIDDEN // HEADS = 8.
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 64
CONTEXT = 128
RMS_EPS = 1e-5
ROPE_THETA = 10000.0

# Tokenizer size: 3 special tokens + the 256 byte-level symbols + learned merges.
VOCAB_TARGET = 320

# SmolLM2's ids: <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2. The trainer puts special tokens
# first in this order.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Hello world! This is a tiny tokenizer for tests.",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system: hello, how are you today?",
    "I am fine, thank you. Let me help with that.",
]


def _build_tokenizer() -> tuple[list[str], list[str]]:
    """Train a byte-level BPE and return `(tokens in id order, merges as "a b" strings)`.

    The pre-tokenizer is ByteLevel without a prefix space, which is what transformers' GPT2Tokenizer
    uses when it rebuilds a "gpt2" GGUF vocabulary (we write no `tokenizer.ggml.pre` that it would
    override this with), so the merges match how text will be split at load time. The tokenizers
    BPE trainer breaks count ties deterministically, so the result is the same on every run.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=SPECIAL_TOKENS,
        # The full byte alphabet, so every string round-trips, not just the corpus's characters.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids must be contiguous"

    # The Python BPE model exposes no merges, so read them from the serialized form. Byte-level
    # symbols never contain a space, so "a b" is unambiguous. Older tokenizers releases serialize
    # each merge as that string already, newer ones as a pair.
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, merges


def _random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    # std 0.02 like transformers' default init, so activations stay well-behaved through generate().
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


def write_tiny_gguf(path: pathlib.Path) -> pathlib.Path:
    """Write the tiny Llama GGUF to `path` (creating parent dirs) and return `path`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    tokens, merges = _build_tokenizer()
    ids = {token: index for index, token in enumerate(tokens)}
    vocab_size = len(tokens)
    head_dim = HIDDEN // HEADS

    writer = GGUFWriter(str(path), arch="llama")  # also writes general.architecture

    # Model metadata: the keys transformers maps to LlamaConfig fields (see GGUF_CONFIG_MAPPING["llama"]
    # in transformers/integrations/ggml.py). Avoid "mistral" in the name: transformers would then
    # load the file as a Mistral model.
    writer.add_name("tiny-random-llama")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)  # transformers reads this as head_dim
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_vocab_size(vocab_size)

    # Tokenizer metadata.
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_token_list(tokens)
    # CONTROL (3) makes transformers register these as special tokens, so they are never split.
    writer.add_token_types(
        [TokenType.CONTROL if token in SPECIAL_TOKENS else TokenType.NORMAL for token in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids[BOS_TOKEN])
    writer.add_eos_token_id(ids[EOS_TOKEN])
    writer.add_pad_token_id(ids[PAD_TOKEN])
    # ChatML prompts bring their own <|im_start|>; a BOS in front would be wrong.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # Weights, with llama.cpp's tensor names. Arrays are in torch (row-major, [out, in]) order; the
    # writer reverses dims into ggml order itself. llama.cpp stores attn_q/attn_k with their rows
    # permuted for its rope layout, and transformers undoes that on load; with random weights the
    # permutation is irrelevant, only the shapes must be right.
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", _random(rng, vocab_size, HIDDEN))
    for layer in range(LAYERS):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", _random(rng, HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{prefix}.attn_k.weight", _random(rng, KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{prefix}.attn_v.weight", _random(rng, KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"{prefix}.attn_output.weight", _random(rng, HIDDEN, HEADS * head_dim))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", _random(rng, INTERMEDIATE, HIDDEN))
        writer.add_tensor(f"{prefix}.ffn_up.weight", _random(rng, INTERMEDIATE, HIDDEN))
        writer.add_tensor(f"{prefix}.ffn_down.weight", _random(rng, HIDDEN, INTERMEDIATE))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    # A separate output.weight makes transformers load with tie_word_embeddings=False, the common
    # case for real checkpoints; leaving it out would exercise the tied path instead.
    writer.add_tensor("output.weight", _random(rng, vocab_size, HIDDEN))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
