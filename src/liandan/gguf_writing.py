"""Writing a model as a llama.cpp GGUF: one small table per model family, the checks that refuse
what llama.cpp would compute differently, and llama.cpp's own reading rules for the verification.

    from liandan.gguf_writing import family_of, write_gguf
    family = family_of(model, "my-model")    # LiandanError when llama.cpp cannot run the model as it is
    notes = write_gguf(model, tokenizer, vocab, family, Path("model.gguf"), "q8_0")

Every family maps onto the llama.cpp architecture its own converter (``convert_hf_to_gguf.py``)
uses, with the same metadata keys, tensor names and value transforms:

- ``llama`` and ``mistral`` -> ``llama``: Q and K rows interleaved per head (llama.cpp rotates
  neighbouring pairs; transformers rotates the two halves of a head). No sliding window exists
  there, so a Mistral model whose window is shorter than its context is refused.
- ``qwen2`` (q/k/v biases), ``qwen3`` (q/k norms), ``qwen3_moe`` (experts as 3-D tensors, the
  fused gate/up split in two), ``phi3`` (fused qkv and gate/up kept fused): NEOX rotary, no permutation.
- ``gemma2``, ``gemma3_text``: norms stored as ``1 + w`` (Gemma computes ``x * (1 + w)``); soft-caps
  and the per-layer sliding window in the metadata. llama.cpp scales queries by 1/sqrt(head_dim)
  whatever ``query_pre_attn_scalar`` says, so the model's own scale is folded into the weights
  (Q for Gemma 2, the q norm for Gemma 3): exact, because rotary embedding is linear.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, Keys, LlamaFileType, quants

from .errors import LiandanError
from .gguf_tokenizer import add_tokenizer

QK_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values

ATTENTION = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output"}  # fmt: skip
QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GEMMA_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}  # fmt: skip
# Phi-3 keeps its fused projections: llama.cpp's phi3 graph reads [q; k; v] and [gate; up] as they are.
PHI3 = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down"}  # fmt: skip
# transformers 5 stores the experts as (E, 2 * I, H) gate-then-up and (E, H, I); llama.cpp wants gate
# and up apart. A tuple means: split the tensor into equal halves along its rows.
MOE = {"mlp.gate": "ffn_gate_inp", "mlp.experts.gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"),
       "mlp.experts.down_proj": "ffn_down_exps"}  # fmt: skip
TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` becomes one llama.cpp architecture."""

    arch: str
    """llama.cpp's architecture (``general.architecture``)."""
    layer: dict
    """Module inside a decoder layer -> llama.cpp tensor name inside ``blk.N``."""
    activation: str
    """The feed-forward activation llama.cpp computes for ``arch``, in transformers' spelling."""
    permute_qk: bool = False
    """llama.cpp's "normal" rotary layout (pairs 2i, 2i+1): Q and K rows are interleaved per head."""
    norm_offset: float = 0.0
    """Added to every RMSNorm weight: Gemma computes ``x * (1 + w)``, llama.cpp ``x * w``."""
    sliding: bool = False
    """Whether llama.cpp's ``arch`` has sliding-window layers; without, a model with a window is refused."""
    swa_period: int = 0
    """llama.cpp's sliding pattern when the file gives none: every ``swa_period``-th layer is full."""
    query_scale_into: str | None = None
    """Where the query scale llama.cpp cannot be told is folded in (a tensor name inside ``blk.N``)."""
    separate_output: bool = True
    """Whether ``arch`` can hold an output matrix apart from the embeddings (an untied model)."""
    metadata: Callable[[Any, Any, Family], None] | None = None
    """Writes the family's own metadata keys: ``(writer, config, family)``."""


def gemma_metadata(writer: Any, config: Any, family: Family) -> None:
    if family.arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    sliding = [kind == "sliding_attention" for kind in layer_types(config)]
    if any(sliding):
        writer.add_sliding_window(config.sliding_window)
        if family.arch == "gemma3":
            writer.add_rope_freq_base_swa(rope_theta(config, "sliding_attention"))
    # A per-layer list only where llama.cpp's default period would be wrong (its converter writes
    # none). gemma3 without a window has no sliding layers whatever the list; gemma2 always has some.
    if sliding != default_swa_layers(family, len(sliding)) and (any(sliding) or family.arch == "gemma2"):
        writer.add_sliding_window_pattern(sliding)


