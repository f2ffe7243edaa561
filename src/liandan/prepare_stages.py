"""What DPO and continued pre-training need before their first step (SFT's is in
`liandan.prepare`): the model with LoRA or full training, the encoded data, the objective.

    from liandan.prepare_stages import prepare_dpo
    run = prepare_dpo(config, Path(config.output_dir), main_process=True, resume=False)
    run.train[0]["chosen"]["labels"]     # only the chosen reply (and its stop token) is scored
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .chat import encode_chat_example
from .config import DPOConfig, PretrainConfig, save_config
from .errors import LiandanError
from .files import file_sha256
from .objectives import dpo_objective, precompute_reference, sft_objective
from .prepare import PreparedRun, attach_trainable, build_manifest, load_trainable_base, pad_id
from .preference import PreferencePair, read_pairs


def finish(run: PreparedRun, config, out_dir: Path, main_process: bool, resume: bool, summary: str) -> PreparedRun:
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            save_config(config, out_dir / "config.yaml")
        from rich.console import Console

        Console(stderr=True).print(summary, highlight=False)
    return run


# ---------------------------------------------------------------------------------------------
# DPO


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int) -> dict:
    """Both replies after the same prompt; only the reply and its stop token are scored (earlier
    assistant turns of the prompt are context)."""
    context = [{**m, "train": False} if m["role"] == "assistant" else m for m in pair.prompt]
    item: dict = {}
    for side in ("chosen", "rejected"):
        try:
            enc = encode_chat_example(tokenizer, [*context, {"role": "assistant", "content": getattr(pair, side)}], max_length)
        except LiandanError as exc:
            raise LiandanError(f"{pair.source}: {exc}") from None
        if enc.trained_tokens == 0:
            raise LiandanError(f"{pair.source}: field '{side}': no reply token is left after truncation to "
                               f"max_length={max_length}; raise max_length or shorten the prompt")  # fmt: skip
        item[side] = {"input_ids": enc.input_ids, "labels": enc.labels}
    item["length"] = 2 * max(len(item["chosen"]["input_ids"]), len(item["rejected"]["input_ids"]))
    return item


def prepare_dpo(config: DPOConfig, out_dir: Path, *, main_process: bool, resume: bool, device: Any = "cpu") -> PreparedRun:
    model, tokenizer, added, new_ids = load_trainable_base(config, out_dir, main_process, resume)
    pairs = read_pairs(config.data)
    if config.eval_data:
        held_out = read_pairs(config.eval_data)
    else:
        from .data import split_examples

        pairs, held_out = split_examples(pairs, config.eval_fraction, config.seed)
    train = [encode_pair(tokenizer, p, config.max_length) for p in pairs]
    evals = [encode_pair(tokenizer, p, config.max_length) for p in held_out]
    model = attach_trainable(model, config, new_ids)
    pad = pad_id(tokenizer)
    if config.full:  # no adapters to switch off: the reference log-probs are computed now, once
        precompute_reference(model, train + evals, pad)
    data = {"files": {f: file_sha256(Path(f)) for f in [*config.data, *config.eval_data] if Path(f).is_file()},
            "train_pairs": len(train), "eval_pairs": len(evals)}  # fmt: skip
    manifest = build_manifest(config, tokenizer, data, added)
    manifest["dpo"] = {"beta": config.beta, "loss": config.loss, "label_smoothing": config.label_smoothing,
                       "sft_weight": config.sft_weight,
                       "reference": "precomputed (full fine-tuning)" if config.full else "the policy with adapters disabled"}  # fmt: skip
    objective = dpo_objective(pad, config.beta, config.label_smoothing, config.loss, config.sft_weight)
    run = PreparedRun(model=model, tokenizer=tokenizer, train=train, eval=evals, objective=objective, unit="pairs", manifest=manifest)
    return finish(run, config, out_dir, main_process, resume, f"data: {len(train)} preference pairs ({len(evals)} held out)")


# ---------------------------------------------------------------------------------------------
# Continued pre-training


def read_texts(paths: list[str]) -> list[tuple[str, str]]:
    """(source, text) documents: a .txt file is one document; other files hold `text` records."""
    from .data import read_examples

    documents = []
    for path in paths:
        if Path(path).suffix.lower() == ".txt":
            if not Path(path).is_file():
                raise LiandanError(f"data file '{path}' does not exist")
            text = Path(path).read_text(encoding="utf-8-sig")
            if not text.strip():
                raise LiandanError(f"{path}: has no text")
            documents.append((path, text))
        else:
            documents += [(e.source, e.text) for e in read_examples([path], purpose="text").examples]
    return documents


def text_blocks(tokenizer: Any, documents: list[tuple[str, str]], block: int) -> tuple[list[dict], int]:
    """Documents tokenized, joined with EOS between them and cut into blocks of ``block`` tokens
    (every token trained). The tail shorter than a block is kept when it has at least 16 tokens.
    Returns the blocks and the total token count."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for _, text in documents:
        ids += tokenizer(text, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
    blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
    if blocks and len(blocks[-1]) < min(16, block):
        blocks.pop()
    return [{"input_ids": b, "labels": list(b)} for b in blocks], len(ids)


def prepare_pretrain(config: PretrainConfig, out_dir: Path, *, main_process: bool, resume: bool, device: Any = "cpu") -> PreparedRun:
    model, tokenizer, added, new_ids = load_trainable_base(config, out_dir, main_process, resume)
    documents = read_texts(config.data)
    train, tokens = text_blocks(tokenizer, documents, config.max_length)
    evals, eval_tokens = text_blocks(tokenizer, read_texts(config.eval_data), config.max_length) if config.eval_data else ([], 0)
    if not train:
        raise LiandanError(f"{', '.join(config.data)}: too little text for one block of {config.max_length} tokens")
    model = attach_trainable(model, config, new_ids)
    data = {"files": {f: file_sha256(Path(f)) for f in [*config.data, *config.eval_data] if Path(f).is_file()},
            "documents": len(documents), "tokens": tokens, "blocks": len(train), "block_size": config.max_length,
            "eval_tokens": eval_tokens, "eval_blocks": len(evals),
            "text_sha256": hashlib.sha256("".join(t for _, t in documents).encode()).hexdigest()}  # fmt: skip
    manifest = build_manifest(config, tokenizer, data, added)
    run = PreparedRun(model=model, tokenizer=tokenizer, train=train, eval=evals,
                      objective=sft_objective(False, pad_id(tokenizer), name="pretrain"), manifest=manifest)  # fmt: skip
    return finish(run, config, out_dir, main_process, resume,
                  f"data: {len(documents)} documents, {tokens} tokens in {len(train)} blocks of {config.max_length} "
                  f"({len(evals)} held-out blocks)")  # fmt: skip
