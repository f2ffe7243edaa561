"""Export a Llama-architecture model to GGUF for llama.cpp and Ollama, verified before it is kept.

    from pathlib import Path
    from liandan.export import export_gguf
    result = export_gguf("default", Path("exports/smollm2-f16.gguf"), quant="f16")
    print("\\n".join(result.summary()))
    # then: ollama create smollm2 -f exports/smollm2-f16.Modelfile

What is written:

- ``OUT`` (a ``.gguf`` file): llama.cpp's ``llama`` architecture metadata, tensors under llama.cpp's
  names (Q and K rows permuted for its rotary layout, as its own converter does), norms in f32 and
  matrices in f16 or Q8_0, and the byte-level BPE tokenizer with its chat template.
- ``OUT`` with the suffix ``.Modelfile``: an Ollama Modelfile (``FROM``, a ``TEMPLATE`` in Go template
  syntax derived from the chat template, ``SYSTEM`` when the template has a default system prompt,
  and ``PARAMETER stop`` for each stop token).

Every export is verified before it replaces anything: the written file is loaded back with
transformers' GGUF loader and compared with the source model on probe prompts rendered with the
chat template (tokens, chat template, logits, greedy continuation). A file that fails is deleted.
The model may be anything `liandan.models.load_model` accepts; a LoRA run is merged in fp32.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType, quants

from .chat import has_chat_template, render_chat, stop_token_ids
from .errors import LiandanError
from .files import write_atomic
from .gguf_tokenizer import add_tokenizer, gguf_vocab
from .modelfile import modelfile_text
from .models import load_model, release_model

FORMATS = ("gguf",)
QUANTS = ("f16", "q8_0")

# Largest max |logit difference| accepted between the source (fp32) and the GGUF read back, taken
# over every position of each probe and its greedy continuation and over the whole vocabulary.
# Measured on the default model (SmolLM2-135M-Instruct, the 3 default probes, logits spanning
# 30-60 per position): f16 weights moved logits by at most 0.041, Q8_0 by at most 1.32 (0.3-1.3
# at every position: the max over 49k logits of an error spread through 30 layers). Greedy output
# matched in full for both. The tolerances leave about 6x (f16) and 2.3x (Q8_0) room for other
# models and prompts, and stay far below what real mistakes do to the same model: without the
# Q/K permutation the difference is 32-40, with rope theta 10000 instead of 100000 it is 10.
# (llama.cpp itself computes with its own kernels, e.g. Q8_0 activations, so its numbers differ a
# little more; this checks the file.)
TOLERANCES = {"f16": 0.25, "q8_0": 3.0}
GREEDY_TOKENS = 16
DEFAULT_PROBES = (
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Translate to French: 'The weather is nice today (23 °C)!'",
)
QK_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values


@dataclass
class ProbeCheck:
    """How the exported model compares with the source on one probe prompt."""

    prompt: str
    """The user message (rendered with the chat template before tokenizing)."""
    max_logit_diff: float
    """Largest absolute logit difference over the prompt and the source's greedy continuation."""
    greedy_tokens: int
    """Length of the source's greedy continuation (at most 16 tokens, fewer if it stopped)."""
    greedy_matched: int
    """Leading tokens of that continuation the exported model also picks greedily."""


@dataclass
class ExportResult:
    """What `export_gguf` wrote and how well it matched the source, for the CLI to print."""

    path: Path
    quant: str
    size_bytes: int
    tolerance: float
    """The largest logit difference that was accepted."""
    probes: list[ProbeCheck]
    modelfile: Path
    template_exact: bool
    """Whether the Modelfile TEMPLATE rendered every checked conversation exactly as the chat template."""
    notes: list[str] = field(default_factory=list)

    @property
    def max_logit_diff(self) -> float:
        return max(p.max_logit_diff for p in self.probes)

    @property
    def greedy_match(self) -> tuple[int, int]:
        return sum(p.greedy_matched for p in self.probes), sum(p.greedy_tokens for p in self.probes)

    def summary(self) -> list[str]:
        matched, total = self.greedy_match
        lines = [
            f"Wrote {self.path} ({self.quant}, {self.size_bytes / 1e6:.1f} MB) and {self.modelfile}",
            f"Verified on {len(self.probes)} probes: max logit difference {self.max_logit_diff:.4f} "
            f"(tolerance {self.tolerance}), greedy tokens matched {matched}/{total}"
            + (" (where they part, the logits are within tolerance: a near tie)" if matched < total else ""),
        ]
        lines += [f"  {p.max_logit_diff:.4f}  {p.greedy_matched}/{p.greedy_tokens}  {p.prompt}" for p in self.probes]
        lines += [f"Note: {note}" for note in self.notes]
        lines.append(f"Use it with Ollama: ollama create {self.path.stem} -f {self.modelfile}")
        return lines


