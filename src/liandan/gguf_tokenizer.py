"""The tokenizer of an exported GGUF: byte-level BPE as llama.cpp's "gpt2" tokenizer model.

    from liandan.gguf_tokenizer import add_tokenizer, gguf_vocab
    vocab = gguf_vocab(tokenizer, n_vocab, spec)      # tokens, types, merges, pre-tokenizer name
    add_tokenizer(writer, tokenizer, vocab)           # into a gguf.GGUFWriter

Used by `liandan.export`. Only tokenizers that llama.cpp and transformers' GGUF reader both rebuild
exactly are accepted; anything else is refused with a message naming what differs.
"""

from __future__ import annotations

import json
from typing import Any

from .chat import has_chat_template, stop_token_ids
from .errors import LiandanError

# How llama.cpp names the pre-tokenizers (the rules that split text before BPE) that transformers'
# GGUF loader rebuilds the same way. Anything else would tokenize differently in one of them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen 2 and 3: digits one by one
SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizers pre-tokenizer (as JSON), or None."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # GPT-2's split regex, the same in llama.cpp
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2:
        split, byte_level = steps
        if (split.get("type") == "Split" and split.get("pattern", {}).get("Regex") in SPLITS
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)):  # fmt: skip
            return SPLITS[split["pattern"]["Regex"]]
    return None


def gguf_vocab(tokenizer: Any, n_vocab: int, spec: str) -> dict:
    """The tokenizer as llama.cpp stores it: tokens (one per embedding row), token types, merges,
    the pre-tokenizer name, whether BOS/EOS are added, and notes on what llama.cpp does not
    reproduce exactly. Raises for tokenizers it cannot hold."""
    from gguf import TokenType

    if not getattr(tokenizer, "is_fast", False):
        raise LiandanError(f"model '{spec}': the tokenizer is not a fast (tokenizers) tokenizer; GGUF export needs one")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = backend["model"].get("type")
    if kind != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise LiandanError(f"model '{spec}': tokenizer model is {kind} without a byte-level decoder; GGUF export "
                           "supports byte-level BPE tokenizers (GPT-2 style) only")  # fmt: skip
    normalizer = (backend.get("normalizer") or {}).get("type")
    notes = []
    if normalizer == "NFC":  # Qwen's: llama.cpp's converter drops it too, and most text is NFC already
        notes.append("the tokenizer normalizes text to Unicode NFC and llama.cpp does not: text that is not "
                     "already NFC (decomposed accents) reaches the GGUF model as other tokens")  # fmt: skip
    elif normalizer:
        raise LiandanError(f"model '{spec}': the tokenizer has a normalizer ({normalizer}), "
                           "which llama.cpp's byte-level BPE does not apply")  # fmt: skip
    pre = pre_tokenizer_name(backend.get("pre_tokenizer"))
    if pre is None:
        raise LiandanError(f"model '{spec}': tokenizer pre_tokenizer {json.dumps(backend.get('pre_tokenizer'))[:120]} "
                           "is not one GGUF export knows (GPT-2 byte-level, Llama 3's or Qwen 2's split)")  # fmt: skip
    tokens: dict[int, str] = {index: token for token, index in backend["model"]["vocab"].items()}
    types = {index: TokenType.NORMAL for index in tokens}
    for added in backend.get("added_tokens", []):
        # llama.cpp stores added tokens as plain text, not in the byte-level spelling.
        tokens[added["id"]] = added["content"]
        types[added["id"]] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    if max(tokens) >= n_vocab:
        raise LiandanError(f"model '{spec}': the tokenizer has token id {max(tokens)} but the model has only "
                           f"{n_vocab} embeddings")  # fmt: skip
    # Embedding rows without a token (vocabularies padded to a round size) get placeholders, as
    # llama.cpp's converter writes them.
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return {
        "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(n_vocab)],
        "types": [types.get(i, TokenType.UNUSED) for i in range(n_vocab)],
        "merges": merges,
        "pre": pre,
        "add_bos": len(with_special) > len(plain) and with_special[0] == tokenizer.bos_token_id,
        "add_eos": len(with_special) > len(plain) and with_special[-1] == tokenizer.eos_token_id,
        "notes": notes,
    }


def add_tokenizer(writer: Any, tokenizer: Any, vocab: dict) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    turn_end = [i for i in stop_token_ids(tokenizer) if i != tokenizer.eos_token_id]
    if turn_end:  # llama.cpp also stops on an end-of-turn token that is not eos
        writer.add_eot_token_id(turn_end[0])
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if has_chat_template(tokenizer):
        writer.add_chat_template(tokenizer.chat_template)
