"""GGUF export of every family llama.cpp runs, checked by transformers' GGUF reader and, when the
llamacpp extra is installed, by llama.cpp itself (tests marked ``llamacpp``).

The tiny family models (families.py) are sharpened first: random initialisation gives near-uniform
attention and logits of about 0.1, on which a wrong rotary layout, query scale or sliding window
hardly shows and greedy picks are near ties. Larger Q/K and a larger final-norm gain give attention
that depends on position and logits of realistic size (about +-13; Gemma 2 caps its own at 5)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from families import FAMILIES, build_family_dir
from liandan import export, gguf_writing
from liandan.errors import LiandanError
from liandan.export import DEFAULT_PROBES, READER_ONLY, TOLERANCES, export_gguf
from liandan.llama_cpp_check import RuntimeProbe, SourceRun, llama_cpp_version, run_llama_cpp

ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3", "qwen3_moe": "qwen3moe"}  # fmt: skip


@pytest.fixture(autouse=True)
def llama_cpp_or_skip(request):
    if request.node.get_closest_marker("llamacpp") and llama_cpp_version() is None:
        reason = "llama-cpp-python is not installed (pip install -e '.[llamacpp]')"
        if os.environ.get("LIANDAN_REQUIRE_LLAMACPP"):  # CI installs it: a skip there would hide the checks
            pytest.fail(reason + " but LIANDAN_REQUIRE_LLAMACPP is set")
        pytest.skip(reason)


def sharpen(model) -> None:
    gemma = model.config.model_type.startswith("gemma")

    def gain(weight, factor):  # multiply a norm's effective gain (Gemma's is 1 + weight)
        weight.copy_(factor * (1 + weight) - 1 if gemma else factor * weight)

    def spread(weight):  # Q and K weights with a standard deviation of 0.8, whatever the initialisation
        weight.mul_(max(1.0, 0.8 / float(weight.std())))

    config = model.config
    qk_rows = (config.num_attention_heads + config.num_key_value_heads) * gguf_writing.head_dim(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ("q_proj" in name or "k_proj" in name) and name.endswith("weight"):
                spread(parameter)
            elif "qkv_proj" in name:
                spread(parameter[:qk_rows])  # the Q and K rows of Phi-3's fused projection
            elif "q_norm" in name or "k_norm" in name:
                gain(parameter, 3.0 if gemma else 10.0)
        # Gemma 2's initialisation already takes its logits to its cap (families.py)
        gain(model.model.norm.weight, {"gemma2": 1.0, "gemma3_text": 20.0}.get(config.model_type, 100.0))


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """family -> a sharpened tiny model directory (Mistral's sliding window removed: see the refusal test)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            raw = build_family_dir(tmp_path_factory.mktemp(f"{family}-raw"), family)
            model = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
            sharpen(model)
            if family == "mistral":
                model.config.sliding_window = None
            made[family] = tmp_path_factory.mktemp("sharp") / f"tiny-{family}"
            model.save_pretrained(made[family])
            AutoTokenizer.from_pretrained(raw).save_pretrained(made[family])
        return made[family]

    return get


@pytest.fixture(scope="module")
def exported(family_dir, tmp_path_factory):
    """(family, quant) -> its ExportResult, each export made once for the module."""
    results: dict[tuple[str, str], export.ExportResult] = {}

    def get(family: str, quant: str = "f16") -> export.ExportResult:
        if (family, quant) not in results:
            out = tmp_path_factory.mktemp(f"{family}-{quant}") / f"{family}.gguf"
            probes = None if quant == "f16" else list(DEFAULT_PROBES[:2])  # two are enough to report on, and quicker
            results[family, quant] = export_gguf(str(family_dir(family)), out, quant=quant, probes=probes)
        return results[family, quant]

    return get


def gguf_fields(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(path)
    tensors = {t.name: dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
               for t in reader.tensors}  # fmt: skip
    return {k: f.contents() for k, f in reader.fields.items()}, tensors


def source_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Every family: written, read back by transformers, run by llama.cpp


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f16_export_is_read_back_by_transformers_as_the_same_model(exported, family):
    result = exported(family)
    assert result.arch == ARCH[family]
    assert result.max_logit_diff < 0.15  # f16 rounding on logits of about +-13 (Gemma's gain of 20 magnifies it)
    assert result.greedy_match[1] == 48 and all(p.greedy_matched >= 4 for p in result.probes)
    assert sum(p.greedy_matched == p.greedy_tokens for p in result.probes) >= 2  # the rest part at near ties
    assert result.path.is_file() and result.modelfile.is_file()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensor_names_are_those_gguf_py_lists_for_the_architecture(exported, family):
    """gguf-py's table of tensors per architecture is llama.cpp's own: a name outside it is ignored
    or refused by llama.cpp."""
    from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == ARCH[family])
    known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[arch]}
    _, tensors = gguf_fields(exported(family).path)
    bases = {name.rsplit(".", 1)[0].replace("blk.0.", "blk.{bid}.").replace("blk.1.", "blk.{bid}.") for name in tensors}
    assert bases <= known, bases - known


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_greedy_output_equals_the_source_for_f16(exported, family):
    """Token for token, stop included, up to a near tie at most (see the next test); picks at every
    teacher-forced position are the source's except at near ties."""
    result = exported(family)
    runtime = result.runtime
    assert runtime is not None and runtime.tokenizer_matches
    for probe in runtime.probes:
        assert probe.exact or probe.near_tie(TOLERANCES["f16"]), probe
        assert probe.greedy_equal >= 4, probe  # a near tie this early happens, but not on every probe
    assert sum(p.exact for p in runtime.probes) >= 2
    assert runtime.top1_agreement > 0.98 and runtime.max_logit_diff < TOLERANCES["f16"] * 2
    parted = [p for p in runtime.probes if not p.exact]
    assert len([n for n in result.notes if "parts from the source's at a near tie" in n]) == len(parted)
    summary = "\n".join(result.summary())
    assert "Verified with llama.cpp runtime" in summary