def export(spec: str, out: str | Path, *, format: str = "gguf", **options: Any) -> ExportResult:
    """`export_gguf` after checking ``format`` (the CLI's ``--format``); GGUF is the only one."""
    if format not in FORMATS:
        raise LiandanError(f"--format {format}: expected one of {', '.join(FORMATS)}")
    return export_gguf(spec, Path(out), **options)


def export_gguf(
    spec: str,
    out: Path,
    *,
    quant: str = "f16",
    force: bool = False,
    probes: list[str] | None = None,
    tolerance: float | None = None,
) -> ExportResult:
    """Write ``out`` (GGUF) and its Ollama Modelfile, verified against the source model.

    ``tolerance`` overrides the default largest logit difference for ``quant`` (`TOLERANCES`).
    Raises `LiandanError` for bad input or a failed verification; then nothing is written.
    """
    out = Path(out)
    quant = check_quant(quant)
    probes = list(DEFAULT_PROBES if probes is None else probes)
    if not probes or not all(isinstance(p, str) and p.strip() for p in probes):
        raise LiandanError("probes: expected a non-empty list of non-empty prompt strings")
    tolerance = TOLERANCES[quant] if tolerance is None else float(tolerance)
    modelfile = check_outputs(out, force)
    model, tokenizer = load_model(spec, device="cpu", dtype="float32")
    made = missing_dirs(out)
    try:
        check_llama(model, spec)
        vocab = gguf_vocab(tokenizer, model.get_input_embeddings().num_embeddings, spec)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Staged in a private directory beside OUT, so the rename is atomic and transformers reads
        # back only this file (no stray tokenizer_config.json from OUT's directory).
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            staged = Path(tmp) / out.name
            notes = write_gguf(model, tokenizer, vocab, staged, quant)
            checks = verify_gguf(model, tokenizer, staged, tolerance, probes)
            text, exact, template_notes = modelfile_text(
                tokenizer, model.generation_config, out, vocab["add_bos"], spec, quant
            )
            os.replace(staged, out)
        write_atomic(modelfile, text)
    except BaseException:
        for directory in made:  # deepest first; only the ones this export created
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    finally:
        release_model(model)
    return ExportResult(
        path=out, quant=quant, size_bytes=out.stat().st_size, tolerance=tolerance, probes=checks,
        modelfile=modelfile, template_exact=exact, notes=notes + template_notes,
    )  # fmt: skip


def missing_dirs(out: Path) -> list[Path]:
    """The directories above ``out`` that do not exist yet, deepest first."""
    missing = []
    for directory in [out.parent, *out.parent.parents]:
        if directory.exists():
            break
        missing.append(directory)
    return missing


def check_quant(quant: str) -> str:
    name = str(quant).lower()
    if name not in QUANTS:
        raise LiandanError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    return name


def check_outputs(out: Path, force: bool) -> Path:
    """The Modelfile path for ``out``, once sure neither file would be overwritten unasked."""
    if out.suffix.lower() != ".gguf":
        raise LiandanError(f"OUT '{out}': expected a file name ending in .gguf")
    if out.is_dir():
        raise LiandanError(f"OUT '{out}' is a directory; give a file name ending in .gguf")
    modelfile = out.with_suffix(".Modelfile")
    for path in (out, modelfile):
        if path.exists() and not force:
            raise LiandanError(f"'{path}' already exists; pass --force to overwrite it")
    return modelfile


# ---------------------------------------------------------------------------------------------
# Model: Llama only, tensors under llama.cpp's names


