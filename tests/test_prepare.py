"""What a training run is handed before its first step (`liandan.prepare`): encoded data with the
right labels, the trainable weights, the run directory and its manifest. Expected token ids,
hashes and counts are worked out here from the tokenizer, hashlib and the files themselves."""

import hashlib
import json
import os

import accelerate
import peft
import pytest
import torch
import transformers
import yaml

from conftest import CHATML, chat_row, write_jsonl

import liandan
from liandan.config import DPOConfig, PretrainConfig, SFTConfig
from liandan.errors import LiandanError
from liandan.losses import IGNORE_INDEX
from liandan.models import ModelSource, load_model, resolve_model
from liandan.prepare import (
    attach_trainable,
    build_manifest,
    check_output_dir,
    file_hashes,
    prepare_dpo,
    prepare_pretrain,
    prepare_sft,
    weights_hash,
)

IM_START, IM_END, PAD = 1, 2, 0  # the fixtures' <|im_start|>, <|im_end|> and <|endoftext|> (also the padding)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sft(model_dir, data, out, **overrides) -> SFTConfig:
    values = dict(model=str(model_dir), data=[str(d) for d in data], output_dir=str(out), max_steps=2,
                  batch_tokens=256, max_length=64, mixed_precision="no")  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


def chatml_ids(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(tokens before the reply, the reply's tokens and its <|im_end|>) of a one-exchange ChatML
    conversation, from the tokenizer's ids of the text written out here."""
    head = tok(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    return head, tok(answer, add_special_tokens=False).input_ids + [IM_END]


# ---------------------------------------------------------------------------------------------
# SFT


def test_sft_labels_only_the_reply_and_its_stop_token(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("What is the capital of France?", "Paris is the capital."),
                                              chat_row("hello", "I am fine, thank you.")])  # fmt: skip
    run = prepare_sft(sft(chat_model_dir, [data], tmp_path / "run"), tmp_path / "run", main_process=True, resume=False)
    tok = run.tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [PAD, IM_START, IM_END]
    assert len(run.train) == 2 and run.eval == [] and run.unit == "trained_tokens" and run.objective.name == "sft"
    for item, (question, answer) in zip(run.train, [("What is the capital of France?", "Paris is the capital."),
                                                    ("hello", "I am fine, thank you.")]):  # fmt: skip
        head, reply = chatml_ids(tok, question, answer)
        newline = tok("\n", add_special_tokens=False).input_ids
        assert item["input_ids"] == head + reply + newline
        assert item["labels"] == [IGNORE_INDEX] * len(head) + reply + [IGNORE_INDEX] * len(newline)
        assert item["labels"][len(head) + len(reply) - 1] == IM_END  # the stop token is trained
    replies = [chatml_ids(tok, "What is the capital of France?", "Paris is the capital.")[1], chatml_ids(tok, "hello", "I am fine, thank you.")[1]]
    data_manifest = run.manifest["data"]
    assert data_manifest["trained_tokens"] == sum(len(reply) for reply in replies)
    assert data_manifest["train_tokens"] == sum(len(item["input_ids"]) for item in run.train)
    assert (data_manifest["records"], data_manifest["skipped"], data_manifest["train_examples"], data_manifest["eval_examples"]) == (2, 0, 2, 0)


def test_sft_holds_out_eval_fraction_and_drops_examples_without_a_trained_token(tmp_path, chat_model_dir, capsys):
    long_question = "The quick brown fox jumps over the lazy dog. " * 4  # its reply starts after max_length
    rows = [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(8)] + [chat_row(long_question, "Yes.")]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    run = prepare_sft(sft(chat_model_dir, [data], out, eval_fraction=0.25, max_length=32), out, main_process=True, resume=False)
    assert len(run.eval) == 2 and len(run.train) == 6  # round(9 * 0.25) held out; the long one dropped
    for item in run.train + run.eval:
        assert len(item["input_ids"]) <= 32 and any(label != IGNORE_INDEX for label in item["labels"])
    manifest = run.manifest["data"]
    assert manifest["records"] == 9 and manifest["train_examples"] == 6 and manifest["eval_examples"] == 2
    assert manifest["no_trained_tokens"] == 1 and manifest["truncated"] == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "1 examples have no trained token and were dropped" in err and f"{data}:9" in err


def test_sft_eval_data_is_the_held_out_set_and_dropped_ones_are_reported(tmp_path, chat_model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(4)])
    long_question = "The quick brown fox jumps over the lazy dog. " * 4  # its reply starts after max_length
    held = write_jsonl(tmp_path / "held.jsonl", [chat_row("What is 9 plus 9?", "It is 18."), chat_row(long_question, "Yes.")])
    out = tmp_path / "run"
    run = prepare_sft(sft(chat_model_dir, [data], out, eval_data=[str(held)], max_length=32), out, main_process=True, resume=False)
    assert len(run.train) == 4 and len(run.eval) == 1  # every training record trains; the file is the held-out set
    head, reply = chatml_ids(run.tokenizer, "What is 9 plus 9?", "It is 18.")
    assert run.eval[0]["input_ids"][: len(head) + len(reply)] == head + reply
    manifest = run.manifest["data"]
    assert (manifest["eval_examples"], manifest["eval_no_trained_tokens"]) == (1, 1)
    assert manifest["files"][str(held)] == sha256(held)
    err = " ".join(capsys.readouterr().err.split())
    assert "1 held-out examples have no trained token and were left out of the eval loss" in err and f"{held}:2" in err


def test_sft_without_a_trained_token_is_an_error(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("The quick brown fox jumps over the lazy dog.", "Yes.")] * 3)
    out = tmp_path / "run"
    with pytest.raises(LiandanError, match="no training example has a trained token after encoding"):
        prepare_sft(sft(chat_model_dir, [data], out, max_length=8), out, main_process=True, resume=False)
    assert not out.exists()  # nothing written for a run that cannot start
    with pytest.raises(LiandanError, match="no training data: give --data FILE"):
        prepare_sft(sft(chat_model_dir, [], out), out, main_process=True, resume=False)


