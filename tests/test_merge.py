"""liandan.merge: a LoRA run folded into its base weights, written as a standalone model.

The expected weights are computed here from the files on disk (base safetensors, adapter
safetensors, adapter_config.json), never by PEFT's merge, so a wrong scale or a missed module shows.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import CHATML, chat_row, write_jsonl

from liandan.config import SFTConfig
from liandan.errors import LiandanError
from liandan.merge import merge
from liandan.train import train_sft

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def lora_run(root, model_dir):
    """A two-step LoRA run on ``model_dir`` (lr high enough that every lora_B is non-zero)."""
    data = write_jsonl(root / "d.jsonl", [chat_row(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(4)])
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse LIANDAN_HOME is not set yet
        mp.setenv("LIANDAN_HOME", str(root / "liandan-home"))
        train_sft(SFTConfig(model=str(model_dir), data=[str(data)], output_dir=str(root / "run"), max_steps=2, lr=1e-2,
                            mixed_precision="no", batch_tokens=256, max_length=64, warmup_ratio=0.0))  # fmt: skip
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, chat_model_dir):
    return lora_run(tmp_path_factory.mktemp("lora"), chat_model_dir)


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory, run_dir):
    out = tmp_path_factory.mktemp("merged") / "model"
    assert merge(run_dir, out) == out
    return out


def expected_weights(base_dir, run_dir) -> tuple[dict[str, torch.Tensor], int]:
    """W + (alpha / r) * B @ A for every adapted module, W elsewhere; and how many were adapted."""
    config = json.loads((run_dir / "adapter_config.json").read_text())
    assert not config["use_rslora"] and not config.get("use_dora")  # plain LoRA: the scale is alpha / r
    scale = config["lora_alpha"] / config["r"]
    assert scale == 2.0  # liandan's defaults, rank 16 and alpha 32
    base = load_file(base_dir / "model.safetensors")
    adapter = load_file(run_dir / "adapter_model.safetensors")
    expected = {name: w.clone() for name, w in base.items()}
    adapted = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        assert b.abs().sum() > 0, key  # it trained: a zero B would make any scale pass
        expected[name] = base[name] + scale * (b.double() @ a.double()).float()  # (out, r) @ (r, in)
        adapted += 1
    return expected, adapted


def test_merged_weights_are_base_plus_scaled_lora_product(chat_model_dir, run_dir, merged_dir):
    expected, adapted = expected_weights(chat_model_dir, run_dir)
    assert adapted == 14  # all seven linear layers of both blocks; not the output head
    merged = load_file(merged_dir / "model.safetensors")
    assert sorted(merged) == sorted(expected)  # same names as the base: no lora_A/B, no base_layer
    for name, weight in merged.items():
        assert weight.dtype == torch.float32, name
        torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    base = load_file(chat_model_dir / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], base[q], atol=1e-4)  # the update is large enough to see
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"])  # not adapted, untouched


def test_merged_directory_loads_with_plain_transformers(chat_model_dir, run_dir, merged_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    names = {p.name for p in merged_dir.iterdir()}
    assert not names & ADAPTER_FILES
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)  # safetensors only
    assert {p.name for p in merged_dir.parent.iterdir()} == {"model"}  # no temporary directory left beside it
    model = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert type(model) is LlamaForCausalLM  # a plain model, no PEFT wrapper
    expected, _ = expected_weights(chat_model_dir, run_dir)
    for name, param in model.state_dict().items():
        torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.chat_template == CHATML and tokenizer.eos_token == "<|im_end|>"


def test_bfloat16_merge_is_the_float32_merge_cast(tmp_path, chat_model_dir, run_dir):
    out = merge(run_dir, tmp_path / "bf16", dtype="bfloat16")
    expected, _ = expected_weights(chat_model_dir, run_dir)
    merged = load_file(out / "model.safetensors")
    for name, weight in merged.items():
        assert weight.dtype == torch.bfloat16, name
        torch.testing.assert_close(weight, expected[name].to(torch.bfloat16), rtol=1e-2, atol=1e-3, msg=name)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokens_added_by_the_run_are_merged_into_the_embeddings(tmp_path, bare_base_model_dir):
    """A base model without ChatML tokens: the run adds two and trains their embedding rows."""
    from transformers import AutoModelForCausalLM

    run = lora_run(tmp_path, bare_base_model_dir)
    out = merge(run, tmp_path / "merged")
    adapter = load_file(run / "adapter_model.safetensors")
    base = load_file(bare_base_model_dir / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    new_rows = adapter["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]  # (2, hidden)
    assert base["model.embed_tokens.weight"].shape == (400, 32)
    embed = merged["model.embed_tokens.weight"]
    assert embed.shape == (402, 32) and merged["lm_head.weight"].shape == (402, 32)
    assert torch.equal(embed[:400], base["model.embed_tokens.weight"])
    assert torch.equal(embed[400:], new_rows)
    assert torch.equal(merged["lm_head.weight"][:400], base["lm_head.weight"])
    # the untied head's rows of the new tokens are trained too (to predict <|im_end|>), and merged
    head_rows = adapter["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]  # (2, hidden)
    assert torch.equal(merged["lm_head.weight"][400:], head_rows)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 402


def test_export_of_a_base_model_run_keeps_the_added_tokens(tmp_path, bare_base_model_dir):
    """The GGUF of a LoRA run that added ChatML to a base model holds the two new tokens, their
    trained embedding and head rows, and the ChatML template."""
    import numpy as np
    from gguf import GGUFReader

    from liandan.export import export_gguf

    run = lora_run(tmp_path, bare_base_model_dir)
    merged = load_file(merge(run, tmp_path / "merged") / "model.safetensors")
    result = export_gguf(str(run), tmp_path / "run.gguf", quant="f16")
    reader = GGUFReader(result.path)
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1, 32) for t in reader.tensors
               if t.name in ("token_embd.weight", "output.weight")}  # fmt: skip
    for gguf_name, name in (("token_embd.weight", "model.embed_tokens.weight"), ("output.weight", "lm_head.weight")):
        rows = torch.from_numpy(tensors[gguf_name])
        assert rows.shape == (402, 32), gguf_name
        torch.testing.assert_close(rows[400:], merged[name][400:], rtol=1e-3, atol=1e-3, msg=gguf_name)  # f16
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in reader.fields["tokenizer.ggml.tokens"].data]
    assert tokens[400:] == ["<|im_start|>", "<|im_end|>"]
    template = reader.fields["tokenizer.chat_template"]
    assert "<|im_start|>" in bytes(template.parts[template.data[0]]).decode()


def test_a_directory_that_is_not_a_lora_run_is_refused(tmp_path, chat_model_dir, stopping_model_dir):
    out = tmp_path / "out"
    with pytest.raises(LiandanError, match="is not a LoRA run directory"):
        merge(chat_model_dir, out)  # a plain model
    with pytest.raises(LiandanError, match="is not a LoRA run directory"):
        merge(stopping_model_dir, out)  # a full fine-tuning run
    (tmp_path / "empty").mkdir()
    with pytest.raises(LiandanError, match="has no config.json"):
        merge(tmp_path / "empty", out)
    with pytest.raises(LiandanError, match="not found"):
        merge(tmp_path / "missing", out)
    assert not out.exists()


def test_a_non_empty_output_directory_is_refused_and_kept(tmp_path, run_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LiandanError, match="is not empty"):
        merge(run_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_an_existing_empty_output_directory_is_filled(tmp_path, run_dir):
    out = tmp_path / "out"
    out.mkdir()
    merge(run_dir, out)
    assert (out / "model.safetensors").is_file() and not {p.name for p in out.iterdir()} & ADAPTER_FILES


def test_a_bad_dtype_is_refused_before_anything_is_written(tmp_path, run_dir):
    with pytest.raises(LiandanError, match="--dtype int8: expected float32, bfloat16 or float16"):
        merge(run_dir, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_a_crash_while_writing_leaves_no_output(tmp_path, run_dir, monkeypatch):
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)  # after the weights are written
    parent = tmp_path / "models"
    with pytest.raises(OSError, match="disk full"):
        merge(run_dir, parent / "merged")
    assert list(parent.iterdir()) == []  # neither the target nor the staging directory
