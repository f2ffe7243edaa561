"""Shared fixtures: a tiny tokenizer trained here and tiny random models saved to disk, so the
real loading code runs offline and in seconds.

- ``chat_model_dir``: Llama-style, ChatML chat template, eos ``<|im_end|>``.
- ``base_model_dir``: the same shapes with no chat template and eos ``<|endoftext|>`` (a base model).
- ``bare_base_model_dir``: a base model whose vocabulary lacks the ChatML tokens.
- ``stopping_model_dir``: the chat model trained to answer "Fine." and stop.
- ``gguf_model_file``: a tiny Llama GGUF file (see gguf_fixture.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! This is a tiny tokenizer for tests.",
    "The quick brown fox jumps over the lazy dog.",
    "user assistant system: hello, how are you today? What is the capital of France?",
    "I am fine, thank you. Let me help with that. Paris is the capital of France.",
    "请将这段话翻译成英文。我想弄明白这两种大模型的差别。",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line, UTF-8, as users write data files."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_row(question: str, answer: str) -> dict:
    """A single-exchange chat in the messages format."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def build_tokenizer(chat_template: str | None, eos: str, special: list[str] = SPECIAL, bos: str = "<|im_start|>"):
    """A byte-level BPE (about 400 tokens) with ChatML special tokens, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    raw.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model_dir(path: Path, chat_template: str | None, eos: str, hidden_size: int = 32, **tokenizer_options) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(chat_template, eos, **tokenizer_options)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("chat-model"), CHATML, "<|im_end|>")


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("base-model"), None, "<|endoftext|>")


@pytest.fixture(scope="session")
def bare_base_model_dir(tmp_path_factory) -> Path:
    """A base model whose vocabulary has no ChatML tokens at all: giving it a chat template adds them."""
    return build_model_dir(tmp_path_factory.mktemp("bare-base-model"), None, "<|endoftext|>",
                           special=["<|endoftext|>"], bos="<|endoftext|>")  # fmt: skip


@pytest.fixture(scope="session")
def stopping_model_dir(tmp_path_factory, chat_model_dir) -> Path:
    """The tiny chat model fully fine-tuned until it ends its answers by itself ("Fine.")."""
    from liandan.config import SFTConfig
    from liandan.train import train_sft

    root = tmp_path_factory.mktemp("stopping")
    write_jsonl(root / "d.jsonl", [chat_row(f"Question {i}?", "Fine.") for i in range(8)])
    train_sft(SFTConfig(model=str(chat_model_dir), data=[str(root / "d.jsonl")], output_dir=str(root / "run"), full=True,
                        max_steps=30, lr=2e-2, batch_tokens=4096, max_length=64, mixed_precision="no", warmup_ratio=0.0))  # fmt: skip
    return root / "run"


@pytest.fixture(scope="session")
def gguf_model_file(tmp_path_factory) -> Path:
    from gguf_fixture import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(autouse=True)
def isolated_home(request, tmp_path, monkeypatch):
    """Every test gets its own LIANDAN_HOME, so none can touch (or rely on) the user's cache;
    tests marked ``model`` share the real converted default model instead."""
    if request.node.get_closest_marker("model") is None:
        monkeypatch.setenv("LIANDAN_HOME", str(tmp_path / "liandan-home"))