def check_llama(model: Any, spec: str) -> None:
    """Refuse what llama.cpp's ``llama`` architecture (or transformers reading it back) would get wrong."""
    config = model.config
    if config.model_type != "llama":
        raise LiandanError(f"model '{spec}': field 'model_type' is '{config.model_type}'; GGUF export supports "
                           "Llama-architecture models (model_type 'llama') only")  # fmt: skip
    for name in ("attention_bias", "mlp_bias"):
        if getattr(config, name, False):
            raise LiandanError(f"model '{spec}': field '{name}' is true; GGUF export supports Llama models "
                               "without biases")  # fmt: skip
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise LiandanError(f"model '{spec}': field 'rope_parameters.rope_type' is '{rope_type}'; GGUF export "
                           "supports plain rotary embeddings (rope_type 'default') only")  # fmt: skip


def rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_for_rope(weight: Any, n_heads: int) -> Any:
    """Reorder the rows of a Q or K projection from transformers' rotary layout to llama.cpp's.

    transformers rotates dimension i of a head with dimension i + d/2 ("rotate half"); llama.cpp
    rotates neighbouring pairs (2i, 2i + 1). llama.cpp's converter therefore interleaves the two
    halves of each head: new row 2i = old row i, new row 2i + 1 = old row d/2 + i. transformers'
    GGUF loader undoes exactly this.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama_tensors(model: Any) -> list[tuple[str, Any]]:
    """``(llama.cpp name, fp32 numpy array)`` for every weight the model computes with."""
    config, core = model.config, model.model
    embed = core.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == embed.data_ptr()
    tensors = [("token_embd.weight", embed)]
    for i, layer in enumerate(core.layers):
        attn, mlp = layer.self_attn, layer.mlp
        tensors += [
            (f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight),
            (f"blk.{i}.attn_q.weight", permute_for_rope(attn.q_proj.weight, config.num_attention_heads)),
            (f"blk.{i}.attn_k.weight", permute_for_rope(attn.k_proj.weight, config.num_key_value_heads)),
            (f"blk.{i}.attn_v.weight", attn.v_proj.weight),
            (f"blk.{i}.attn_output.weight", attn.o_proj.weight),
            (f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight),
            (f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight),
            (f"blk.{i}.ffn_up.weight", mlp.up_proj.weight),
            (f"blk.{i}.ffn_down.weight", mlp.down_proj.weight),
        ]
    tensors.append(("output_norm.weight", core.norm.weight))
    if not tied:
        tensors.append(("output.weight", model.lm_head.weight))
    expected = sum(1 for _ in model.parameters())  # parameters() lists a tied weight once
    if len(tensors) != expected:
        raise LiandanError(f"model has {expected} weight tensors but a Llama export writes {len(tensors)}; "
                           "it has layers the llama architecture does not know")  # fmt: skip
    return [(name, t.detach().float().cpu().numpy()) for name, t in tensors]


def encode_tensor(array: Any, quant: str) -> tuple[Any, Any]:
    """``(data, ggml type)``: vectors (norms) stay f32, as llama.cpp keeps them; matrices become
    f16 or Q8_0, and Q8_0 falls back to f16 for rows that are not a whole number of blocks."""
    if array.ndim == 1:
        return array.astype(np.float32), GGMLQuantizationType.F32
    if quant == "q8_0" and array.shape[-1] % QK_BLOCK == 0:
        return quants.quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), GGMLQuantizationType.F16


def write_gguf(model: Any, tokenizer: Any, vocab: dict, path: Path, quant: str) -> list[str]:
    """Write the GGUF file; returns notes for the result (tensors that could not be quantized)."""
    config = model.config
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_name(Path(model.liandan_source.name).name)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim(config))  # transformers reads this back as head_dim
    if head_dim(config) * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(vocab["tokens"]))
    add_tokenizer(writer, tokenizer, vocab)
    fallback = []
    for name, array in llama_tensors(model):
        data, ggml_type = encode_tensor(array, quant)
        if quant == "q8_0" and array.ndim == 2 and ggml_type != GGMLQuantizationType.Q8_0:
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
# Verification: read the file back with transformers and compare


def verify_gguf(source: Any, tokenizer: Any, path: Path, tolerance: float, probes: list[str]) -> list[ProbeCheck]:
    """Load ``path`` with transformers and compare it with ``source`` on each probe; raise
    `LiandanError` (the caller then deletes the file) when it is not the same model."""
    try:
        exported, gguf_tokenizer = load_model(str(path), device="cpu", dtype="float32")
    except LiandanError as exc:
        raise LiandanError(f"export failed: transformers cannot read the written GGUF back ({exc})") from exc
    try:
        texts = [probe_text(tokenizer, p) for p in probes]
        check_tokenizer(tokenizer, gguf_tokenizer, texts, probes)
        stops = set(stop_token_ids(tokenizer, source.generation_config))
        checks = [compare_probe(source, exported, tokenizer, p, t, stops) for p, t in zip(probes, texts)]
    finally:
        release_model(exported)
    worst = max(checks, key=lambda c: c.max_logit_diff)
    if worst.max_logit_diff > tolerance:
        raise LiandanError(f"export failed verification: logits differ from the source by up to "
                           f"{worst.max_logit_diff:.4f} (tolerance {tolerance}) on probe {worst.prompt!r}; "
                           "nothing was written")  # fmt: skip
    return checks


def probe_text(tokenizer: Any, prompt: str) -> str:
    if has_chat_template(tokenizer):
        return render_chat(tokenizer, [{"role": "user", "content": prompt}])
    return prompt


def check_tokenizer(source: Any, exported: Any, texts: list[str], probes: list[str]) -> None:
    if (source.chat_template or None) != (exported.chat_template or None):
        raise LiandanError("export failed verification: the GGUF's chat template differs from the model's; "
                           "nothing was written")  # fmt: skip
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(source, name) != getattr(exported, name):
            raise LiandanError(f"export failed verification: the GGUF tokenizer's {name} is {getattr(exported, name)}, "
                               f"the model's is {getattr(source, name)}; nothing was written")  # fmt: skip
    for prompt, text in zip(probes, texts):
        for special in (False, True):
            want = source(text, add_special_tokens=special)["input_ids"]
            got = exported(text, add_special_tokens=special)["input_ids"]
            if want != got:
                at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                raise LiandanError(f"export failed verification: the GGUF tokenizer encodes probe {prompt!r} "
                                   f"differently from token {at} on (add_special_tokens={special}); "
                                   "nothing was written")  # fmt: skip


def compare_probe(source: Any, exported: Any, tokenizer: Any, prompt: str, text: str, stops: set[int]) -> ProbeCheck:
    """Logits of both models over the prompt and the source's greedy continuation (teacher-forced).

    Up to the first token where the exported model's argmax differs, both models have seen the
    same text, so the count of leading agreements is exactly how far their greedy outputs agree.
    """
    # As liandan generates: a chat render holds its own special tokens, raw text gets them added.
    ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    continuation = greedy(source, ids, stops)
    sequence = torch.tensor([ids + continuation])
    with torch.inference_mode():
        want = source(input_ids=sequence).logits[0].float()  # (T, V)
        got = exported(input_ids=sequence).logits[0].float()
    start = len(ids) - 1  # logits at position p predict token p + 1
    # Both sides' picks come from the same full-sequence pass, so they are computed alike.
    want_picks = want[start : start + len(continuation)].argmax(-1).tolist()
    got_picks = got[start : start + len(continuation)].argmax(-1).tolist()
    matched = next((i for i, (a, b) in enumerate(zip(got_picks, want_picks)) if a != b), len(continuation))
    return ProbeCheck(prompt=prompt, max_logit_diff=float((want - got).abs().max()),
                      greedy_tokens=len(continuation), greedy_matched=matched)  # fmt: skip


def greedy(model: Any, ids: list[int], stops: set[int], max_new_tokens: int = GREEDY_TOKENS) -> list[int]:
    """The model's greedy continuation of ``ids``, up to a stop token (included) or ``max_new_tokens``."""
    out: list[int] = []
    step, cache = torch.tensor([ids]), None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            output = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1)
            cache = output.cache
            out.append(int(output.logits[0, -1].argmax()))
            if out[-1] in stops:
                break
            step = torch.tensor([[out[-1]]])
    return out