def test_a_near_tie_is_a_flip_that_rounding_explains():
    def probe(**changes):
        fields = {"prompt": "p", "greedy_tokens": 16, "greedy_equal": 16, "exact": True, "top1_agree": 40, "positions": 40,
                  "max_logit_diff": 0.05, "tokens_match": True, "flip_diff": 0.0}  # fmt: skip
        return RuntimeProbe(**{**fields, **changes})

    assert probe().near_tie(0.25)
    assert probe(top1_agree=39, flip_diff=0.02).near_tie(0.25)  # a teacher-forced flip, logits within 0.02
    assert not probe(top1_agree=39, flip_diff=0.3).near_tie(0.25)  # the file computes something else there
    parted = {"exact": False, "greedy_equal": 4, "parting_margin": 0.007, "parting_diff": 0.02}
    assert probe(**parted).near_tie(0.25)
    assert not probe(**{**parted, "parting_margin": 0.05}).near_tie(0.25)  # rounding of 0.02 cannot close a gap of 0.05
    assert not probe(**{**parted, "parting_diff": 0.3, "parting_margin": 0.1}).near_tie(0.25)
    assert not probe(exact=False, greedy_equal=3, parting_margin=float("inf"), parting_diff=0.0).near_tie(0.25)


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_q8_0_reports_llama_cpp_agreement(exported, family):
    result = exported(family, "q8_0")
    runtime = result.runtime
    assert runtime is not None and len(runtime.probes) == 2
    assert 0.8 < runtime.top1_agreement <= 1.0 and 0 < runtime.max_logit_diff < 5.0  # Gemma's gain of 20 magnifies Q8_0's error
    equal, total = runtime.greedy_equal
    assert total == result.greedy_match[1] and 0 <= equal <= total
    assert runtime.exact or any("q8_0 changes this model's greedy output in llama.cpp" in n for n in result.notes)
    assert "top-1 agreement" in "\n".join(result.summary())


def test_without_llama_cpp_the_summary_says_which_verifier_ran(family_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "llama_cpp_version", lambda: None)
    result = export_gguf(str(family_dir("qwen3")), tmp_path / "q.gguf")
    assert result.runtime is None
    assert f"Verified with {READER_ONLY}" in result.summary()


# ---------------------------------------------------------------------------------------------
# What each family's transforms write, number by number