def moe_metadata(writer: Any, config: Any, family: Family) -> None:
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)


LLAMA = Family("llama", {**NORMS, **ATTENTION, **MLP}, "silu", permute_qk=True)
# fmt: off
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": LLAMA,  # llama.cpp's converter writes Mistral as a llama model
    "qwen2": Family("qwen2", {**NORMS, **ATTENTION, **MLP}, "silu"),
    "qwen3": Family("qwen3", {**NORMS, **ATTENTION, **QK_NORMS, **MLP}, "silu"),
    "qwen3_moe": Family("qwen3moe", {**NORMS, **ATTENTION, **QK_NORMS, **MOE}, "silu", metadata=moe_metadata),
    "phi3": Family("phi3", {**NORMS, **PHI3}, "silu"),
    "gemma2": Family("gemma2", {**GEMMA_NORMS, **ATTENTION, **MLP}, "gelu_pytorch_tanh", norm_offset=1.0,
                     sliding=True, swa_period=2, query_scale_into="attn_q.weight", separate_output=False,
                     metadata=gemma_metadata),
    "gemma3_text": Family("gemma3", {**GEMMA_NORMS, **ATTENTION, **QK_NORMS, **MLP}, "gelu_pytorch_tanh",
                          norm_offset=1.0, sliding=True, swa_period=6, query_scale_into="attn_q_norm.weight",
                          metadata=gemma_metadata),
}
# fmt: on
"""transformers ``model_type`` -> how llama.cpp runs it."""
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp scales queries differently for these sizes


# ---------------------------------------------------------------------------------------------
# Config values, read the same way for writing and checking


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_types(config: Any) -> list[str]:
    return list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)


def rope_settings(config: Any) -> dict[str, dict]:
    """``{layer type: rope parameters}``; one entry per layer type in use (Gemma 3 has two)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        return {kind: rope[kind] for kind in set(layer_types(config))}
    return {kind: rope for kind in set(layer_types(config))}


def rope_theta(config: Any, kind: str = "full_attention") -> float:
    rope = rope_settings(config).get(kind) or next(iter(rope_settings(config).values()))
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def default_swa_layers(family: Family, n_layers: int) -> list[bool]:
    """llama.cpp's sliding layers when the file gives no pattern (``set_swa_pattern``)."""
    return [family.swa_period > 0 and i % family.swa_period < family.swa_period - 1 for i in range(n_layers)]


def llama_cpp_query_scale(config: Any, family: Family) -> float:
    """The factor llama.cpp multiplies queries by: 1/sqrt(head_dim), but 1/sqrt(hidden / heads) for
    Gemma's 27B sizes, which it recognises by their layer count."""
    if GEMMA_27B_LAYERS.get(family.arch) == config.num_hidden_layers:
        return (config.hidden_size / config.num_attention_heads) ** -0.5
    return head_dim(config) ** -0.5


def model_query_scale(config: Any) -> float:
    scalar = getattr(config, "query_pre_attn_scalar", None)
    return (scalar if scalar is not None else head_dim(config)) ** -0.5


# ---------------------------------------------------------------------------------------------
# Checks: refuse what llama.cpp would compute differently


def family_of(model: Any, spec: str) -> Family:
    """The family table for ``model``; raises `LiandanError` naming the field llama.cpp cannot follow."""
    config = model.config
    model_type = config.model_type
    if model_type not in FAMILIES:
        raise LiandanError(f"model '{spec}': field 'model_type' is '{model_type}'; GGUF export supports "
                           f"{', '.join(FAMILIES)}")  # fmt: skip
    family = FAMILIES[model_type]

    def refuse(field: str, value: Any, why: str) -> LiandanError:
        return LiandanError(f"model '{spec}': field '{field}' is {value!r}; {why}")

    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if activation != family.activation:
        raise refuse("hidden_act", activation, f"llama.cpp's '{family.arch}' computes '{family.activation}'")
    for rope in rope_settings(config).values():
        if rope.get("rope_type", "default") != "default":
            raise refuse("rope_parameters.rope_type", rope.get("rope_type"),
                         "GGUF export supports plain rotary embeddings (rope_type 'default') only")  # fmt: skip
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise refuse("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"],
                         "GGUF export supports rotary embeddings over the whole head only")  # fmt: skip
    check_sliding_window(config, family, refuse)
    if family.arch == "gemma2":
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, field) is None:  # llama.cpp's gemma2 always caps (at 50 and 30 by default)
                raise refuse(field, None, "llama.cpp's gemma2 always soft-caps; it cannot run a Gemma 2 without")
    if family.arch == "gemma3":
        if config.attn_logit_softcapping is not None:
            raise refuse("attn_logit_softcapping", config.attn_logit_softcapping, "llama.cpp's gemma3 has no attention soft-cap")
        if getattr(config, "use_bidirectional_attention", False):
            raise refuse("use_bidirectional_attention", True, "llama.cpp's gemma3 attends causally only")
    if family.arch == "qwen3moe" and not config.norm_topk_prob:
        raise refuse("norm_topk_prob", False, "llama.cpp's qwen3moe always renormalises the chosen experts' weights")
    return family


