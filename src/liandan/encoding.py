"""Records to token ids and labels, for every training stage and for evaluation.

    from liandan.encoding import encode_all, encode_pair, text_blocks
    train, stats = encode_all(tokenizer, examples, max_length=1024)   # SFT conversations
    pair = encode_pair(tokenizer, preference_pair, max_length=1024)   # DPO: chosen and rejected
    kto = add_mismatched_rows([encode_unpaired(tokenizer, e, 1024) for e in examples], 1024)  # KTO
    blocks, tokens = text_blocks(tokenizer, documents, block=512)     # continued pre-training

Each encoded item is ``{"input_ids", "labels"}`` (a pair holds one of each per reply), labels
``IGNORE_INDEX`` where a token is not trained. Conversations are masked by the model's own chat
template (`liandan.assistant_masks`): only the assistant's replies and the stop token after each
are trained.
"""

from __future__ import annotations

from typing import Any

from .assistant_masks import SPECIAL_TEXT_MODES, encode_chat_example
from .chat import special_texts
from .data import Example
from .errors import LiandanError
from .losses import IGNORE_INDEX
from .preference import PreferencePair, UnpairedExample


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def encode_all(
    tokenizer: Any, examples: list[Example], max_length: int, special_text: str = "error"
) -> tuple[list[dict], dict]:
    """Encode every example; examples with nothing to train are reported and dropped.
    ``special_text``: see `liandan.assistant_masks.SPECIAL_TEXT_MODES`."""
    encoded, stats = [], {"examples": 0, "tokens": 0, "trained_tokens": 0, "truncated": 0,
                          "no_trained_tokens": [], "stop_cut_off": 0}  # fmt: skip
    for example in examples:
        try:
            item = encode_chat_example(tokenizer, example.messages, max_length, special_text, example.tools)
        except LiandanError as exc:
            raise LiandanError(f"{example.source}: {exc}") from None
        stats["truncated"] += item.truncated
        stats["stop_cut_off"] += not item.ends_with_stop
        if item.trained_tokens == 0:
            stats["no_trained_tokens"].append(example.source)
            continue
        stats["examples"] += 1
        stats["tokens"] += len(item.input_ids)
        stats["trained_tokens"] += item.trained_tokens
        encoded.append({"input_ids": item.input_ids, "labels": item.labels})
    return encoded, stats


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int, special_text: str = "error") -> dict:
    """Both replies after the same prompt; only the reply and its stop token are scored (earlier
    assistant turns of the prompt are context)."""
    context = [{**m, "train": False} if m["role"] == "assistant" else m for m in pair.prompt]
    item: dict = {}
    for side in ("chosen", "rejected"):
        try:
            messages = [*context, {"role": "assistant", "content": getattr(pair, side)}]
            enc = encode_chat_example(tokenizer, messages, max_length, special_text)
        except LiandanError as exc:
            raise LiandanError(f"{pair.source}: {exc}") from None
        if enc.trained_tokens == 0:
            raise LiandanError(f"{pair.source}: field '{side}': no reply token is left after truncation to "
                               f"max_length={max_length}; raise max_length or shorten the prompt")  # fmt: skip
        item[side] = {"input_ids": enc.input_ids, "labels": enc.labels}
    item["length"] = 2 * max(len(item["chosen"]["input_ids"]), len(item["rejected"]["input_ids"]))
    return item


def encode_unpaired(tokenizer: Any, example: UnpairedExample, max_length: int, special_text: str = "error") -> dict:
    """A KTO example: the completion after its prompt (only the completion and its stop token are
    scored) and whether it is desirable."""
    context = [{**m, "train": False} if m["role"] == "assistant" else m for m in example.prompt]
    try:
        enc = encode_chat_example(tokenizer, [*context, {"role": "assistant", "content": example.completion}], max_length, special_text)
    except LiandanError as exc:
        raise LiandanError(f"{example.source}: {exc}") from None
    if enc.trained_tokens == 0:
        raise LiandanError(f"{example.source}: field 'completion': no completion token is left after truncation to "
                           f"max_length={max_length}; raise max_length or shorten the prompt")  # fmt: skip
    return {"input_ids": enc.input_ids, "labels": enc.labels, "desirable": example.desirable}


def add_mismatched_rows(items: list[dict], max_length: int) -> list[dict]:
    """Give every KTO example a mismatched row for the KL estimate z0: its completion after the
    prompt of the next example whose prompt differs (cyclically; the example's own prompt only
    when every prompt is the same), cut to ``max_length``. The pairing is fixed here, not drawn
    per micro-batch, so that full fine-tuning can precompute the reference log-probs of these
    rows too; each row still travels in its example's micro-batch.

    The rows are spliced from token ids: the prompt's tokens (everything before the first scored
    token, the assistant header included) and the completion's (from the first scored token on)."""
    starts = [next(t for t, label in enumerate(item["labels"]) if label != IGNORE_INDEX) for item in items]
    prompts = [tuple(item["input_ids"][:start]) for item, start in zip(items, starts)]
    for i, item in enumerate(items):
        j = next((k % len(items) for k in range(i + 1, i + len(items)) if prompts[k % len(items)] != prompts[i]), i)
        ids = list(prompts[j]) + item["input_ids"][starts[i] :]
        labels = [IGNORE_INDEX] * len(prompts[j]) + item["labels"][starts[i] :]
        item["kl_input_ids"], item["kl_labels"] = ids[:max_length], labels[:max_length]
        item["length"] = 2 * max(len(item["input_ids"]), len(item["kl_input_ids"]))
    return items


def text_blocks(
    tokenizer: Any, documents: list[tuple[str, str]], block: int, special_text: str = "error"
) -> tuple[list[dict], int]:
    """Documents tokenized, joined with EOS between them and cut into blocks of ``block`` tokens
    (every token trained). The tail shorter than a block is kept when it has at least 16 tokens.
    Returns the blocks and the total token count. Special-token text in a document raises, or with
    ``special_text="plain"`` is tokenized as plain characters; it never becomes a control token."""
    if special_text not in SPECIAL_TEXT_MODES:
        raise LiandanError(f"special_text {special_text!r}: expected one of {', '.join(SPECIAL_TEXT_MODES)}")
    specials = sorted(s for s in special_texts(tokenizer) if s)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for source, text in documents:
        found = [s for s in specials if s in text]
        if found and special_text == "error":
            raise LiandanError(
                f"{source}: field 'text': contains the special token {found[0]!r} as text, which would become a "
                "control token; remove it, or set special_text: plain to encode it as plain text"
            )
        tokens = tokenizer(text, add_special_tokens=False, split_special_tokens=bool(found)).input_ids
        ids += tokens + ([eos] if eos is not None else [])
    blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
    if blocks and len(blocks[-1]) < min(16, block):
        blocks.pop()
    return [{"input_ids": b, "labels": list(b)} for b in blocks], len(ids)