def test_gemma2_norms_get_plus_one_and_the_query_scale_is_folded_into_q(exported, family_dir):
    fields, tensors = gguf_fields(exported("gemma2").path)
    weights = source_weights(family_dir("gemma2"))
    for hf, gguf in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
                     ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm")):  # fmt: skip
        np.testing.assert_array_equal(tensors[f"blk.1.{gguf}.weight"], weights[f"model.layers.1.{hf}.weight"] + 1)
    np.testing.assert_array_equal(tensors["output_norm.weight"], weights["model.norm.weight"] + 1)
    # query_pre_attn_scalar 24, head_dim 16: the model scales by 24^-1/2, llama.cpp by 16^-1/2
    q = weights["model.layers.0.self_attn.q_proj.weight"] * np.sqrt(16 / 24)
    np.testing.assert_allclose(tensors["blk.0.attn_q.weight"], q, rtol=1e-3, atol=1e-6)
    assert "output.weight" not in tensors  # tied: llama.cpp's gemma2 reads the embeddings
    config = json.loads((family_dir("gemma2") / "config.json").read_text())
    assert fields["gemma2.attn_logit_softcapping"] == pytest.approx(config["attn_logit_softcapping"])
    assert fields["gemma2.final_logit_softcapping"] == pytest.approx(config["final_logit_softcapping"])
    assert fields["gemma2.attention.sliding_window"] == 8
    assert "gemma2.attention.sliding_window_pattern" not in fields  # [sliding, full] is llama.cpp's default


def test_gemma3_writes_its_layer_pattern_two_rope_bases_and_folds_the_scale_into_the_q_norm(exported, family_dir):
    fields, tensors = gguf_fields(exported("gemma3_text").path)
    weights = source_weights(family_dir("gemma3_text"))
    assert [bool(x) for x in fields["gemma3.attention.sliding_window_pattern"]] == [True, False]
    assert fields["gemma3.attention.sliding_window"] == 8
    assert fields["gemma3.rope.freq_base"] == pytest.approx(1e6)
    assert fields["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
    assert "gemma3.attn_logit_softcapping" not in fields and "gemma3.final_logit_softcapping" not in fields
    q_norm = (weights["model.layers.0.self_attn.q_norm.weight"] + 1) * np.sqrt(16 / 24)
    np.testing.assert_allclose(tensors["blk.0.attn_q_norm.weight"], q_norm, rtol=1e-6)
    np.testing.assert_array_equal(tensors["blk.0.attn_k_norm.weight"], weights["model.layers.0.self_attn.k_norm.weight"] + 1)


def test_qwen3_moe_experts_are_split_into_gate_and_up(exported, family_dir):
    fields, tensors = gguf_fields(exported("qwen3_moe").path)
    weights = source_weights(family_dir("qwen3_moe"))
    # transformers computes with fused (4, 2 x 32, 64) experts but saves them one by one, as llama.cpp wants them
    for name, gguf in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        experts = np.stack([weights[f"model.layers.1.mlp.experts.{e}.{name}.weight"] for e in range(4)])
        np.testing.assert_array_equal(tensors[f"blk.1.{gguf}.weight"], experts.astype(np.float16))
    assert tensors["blk.1.ffn_gate_inp.weight"].shape == (4, 64)
    assert (fields["qwen3moe.expert_count"], fields["qwen3moe.expert_used_count"]) == (4, 2)
    assert fields["qwen3moe.expert_feed_forward_length"] == 32


def test_neox_families_keep_q_and_k_rows_as_they_are(exported, family_dir):
    """Only llama's "normal" rope wants the rows interleaved; qwen, phi3 and gemma rotate halves as transformers does."""
    _, tensors = gguf_fields(exported("qwen2").path)
    weights = source_weights(family_dir("qwen2"))
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], weights["model.layers.0.self_attn.k_proj.weight"].astype(np.float16))
    np.testing.assert_array_equal(tensors["blk.0.attn_k.bias"], weights["model.layers.0.self_attn.k_proj.bias"])
    _, tensors = gguf_fields(exported("phi3").path)
    weights = source_weights(family_dir("phi3"))
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"], weights["model.layers.0.self_attn.qkv_proj.weight"].astype(np.float16))
    np.testing.assert_array_equal(tensors["blk.0.ffn_up.weight"], weights["model.layers.0.mlp.gate_up_proj.weight"].astype(np.float16))