def check_sliding_window(config: Any, family: Family, refuse: Callable[..., LiandanError]) -> None:
    kinds = set(layer_types(config))
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise refuse("layer_types", sorted(kinds), "GGUF export knows full and sliding attention layers only")
    if family.sliding:
        return
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if "sliding_attention" in kinds or (window is not None and window < config.max_position_embeddings):
        raise refuse("sliding_window", window,
                     f"llama.cpp's '{family.arch}' architecture has no sliding window and would attend to the "
                     f"whole context ({config.max_position_embeddings} tokens), computing differently past "
                     f"{window} tokens; GGUF export refuses rather than write a different model")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Tensors under llama.cpp's names


def permute_for_rope(weight: Any, n_heads: int) -> Any:
    """Reorder the rows of a Q or K projection (or bias) from transformers' rotary layout to llama.cpp's.

    transformers rotates dimension i of a head with dimension i + d/2 ("rotate half"); llama.cpp's
    "normal" rope rotates neighbouring pairs (2i, 2i + 1). So new row 2i = old row i, new row
    2i + 1 = old row d/2 + i, within each head. transformers' GGUF loader undoes exactly this.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def place(name: str, array: Any, family: Family, spec: str) -> list[tuple[str, Any]]:
    """``(llama.cpp name, array)`` for one transformers parameter, before any value transform."""
    if name in TOP_LEVEL:
        if name == "lm_head.weight" and not family.separate_output:
            raise LiandanError(f"model '{spec}': field 'tie_word_embeddings' is false; llama.cpp's '{family.arch}' "
                               "uses the embeddings as its output layer and cannot hold a separate one")  # fmt: skip
        return [(TOP_LEVEL[name], array)]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?", name)
    where = family.layer.get(match[2]) if match else None
    if where is None:
        raise LiandanError(f"model '{spec}': parameter '{name}' has no place in llama.cpp's '{family.arch}' "
                           "architecture; GGUF export refuses rather than drop it")  # fmt: skip
    block, suffix = match[1], match[3] or "weight"
    if isinstance(where, tuple):  # fused along the rows: split into equal halves
        halves = np.split(array, len(where), axis=-2)
        return [(f"blk.{block}.{part}.{suffix}", half) for part, half in zip(where, halves)]
    return [(f"blk.{block}.{where}.{suffix}", array)]


def gguf_tensors(model: Any, family: Family, spec: str) -> list[tuple[str, Any]]:
    """``(llama.cpp name, fp32 numpy array)`` for every weight the model computes with, transformed
    so that llama.cpp's graph for ``family.arch`` computes what the model computes."""
    config = model.config
    query_scale = model_query_scale(config) / llama_cpp_query_scale(config, family)
    tensors = []
    for name, parameter in model.named_parameters():  # a tied weight is listed once
        for gguf_name, array in place(name, parameter.detach().float().cpu().numpy(), family, spec):
            if gguf_name.endswith("norm.weight"):
                array = array + family.norm_offset
            if family.permute_qk and re.search(r"\.attn_q\.", gguf_name):
                array = permute_for_rope(array, config.num_attention_heads)
            if family.permute_qk and re.search(r"\.attn_k\.", gguf_name):
                array = permute_for_rope(array, config.num_key_value_heads)
            if family.query_scale_into and gguf_name.endswith("." + family.query_scale_into):
                array = array * query_scale
            tensors.append((gguf_name, np.ascontiguousarray(array, dtype=np.float32)))
    return tensors


