"""GGUF export: the file llama.cpp reads, the Modelfile Ollama reads, and the verification that
stands between them and the user. The tiny chat model makes every round trip take seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CHATML, build_tokenizer

from liandan import export, gguf_writing
from liandan.chat_pieces import chat_pieces, go_text, pieces_match
from liandan.errors import LiandanError
from liandan.export import TOLERANCES, export_gguf
from liandan.modelfile import modelfile_text

CHATML_GO = (
    '{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n'
    "{{ end }}{{ end }}<|im_start|>assistant\n"
)
# SmolLM2-Instruct's template: ChatML with a default system prompt when none is given.
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HEADER_TEMPLATE = (  # Llama 3's shape: BOS, then a header and an end-of-turn token per message
    "{{ bos_token }}{% for m in messages %}{{ '<|start|>' + m['role'] + '<|end|>\n\n' + m['content'] + '<|eot|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant<|end|>\n\n' }}{% endif %}"
)
LAYERS = 2


def gguf_fields(path: Path) -> tuple[dict, dict]:
    """``({key: value}, {tensor name: tensor})`` as gguf-py reads the file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def dequantized(tensor) -> np.ndarray:
    from gguf import dequantize

    return dequantize(tensor.data, tensor.tensor_type).reshape(tuple(int(n) for n in reversed(tensor.shape)))


def source_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def f16_export(chat_model_dir, tmp_path_factory):
    return export_gguf(str(chat_model_dir), tmp_path_factory.mktemp("f16") / "tiny.gguf", quant="f16")


@pytest.fixture(scope="module")
def q8_export(chat_model_dir, tmp_path_factory):
    return export_gguf(str(chat_model_dir), tmp_path_factory.mktemp("q8") / "tiny-q8.gguf", quant="q8_0")


# ---------------------------------------------------------------------------------------------
# Round trips


def test_f16_round_trip_matches_the_source(f16_export):
    result = f16_export
    assert result.path.is_file() and result.size_bytes == result.path.stat().st_size
    assert result.quant == "f16" and result.tolerance == TOLERANCES["f16"]
    assert len(result.probes) == 3
    # f16 keeps 11 significant bits: on logits of about 0.1, differences stay near 1e-4.
    assert 0 < result.max_logit_diff < 1e-3
    assert result.greedy_match[0] == result.greedy_match[1] > 0
    assert not list(result.path.parent.glob(".tiny.gguf.*"))  # no staging directory left behind


def test_f16_file_has_llama_metadata_and_llama_cpp_tensor_names(f16_export, chat_model_dir):
    fields, tensors = gguf_fields(f16_export.path)
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == 1  # MOSTLY_F16
    assert fields["llama.block_count"] == LAYERS
    assert fields["llama.embedding_length"] == 32
    assert fields["llama.feed_forward_length"] == 64
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 8
    assert fields["llama.context_length"] == 256
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}  # the tiny model is untied
    expected |= {f"blk.{i}.{name}.weight" for i in range(LAYERS) for name in per_layer}
    assert set(tensors) == expected
    for name, tensor in tensors.items():
        want = "F32" if name.endswith("norm.weight") else "F16"
        assert tensor.tensor_type.name == want, name
    vocab = source_weights(chat_model_dir)["model.embed_tokens.weight"].shape[0]
    assert fields["llama.vocab_size"] == vocab
    assert dequantized(tensors["token_embd.weight"]).shape == (vocab, 32)