# ---------------------------------------------------------------------------------------------
# A transform dropped: the export is refused, nothing written


def test_a_dropped_gemma_norm_offset_is_refused(family_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(gguf_writing.FAMILIES, "gemma3_text", dataclasses.replace(gguf_writing.FAMILIES["gemma3_text"], norm_offset=0.0))
    with pytest.raises(LiandanError, match="export failed verification: logits differ"):
        export_gguf(str(family_dir("gemma3_text")), tmp_path / "g.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_query_scale_fold_is_refused(family_dir, tmp_path, monkeypatch):
    """Gemma 3 (Gemma 2's attention soft-cap at 1 hides the scale in this tiny model)."""
    monkeypatch.setitem(gguf_writing.FAMILIES, "gemma3_text",
                        dataclasses.replace(gguf_writing.FAMILIES["gemma3_text"], query_scale_into=None))  # fmt: skip
    with pytest.raises(LiandanError, match="export failed verification"):
        export_gguf(str(family_dir("gemma3_text")), tmp_path / "g.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_dropped_q_k_permutation_is_refused_for_mistral(family_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_writing, "permute_for_rope", lambda weight, n_heads: weight)
    with pytest.raises(LiandanError, match="export failed verification"):
        export_gguf(str(family_dir("mistral")), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llamacpp
def test_llama_cpp_on_its_own_refuses_a_dropped_gemma_norm_offset(family_dir, tmp_path, monkeypatch):
    """With transformers' reader taken out of the way, llama.cpp's greedy check alone refuses the file."""
    monkeypatch.setitem(gguf_writing.FAMILIES, "gemma2", dataclasses.replace(gguf_writing.FAMILIES["gemma2"], norm_offset=0.0))
    monkeypatch.setattr(export, "verify_gguf", lambda *args: [export.ProbeCheck("p", 0.0, 1, 1)])
    with pytest.raises(LiandanError, match="export failed verification in llama.cpp: its greedy output differs"):
        export_gguf(str(family_dir("gemma2")), tmp_path / "g.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llamacpp
def test_a_file_llama_cpp_cannot_load_is_refused_with_llama_cpps_reason(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "bad.gguf"), arch="llama")  # no context length, one tensor
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run = SourceRun(prompt="p", text="x", ids=[1, 2], continuation=[3], logits=np.zeros((3, 4), np.float32),
                    add_special_tokens=False)  # fmt: skip
    with pytest.raises(LiandanError, match=r"llama.cpp cannot load the written GGUF \(.*key not found in model: llama.context_length"):
        run_llama_cpp(tmp_path / "bad.gguf", [run], {3}, 4)


# ---------------------------------------------------------------------------------------------
# What llama.cpp cannot run is refused by name


def test_a_sliding_window_llama_cpp_would_ignore_is_refused(tmp_path):
    model_dir = build_family_dir(tmp_path / "mistral-window", "mistral")  # sliding_window 8, context 512
    with pytest.raises(LiandanError, match=r"field 'sliding_window' is 8; llama.cpp's 'llama' architecture has no sliding window"):
        export_gguf(str(model_dir), tmp_path / "out" / "m.gguf")
    assert not (tmp_path / "out").exists()


def test_an_untied_gemma2_is_refused(family_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(family_dir("gemma2"), dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.save_pretrained(tmp_path / "untied")
    AutoTokenizer.from_pretrained(family_dir("gemma2")).save_pretrained(tmp_path / "untied")
    with pytest.raises(LiandanError, match="field 'tie_word_embeddings' is false; llama.cpp's 'gemma2'"):
        export_gguf(str(tmp_path / "untied"), tmp_path / "g.gguf")


# ---------------------------------------------------------------------------------------------
# The real default model in llama.cpp


@pytest.mark.model
@pytest.mark.llamacpp
def test_default_model_runs_in_llama_cpp_with_the_sources_greedy_output(tmp_path):
    f16 = export_gguf("default", tmp_path / "smollm2-f16.gguf", quant="f16")
    assert f16.runtime.exact and f16.runtime.tokenizer_matches
    q8 = export_gguf("default", tmp_path / "smollm2-q8_0.gguf", quant="q8_0")
    assert q8.runtime.top1_agreement > 0.9
    assert q8.runtime.exact or any("q8_0 changes" in note for note in q8.notes)