def test_config_yaml_is_written_by_the_main_process_only(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("hi", "Hello there.")])
    out = tmp_path / "run"
    config = sft(chat_model_dir, [data], out, lr=3e-3, lora={"rank": 4})
    prepare_sft(config, out, main_process=False, resume=False)
    assert not out.exists()
    prepare_sft(config, out, main_process=True, resume=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == str(chat_model_dir) and saved["data"] == [str(data)] and saved["lr"] == 3e-3
    assert saved["lora"]["rank"] == 4 and saved["output_dir"] == str(out)
    # The other processes run after the main one: the directory is not empty, and is left alone.
    (out / "config.yaml").write_text("written by the main process\n")
    prepare_sft(config, out, main_process=False, resume=False)
    assert (out / "config.yaml").read_text() == "written by the main process\n"
    # A resumed run keeps the settings it was started with.
    prepare_sft(sft(chat_model_dir, [data], out, lr=1e-1), out, main_process=True, resume=True)
    assert (out / "config.yaml").read_text() == "written by the main process\n"


def test_a_non_empty_output_directory_is_refused_unless_resume(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("hi", "Hello there.")])
    out = tmp_path / "run"
    check_output_dir(out, resume=False)  # missing: fine
    out.mkdir()
    check_output_dir(out, resume=False)  # empty: fine
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LiandanError, match=f"output directory '{out}' is not empty; pass --resume"):
        check_output_dir(out, resume=False)
    check_output_dir(out, resume=True)
    with pytest.raises(LiandanError, match="is not empty; pass --resume"):
        prepare_sft(sft(chat_model_dir, [data], out), out, main_process=True, resume=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# The manifest


def test_manifest_records_data_template_tokens_and_method(tmp_path, chat_model_dir):
    first = write_jsonl(tmp_path / "a.jsonl", [chat_row("hi", "Hello there.")])
    second = write_jsonl(tmp_path / "b.jsonl", [chat_row("ok", "Fine, thank you."), chat_row("hello", "Paris.")])
    out = tmp_path / "run"
    run = prepare_sft(sft(chat_model_dir, [first, second], out), out, main_process=True, resume=False)
    manifest = run.manifest
    assert manifest["data"]["files"] == {str(first): sha256(first), str(second): sha256(second)}
    assert manifest["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
    assert manifest["chat_template_added"] is False
    assert manifest["special_tokens"] == {"bos": IM_START, "eos": IM_END, "pad": PAD, "stop": [IM_END]}
    assert manifest["method"] == "lora" and manifest["liandan"] == liandan.__version__
    assert manifest["base_model"] == {"spec": str(chat_model_dir), "kind": "hf_dir",
                                      "weights_sha256": sha256(chat_model_dir / "model.safetensors"),
                                      "path_from_run": os.path.relpath(chat_model_dir.resolve(), out.resolve())}  # fmt: skip
    assert (out / manifest["base_model"]["path_from_run"]).resolve() == chat_model_dir.resolve()
    assert manifest["versions"] == {"torch": torch.__version__, "transformers": transformers.__version__,
                                    "peft": peft.__version__, "accelerate": accelerate.__version__}  # fmt: skip
    assert manifest["data"]["records"] == 3 and manifest["data"]["format"] == "messages"
    run.write_manifest(out)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    full = build_manifest(sft(chat_model_dir, [first], out, full=True), run.model, run.tokenizer, {"files": {}}, True)
    assert full["method"] == "full" and full["chat_template_added"] is True and full["data"] == {"files": {}}


def test_file_and_weights_hashes(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("hi", "Hello there.")])
    # a Hub data set (no such file) has no hash; a file's is its bytes' SHA-256
    assert file_hashes([str(data), "owner/some-dataset"]) == {str(data): sha256(data)}
    assert weights_hash(resolve_model(str(chat_model_dir))) == sha256(chat_model_dir / "model.safetensors")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF and some bytes")
    assert weights_hash(ModelSource(str(gguf), "gguf", str(gguf))) == hashlib.sha256(b"GGUF and some bytes").hexdigest()
    assert weights_hash(resolve_model("owner/model")) is None  # a hub id: nothing local to hash


# ---------------------------------------------------------------------------------------------
# What trains


def trainable(model) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def test_lora_makes_only_the_adapters_trainable(tmp_path, chat_model_dir):
    model, _ = load_model(str(chat_model_dir), dtype="float32")
    config = SFTConfig(data=["x"], lora={"rank": 4})
    peft_model = attach_trainable(model, config, [])
    names, params = trainable(peft_model), dict(peft_model.named_parameters())
    expected = {}
    for layer in range(2):
        for module in LINEAR:
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
            base = params[f"{prefix}.base_layer.weight"]
            out_features, in_features = base.shape
            expected[f"{prefix}.lora_A.default.weight"] = (4, in_features)
            expected[f"{prefix}.lora_B.default.weight"] = (out_features, 4)
    assert names == expected  # every linear layer of the blocks, not the output head, nothing frozen trains
    frozen = [name for name, p in peft_model.named_parameters() if not p.requires_grad]
    assert "base_model.model.model.embed_tokens.weight" in frozen and "base_model.model.lm_head.weight" in frozen


def test_lora_target_modules_choose_the_layers(chat_model_dir):
    model, _ = load_model(str(chat_model_dir), dtype="float32")
    peft_model = attach_trainable(model, SFTConfig(data=["x"], lora={"rank": 2, "target_modules": ["q_proj", "v_proj"]}), [])
    assert sorted(trainable(peft_model)) == sorted(
        f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.default.weight"
        for layer in range(2) for module in ("q_proj", "v_proj") for ab in "AB"
    )  # fmt: skip


def test_full_fine_tuning_trains_every_weight(chat_model_dir):
    model, _ = load_model(str(chat_model_dir), dtype="float32")
    model.requires_grad_(False)
    same = attach_trainable(model, SFTConfig(data=["x"], full=True), [])
    assert same is model and not isinstance(same, peft.PeftModel)
    assert all(p.requires_grad for p in same.parameters())


def test_lora_on_a_base_model_given_chatml_trains_the_added_rows(tmp_path, bare_base_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("hi", "Hello there.")])
    out = tmp_path / "run"
    run = prepare_sft(sft(bare_base_model_dir, [data], out, lora={"rank": 4}), out, main_process=True, resume=False)
    tok = run.tokenizer
    new_ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert new_ids == [400, 401] and len(tok) == 402  # the bare vocabulary has 400 tokens
    assert run.model.get_input_embeddings().weight.shape == (402, 32)
    names = trainable(run.model)
    rows = {n: s for n, s in names.items() if "lora_" not in n}
    # the input rows, to read the new tokens, and the untied head's rows, to predict them
    assert rows == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default": (2, 32),
                    "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default": (2, 32)}  # fmt: skip
    assert len(names) == 2 * 7 * 2 + 2
    adapter = run.model.base_model.model.model.embed_tokens.token_adapter
    assert adapter.token_indices["default"] == [400, 401]
    manifest = run.manifest
    assert manifest["adapted_modules"] == {m: 2 for m in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")}
    assert manifest["trainable_token_rows"] == {"embed_tokens": [400, 401], "lm_head": [400, 401]}
    assert manifest["chat_template_added"] is True
    assert manifest["special_tokens"]["stop"] == [0, 401]  # <|endoftext|> (eos) and ChatML's <|im_end|>
    assert manifest["chat_template_sha256"] == hashlib.sha256(CHATML.encode()).hexdigest()
    # the reply and its new <|im_end|> are the trained tokens
    item = run.train[0]
    assert [t for t in item["labels"] if t != IGNORE_INDEX] == tok("Hello there.", add_special_tokens=False).input_ids + [401]


def test_lora_on_a_tied_base_model_trains_one_set_of_new_rows_that_the_head_shares(tmp_path):
    """Tied embeddings (Gemma, small Qwen and Llama models): the new rows are trained once, in the
    embeddings, and the output head reads the same rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tokenizer

    tok = build_tokenizer(None, "<|endoftext|>", special=["<|endoftext|>"], bos="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("hi", "Hello there.")])
    out = tmp_path / "run"
    run = prepare_sft(sft(tmp_path / "base", [data], out, lora={"rank": 4}), out, main_process=True, resume=False)
    rows = [n for n in trainable(run.model) if "lora_" not in n]
    assert rows == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    with torch.no_grad():
        dict(run.model.named_parameters())[rows[0]].add_(1.0)  # as training would move them
        embedded = run.model.get_input_embeddings()(torch.tensor([400, 401]))  # (2, H)
        head_rows = run.model.get_output_embeddings()(torch.eye(32)).t()[400:]  # (2, H)
    torch.testing.assert_close(head_rows, embedded)


def test_base_model_with_the_chatml_tokens_gets_a_template_and_no_new_rows(tmp_path, base_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("hi", "Hello there.")])
    out = tmp_path / "run"
    run = prepare_sft(sft(base_model_dir, [data], out), out, main_process=True, resume=False)
    assert len(run.tokenizer) == 400 and run.manifest["chat_template_added"] is True
    assert all("lora_" in name for name in trainable(run.model))
    full = prepare_sft(sft(base_model_dir, [data], tmp_path / "full", full=True), tmp_path / "full", main_process=True, resume=False)
    assert full.manifest["method"] == "full" and all(p.requires_grad for p in full.model.parameters())


# ---------------------------------------------------------------------------------------------
# DPO and pre-training


PAIRS = [{"prompt": f"Is {i} a number?", "chosen": "Yes, it is.", "rejected": "I am fine, thank you."} for i in range(8)]


def dpo(model_dir, data, out, **overrides) -> DPOConfig:
    values = dict(model=str(model_dir), data=[str(data)], output_dir=str(out), max_steps=2, batch_tokens=256,
                  max_length=64, mixed_precision="no")  # fmt: skip
    values.update(overrides)
    return DPOConfig(**values)


def prompt_of(tok, item) -> str:
    text = tok.decode(item["chosen"]["input_ids"])
    return text[text.index("Is ") : text.index("?") + 1]


def test_dpo_holds_out_eval_fraction_without_eval_data(tmp_path, chat_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    run = prepare_dpo(dpo(chat_model_dir, pairs, out, eval_fraction=0.25), out, main_process=True, resume=False)
    tok = run.tokenizer
    assert len(run.train) == 6 and len(run.eval) == 2
    train_prompts, eval_prompts = {prompt_of(tok, p) for p in run.train}, {prompt_of(tok, p) for p in run.eval}
    assert train_prompts | eval_prompts == {p["prompt"] for p in PAIRS} and not train_prompts & eval_prompts
    for item in run.train + run.eval:
        head, chosen = chatml_ids(tok, prompt_of(tok, item), "Yes, it is.")
        _, rejected = chatml_ids(tok, prompt_of(tok, item), "I am fine, thank you.")
        for side, reply in (("chosen", chosen), ("rejected", rejected)):
            assert item[side]["input_ids"][: len(head) + len(reply)] == head + reply
            assert [t for t in item[side]["labels"] if t != IGNORE_INDEX] == reply
            assert item[side]["labels"][: len(head)] == [IGNORE_INDEX] * len(head)
        assert item["length"] == 2 * max(len(item["chosen"]["input_ids"]), len(item["rejected"]["input_ids"]))
        assert "ref_logps" not in item  # LoRA: the reference is the policy with adapters off
    assert run.unit == "pairs" and run.objective.name == "dpo"
    manifest = run.manifest
    assert manifest["data"] == {"files": {str(pairs): sha256(pairs)}, "train_pairs": 6, "eval_pairs": 2}
    assert manifest["method"] == "lora" and manifest["dpo"]["reference"] == "the policy with adapters disabled"
    assert {k: manifest["dpo"][k] for k in ("beta", "loss", "label_smoothing", "sft_weight")} == {
        "beta": 0.1, "loss": "sigmoid", "label_smoothing": 0.0, "sft_weight": 0.0}  # fmt: skip
    assert (out / "config.yaml").is_file()


def test_dpo_eval_data_is_the_held_out_set(tmp_path, chat_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    held = write_jsonl(tmp_path / "held.jsonl", [{**PAIRS[0], "prompt": "Is ten a number?"}])
    out = tmp_path / "run"
    run = prepare_dpo(dpo(chat_model_dir, pairs, out, eval_data=[str(held)], eval_fraction=0.5, full=True), out,
                      main_process=True, resume=False)  # fmt: skip
    assert [prompt_of(run.tokenizer, p) for p in run.train] == [p["prompt"] for p in PAIRS]  # eval_data: no split
    assert [prompt_of(run.tokenizer, p) for p in run.eval] == ["Is ten a number?"]
    assert run.manifest["data"] == {"files": {str(pairs): sha256(pairs), str(held): sha256(held)}, "train_pairs": 8, "eval_pairs": 1}
    assert run.manifest["method"] == "full" and run.manifest["dpo"]["reference"] == "precomputed (full fine-tuning)"
    for item in run.train + run.eval:  # full fine-tuning: both replies' reference log-probs, stored once
        chosen, rejected = item["ref_logps"]
        assert chosen < 0 and rejected < 0 and chosen != rejected
    assert all(p.requires_grad for p in run.model.parameters())


def test_pretrain_blocks_and_manifest(tmp_path, chat_model_dir):
    docs = ["The quick brown fox jumps over the lazy dog. " * 2, "Hello world! This is a tiny tokenizer for tests. " * 2]
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in docs])
    held = tmp_path / "held.txt"
    held.write_text("Paris is the capital of France. " * 4)
    out = tmp_path / "run"
    config = PretrainConfig(model=str(chat_model_dir), data=[str(data)], eval_data=[str(held)], output_dir=str(out),
                            max_length=32, batch_tokens=64, max_steps=2, mixed_precision="no")  # fmt: skip
    run = prepare_pretrain(config, out, main_process=True, resume=False)
    tok = run.tokenizer
    ids = [t for doc in docs for t in tok(doc, add_special_tokens=False).input_ids + [IM_END]]  # EOS after each document
    assert tok.eos_token_id == IM_END
    blocks = [ids[i : i + 32] for i in range(0, len(ids), 32)]
    tail = len(ids) % 32
    assert tail >= 16  # this text's last, shorter block is long enough to keep
    assert [b["input_ids"] for b in run.train] == blocks and all(b["labels"] == b["input_ids"] for b in run.train)
    held_ids = tok(held.read_text(), add_special_tokens=False).input_ids + [IM_END]
    assert len(held_ids) > 32 and len(held_ids) % 32 < 16  # and the held-out text's tail is too short: dropped
    assert [b["input_ids"] for b in run.eval] == [held_ids[i : i + 32] for i in range(0, len(held_ids) - 31, 32)]
    assert run.objective.name == "pretrain" and run.objective.packing  # blocks packed into rows, each attending to itself
    assert run.manifest["data"] == {
        "files": {str(data): sha256(data), str(held): sha256(held)}, "documents": 2, "tokens": len(ids),
        "blocks": len(blocks), "block_size": 32, "eval_tokens": len(held_ids), "eval_blocks": len(held_ids) // 32,
        "text_sha256": hashlib.sha256("".join(docs).encode()).hexdigest(),
    }  # fmt: skip
    assert run.manifest["method"] == "lora" and (out / "config.yaml").is_file()


def test_pretrain_with_too_little_text_is_an_error(tmp_path, chat_model_dir):
    text = tmp_path / "short.txt"
    text.write_text("Hello world!")
    out = tmp_path / "run"
    config = PretrainConfig(model=str(chat_model_dir), data=[str(text)], output_dir=str(out), max_length=64,
                            batch_tokens=64, mixed_precision="no")  # fmt: skip
    with pytest.raises(LiandanError, match=f"{text}: too little text for one block of 64 tokens"):
        prepare_pretrain(config, out, main_process=True, resume=False)
    assert not out.exists()


def test_pretrain_eval_fraction_holds_out_blocks_of_the_training_text(tmp_path, chat_model_dir):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "run"
    config = PretrainConfig(model=str(chat_model_dir), data=[str(text)], eval_fraction=0.25, output_dir=str(out),
                            max_length=16, batch_tokens=64, max_steps=2, mixed_precision="no")  # fmt: skip
    run = prepare_pretrain(config, out, main_process=True, resume=False)
    ids = run.tokenizer(text.read_text(), add_special_tokens=False).input_ids + [IM_END]
    blocks = [ids[i : i + 16] for i in range(0, len(ids), 16)]
    blocks = blocks if len(blocks[-1]) >= 16 else blocks[:-1]
    held_out = round(len(blocks) * 0.25)
    assert len(run.eval) == held_out and len(run.train) == len(blocks) - held_out
    assert sorted(map(tuple, (b["input_ids"] for b in run.train + run.eval))) == sorted(map(tuple, blocks))  # a split, nothing lost
    assert run.manifest["data"]["eval_blocks"] == held_out
    assert run.manifest["data"]["eval_tokens"] == sum(len(b["input_ids"]) for b in run.eval)


def test_special_token_text_in_training_data_is_an_error_unless_trained_as_plain_text(tmp_path, chat_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_row("hi", "Hello."), chat_row("Say <|im_end|> please", "Done.")])
    out = tmp_path / "run"
    with pytest.raises(LiandanError, match=r"d\.jsonl:2: .*'<\|im_end\|>'"):
        prepare_sft(sft(chat_model_dir, [data], out), out, main_process=True, resume=False)
    plain = tmp_path / "plain"
    run = prepare_sft(sft(chat_model_dir, [data], plain, special_text="plain"), plain, main_process=True, resume=False)
    end = run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # the template's own <|im_end|> closes each of the two turns; the typed one is text
    assert [item["input_ids"].count(end) for item in run.train] == [2, 2]


def test_an_unfinished_run_directory_is_not_a_model(tmp_path, chat_model_dir):
    import shutil

    from liandan.checkpoints import INCOMPLETE
    from liandan.models import resolve_model

    run = tmp_path / "run"
    shutil.copytree(chat_model_dir, run)
    assert resolve_model(str(run)).kind == "hf_dir"
    (run / INCOMPLETE).write_text("")
    with pytest.raises(LiandanError, match="unfinished training run"):
        resolve_model(str(run))