def test_file_carries_the_tokenizer_and_chat_template(f16_export, chat_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    fields, _ = gguf_fields(f16_export.path)
    assert fields["tokenizer.chat_template"] == CHATML
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert types[im_end] == 3  # CONTROL: never split, never printed
    assert {t for token, t in zip(tokens, types) if token not in tokenizer.all_special_tokens} == {1}  # NORMAL
    assert fields["tokenizer.ggml.eos_token_id"] == im_end
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert bool(fields["tokenizer.ggml.add_bos_token"]) is False  # ChatML prompts carry their own markers
    assert len(fields["tokenizer.ggml.merges"]) > 50


def test_modelfile_points_at_the_gguf_with_chatml_template_and_stop(f16_export):
    result = f16_export
    assert result.modelfile == result.path.with_suffix(".Modelfile")
    text = result.modelfile.read_text()
    lines = text.splitlines()
    assert "FROM ./tiny.gguf" in lines
    assert f'TEMPLATE """{CHATML_GO}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "SYSTEM" not in text  # this template has no default system prompt
    assert result.template_exact and not result.notes


def test_q8_0_round_trip_is_within_its_tolerance(q8_export, f16_export, chat_model_dir):
    result = q8_export
    assert result.tolerance == TOLERANCES["q8_0"]
    assert result.max_logit_diff < TOLERANCES["q8_0"]
    assert result.max_logit_diff > f16_export.max_logit_diff  # it did quantize
    fields, tensors = gguf_fields(result.path)
    assert fields["general.file_type"] == 7  # MOSTLY_Q8_0
    for name, tensor in tensors.items():
        want = "F32" if name.endswith("norm.weight") else "Q8_0"
        assert tensor.tensor_type.name == want, name
    assert result.size_bytes < f16_export.size_bytes
    # Q8_0 stores each block of 32 as int8 times one f16 scale d = max |w| / 127: the error is at
    # most half a step, plus 127 times the scale's f16 rounding (2^-11 relative, 0.06 steps).
    weight = source_weights(chat_model_dir)["model.layers.0.mlp.down_proj.weight"]
    step = np.abs(weight.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    error = np.abs(dequantized(tensors["blk.0.ffn_down.weight"]) - weight).reshape(-1, 32)
    assert (error <= step * 0.57).all()
    assert error.max() > step.min() * 0.1  # and it is really quantized, not f16


# ---------------------------------------------------------------------------------------------
# Q and K rows: llama.cpp's rotary layout


def test_q_and_k_rows_are_interleaved_per_head_as_llama_cpp_expects(f16_export, chat_model_dir):
    """llama.cpp rotates pairs (2i, 2i+1) of a head; transformers rotates (i, i + d/2). So row 2i of a
    head in the file must be row i of the source, and row 2i+1 must be row d/2 + i."""
    weights = source_weights(chat_model_dir)
    _, tensors = gguf_fields(f16_export.path)
    head_dim = 8
    for gguf_name, hf_name, heads in (("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)):
        source = weights[f"model.layers.1.self_attn.{hf_name}.weight"].astype(np.float16)
        stored = dequantized(tensors[f"blk.1.{gguf_name}.weight"]).astype(np.float16)
        for head in range(heads):
            base = head * head_dim
            for i in range(head_dim // 2):
                np.testing.assert_array_equal(stored[base + 2 * i], source[base + i])
                np.testing.assert_array_equal(stored[base + 2 * i + 1], source[base + head_dim // 2 + i])
        assert not np.array_equal(stored, source)  # the layout really differs from the source's


@pytest.fixture(scope="module")
def sharp_model_dir(chat_model_dir, tmp_path_factory):
    """The tiny model with attention that depends on position (large Q and K) and logits of a
    realistic size (a large output layer): random init gives near-uniform attention, on which a
    wrong rotary layout would hardly show."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(16.0)
            layer.self_attn.k_proj.weight.mul_(16.0)
        model.lm_head.weight.mul_(40.0)
    path = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(chat_model_dir).save_pretrained(path)
    return path


def test_a_missing_q_k_permutation_fails_verification_and_writes_nothing(sharp_model_dir, tmp_path, monkeypatch):
    good = export_gguf(str(sharp_model_dir), tmp_path / "good.gguf", quant="f16")
    assert good.max_logit_diff < TOLERANCES["f16"]
    monkeypatch.setattr(gguf_writing, "permute_for_rope", lambda weight, n_heads: weight)
    out = tmp_path / "broken.gguf"
    with pytest.raises(LiandanError, match="verification"):
        export_gguf(str(sharp_model_dir), out, quant="f16")
    assert not out.exists() and not out.with_suffix(".Modelfile").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.Modelfile", "good.gguf"]


def test_a_tokenizer_that_encodes_differently_fails_verification(chat_model_dir, tmp_path, monkeypatch):
    real = export.gguf_vocab

    def merges_reversed(*args):  # same tokens, BPE merge priorities scrambled
        vocab = real(*args)
        return {**vocab, "merges": vocab["merges"][::-1]}

    monkeypatch.setattr(export, "gguf_vocab", merges_reversed)
    with pytest.raises(LiandanError, match="GGUF tokenizer encodes probe .* differently"):
        export_gguf(str(chat_model_dir), tmp_path / "new" / "dirs" / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # the directories it made for OUT are gone too


# ---------------------------------------------------------------------------------------------
# Refusals: nothing written


def test_refuses_to_overwrite_without_force(chat_model_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(LiandanError, match="already exists.*--force"):
        export_gguf(str(chat_model_dir), out)
    assert out.read_bytes() == b"keep me"
    out.unlink()
    out.with_suffix(".Modelfile").write_text("mine\n")
    with pytest.raises(LiandanError, match="model.Modelfile' already exists"):
        export_gguf(str(chat_model_dir), out)
    assert not out.exists() and out.with_suffix(".Modelfile").read_text() == "mine\n"


def test_force_overwrites_both_files(chat_model_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    out.with_suffix(".Modelfile").write_text("old\n")
    result = export_gguf(str(chat_model_dir), out, quant="q8_0", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert out.with_suffix(".Modelfile").read_text().startswith("# Ollama Modelfile")
    assert result.size_bytes == out.stat().st_size


@pytest.mark.parametrize("quant", ["q4_0", "f32", ""])
def test_unknown_quant_writes_nothing(chat_model_dir, tmp_path, quant):
    with pytest.raises(LiandanError, match=f"--quant {quant}: expected one of f16, q8_0"):
        export_gguf(str(chat_model_dir), tmp_path / "m.gguf", quant=quant)
    assert list(tmp_path.iterdir()) == []


def test_out_must_be_a_gguf_file_name(chat_model_dir, tmp_path):
    with pytest.raises(LiandanError, match="ending in .gguf"):
        export_gguf(str(chat_model_dir), tmp_path / "model.bin")
    with pytest.raises(LiandanError, match="--format onnx: expected one of gguf"):
        export.export(str(chat_model_dir), tmp_path / "m.gguf", format="onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_family_llama_cpp_export_does_not_know_is_refused_by_name(tmp_path):
    import torch
    from transformers import OlmoConfig, OlmoForCausalLM

    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    config = OlmoConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model_dir = tmp_path / "olmo"
    OlmoForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out_dir = tmp_path / "out"
    with pytest.raises(LiandanError, match=r"model '.*olmo': field 'model_type' is 'olmo'; GGUF export supports llama, "):
        export_gguf(str(model_dir), out_dir / "o.gguf")
    assert not out_dir.exists()


# ---------------------------------------------------------------------------------------------
# The chat template as an Ollama template


def test_default_system_prompt_becomes_the_modelfile_system(tmp_path):
    tokenizer = build_tokenizer(SMOL_TEMPLATE, "<|im_end|>")
    pieces = chat_pieces(tokenizer, add_bos=False)
    assert pieces.default_system == SMOL_SYSTEM
    assert pieces.is_chatml and pieces_match(tokenizer, pieces, add_bos=False)
    text, exact, notes = modelfile_text(tokenizer, None, tmp_path / "smol.gguf", False, "smol", "f16")
    assert exact and notes == []
    assert f'TEMPLATE """{CHATML_GO}"""' in text
    assert f'SYSTEM """{SMOL_SYSTEM}"""' in text.splitlines()


def test_a_template_that_is_not_chatml_is_called_a_best_effort(tmp_path):
    tokenizer = build_tokenizer(HEADER_TEMPLATE, "<|im_end|>")
    pieces = chat_pieces(tokenizer, add_bos=False)
    assert pieces.start == "<|im_start|>"  # this tokenizer's bos_token, written by the template
    assert pieces.prefix["user"] == "<|start|>user<|end|>\n\n" and pieces.suffix["assistant"] == "<|eot|>"
    assert not pieces.is_chatml and pieces_match(tokenizer, pieces, add_bos=False)
    assert chat_pieces(tokenizer, add_bos=True).start == ""  # llama.cpp adds the BOS itself
    text, exact, notes = modelfile_text(tokenizer, None, tmp_path / "m.gguf", False, "m", "f16")
    assert exact and any("not ChatML" in n and "best effort" in n for n in notes)
    assert 'TEMPLATE """<|im_start|>{{ range .Messages }}' in text


def test_a_template_the_pieces_cannot_reproduce_is_flagged(tmp_path):
    trimming = CHATML.replace("message['content']", "message['content'] | trim")
    tokenizer = build_tokenizer(trimming, "<|im_end|>")
    text, exact, notes = modelfile_text(tokenizer, None, tmp_path / "m.gguf", False, "m", "f16")
    assert not exact
    assert "# TEMPLATE is a best effort" in text and any("best effort" in n for n in notes)


def test_template_text_that_looks_like_go_syntax_is_quoted():
    assert go_text("<|im_start|>user\n") == "<|im_start|>user\n"
    assert go_text("{{ not a field }}") == '{{ "{{ not a field }}" }}'
    assert go_text('say """hi"""') == '{{ "say \\"\\"\\"hi\\"\\"\\"" }}'


# ---------------------------------------------------------------------------------------------
# The real default model


@pytest.mark.model
def test_default_model_f16_export_keeps_greedy_output(tmp_path):
    result = export_gguf("default", tmp_path / "smollm2-f16.gguf", quant="f16")
    assert len(result.probes) == 3
    for probe in result.probes:
        assert probe.greedy_matched == probe.greedy_tokens > 0, probe
    assert result.max_logit_diff < TOLERANCES["f16"]
    text = result.modelfile.read_text()
    assert f'SYSTEM """{SMOL_SYSTEM}"""' in text.splitlines()
    assert f'TEMPLATE """{CHATML_GO}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text.splitlines()
    fields, tensors = gguf_fields(result.path)
    assert "output.weight" not in tensors  # SmolLM2 ties its output layer to the embeddings
    assert fields["llama.block_count"] == 30 and fields["llama.attention.head_count_kv"] == 3