def encode_tensor(array: Any, quant: str) -> tuple[Any, Any]:
    """``(data, ggml type)``: vectors (norms, biases) stay f32, as llama.cpp keeps them; matrices become
    f16 or Q8_0, and Q8_0 falls back to f16 for rows that are not a whole number of blocks."""
    if array.ndim == 1:
        return array.astype(np.float32), GGMLQuantizationType.F32
    if quant == "q8_0" and array.shape[-1] % QK_BLOCK == 0:
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), GGMLQuantizationType.F16


# ---------------------------------------------------------------------------------------------
# The file


def write_metadata(writer: Any, config: Any, family: Family, n_vocab: int) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))  # transformers reads this back as head_dim for llama
    writer.add_rope_freq_base(rope_theta(config, "full_attention"))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    if family.metadata:
        family.metadata(writer, config, family)


def write_gguf(model: Any, tokenizer: Any, vocab: dict, family: Family, path: Path, quant: str, spec: str) -> list[str]:
    """Write the GGUF file; returns notes for the result (tensors that could not be quantized)."""
    # No general.name: readers act on it. llama.cpp gives the special tokens of a file whose name
    # contains "phi3" Phi-3's whitespace stripping (and fails without a "</s>" token); transformers
    # reads a llama file named "mistral" as a Mistral one, which it then cannot load.
    writer = GGUFWriter(str(path), arch=family.arch)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    write_metadata(writer, model.config, family, len(vocab["tokens"]))
    add_tokenizer(writer, tokenizer, vocab)
    fallback = []
    for name, array in gguf_tensors(model, family, spec):
        data, ggml_type = encode_tensor(array, quant)
        if quant == "q8_0" and array.ndim >= 2 and ggml_type != GGMLQuantizationType.Q8_0:
            fallback.append(name)
        writer.add_tensor(name, data, raw_dtype=ggml_type if ggml_type == GGMLQuantizationType.Q8_0 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if fallback:
        names = ", ".join(fallback[:3]) + (", ..." if len(fallback) > 3 else "")
        return [f"{len(fallback)} matrices kept in f16, their rows not being a multiple of {QK_BLOCK}: {names}"]
    return []


# ---------------------------------------------------------------------------------------------
# Reading back as llama.cpp reads: what transformers' GGUF loader leaves out


def llama_cpp_settings(fields: dict, family: Family) -> dict:
    """transformers config fields for the model llama.cpp runs from a file with these metadata
    ``fields`` (``{key: value}``), for the ones transformers' GGUF loader does not read (it would
    take its own defaults). The values follow llama.cpp's loader: its defaults, its query scale."""
    arch = family.arch

    def key(template: str, default: Any = None) -> Any:
        return fields.get(template.format(arch=arch), default)

    dim = key(Keys.Attention.KEY_LENGTH)
    settings: dict[str, Any] = {"head_dim": dim} if dim else {}
    if arch == "qwen3moe":
        settings.update(moe_intermediate_size=key(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH), norm_topk_prob=True)
    if arch not in GEMMA_27B_LAYERS:
        return settings
    n_layers, hidden, heads = key(Keys.LLM.BLOCK_COUNT), key(Keys.LLM.EMBEDDING_LENGTH), key(Keys.Attention.HEAD_COUNT)
    scalar = hidden // heads if GEMMA_27B_LAYERS[arch] == n_layers else dim  # llama.cpp's query scale is 1/sqrt(this)
    pattern = key(Keys.Attention.SLIDING_WINDOW_PATTERN)
    sliding = [bool(x) for x in pattern] if pattern is not None else default_swa_layers(family, n_layers)
    if arch == "gemma3" and not key(Keys.Attention.SLIDING_WINDOW):
        sliding = [False] * n_layers  # gemma3 without a window: all layers full
    settings.update(
        query_pre_attn_scalar=scalar,
        sliding_window=key(Keys.Attention.SLIDING_WINDOW, 4096),
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        final_logit_softcapping=key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0 if arch == "gemma2" else None) or None,
    )  # fmt: skip
    if arch == "gemma2":
        settings["attn_logit_softcapping"] = key(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, 50.0)
    else:
        base = key(Keys.Rope.FREQ_BASE, 10000.0)
        settings["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": base},
            "sliding_attention": {"rope_type": "default", "rope_theta": key(Keys.Rope.FREQ_BASE_SWA, 10000.0)},
        }
    return settings
