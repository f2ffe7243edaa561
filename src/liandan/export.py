"""Export a model to GGUF for llama.cpp and Ollama, verified before it is kept.

    from pathlib import Path
    from liandan.export import export_gguf
    result = export_gguf("default", Path("exports/smollm2-f16.gguf"), quant="f16")
    print("\\n".join(result.summary()))
    # then: ollama create smollm2 -f exports/smollm2-f16.Modelfile

Families: llama, mistral, qwen2, qwen3, qwen3_moe, phi3, gemma2 and gemma3_text, each written as the
llama.cpp architecture its own converter uses (`liandan.gguf_writing` holds the tables). What is
written:

- ``OUT`` (a ``.gguf`` file): the architecture's metadata, tensors under llama.cpp's names with its
  transforms (Q/K rows permuted for llama's rotary layout, Gemma's norms as 1 + w, ...), norms and
  biases in f32 and matrices in f16 or Q8_0, and the byte-level BPE tokenizer with its chat template.
- ``OUT`` with the suffix ``.Modelfile``: an Ollama Modelfile (``FROM``, a ``TEMPLATE`` in Go template
  syntax derived from the chat template, ``SYSTEM`` when the template has a default system prompt,
  and ``PARAMETER stop`` for each stop token).

Every export is verified before it replaces anything, on probe prompts rendered with the chat
template. Always: the file is read back with transformers' GGUF reader (set up as llama.cpp reads
the metadata) and compared with the source (tokens, chat template, logits, greedy continuation).
When llama-cpp-python is installed (``liandan[llamacpp]``): the file also runs in llama.cpp itself,
whose greedy output must equal the source's for f16; for Q8_0 its agreement is reported. A file
that fails is deleted. The model may be anything `liandan.models.load_model` accepts; a LoRA run is
merged in fp32.

A model whose chat template renders tools (a run trained with ``tools_template: chatml`` saves
liandan's ChatML tools template) keeps it as it is, and the export checks that it still works: the
GGUF's template must be the model's byte for byte and render tool conversations (definitions,
calls, results, answers) exactly as the model does, or the file is not kept; llama-cpp-python's chat
handler renders them from the template llama.cpp reads; and the Modelfile TEMPLATE handles
Ollama's tools where the template's shape allows it (`liandan.ollama_tools`), with what differs
(Ollama writes the JSON itself) in the notes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .chat import has_chat_template, render_chat, stop_token_ids
from .checkpoints import refuse_non_finite
from .errors import LiandanError
from .files import write_atomic
from .gguf_reading import drop_quantizer
from .gguf_tokenizer import gguf_vocab
from .gguf_writing import Family, family_of, llama_cpp_settings, write_gguf
from .llama_cpp_check import RuntimeCheck, SourceRun, ToolChat, llama_cpp_version, run_llama_cpp
from .modelfile import build_modelfile
from .models import load_model, release_model
from .ollama_tools import TOOL_CHECKS, OllamaTools, ollama_tool_tag
from .tools import tools_problem

FORMATS = ("gguf",)
QUANTS = ("f16", "q8_0")

# Largest max |logit difference| accepted between the source (fp32) and the GGUF read back by
# transformers, taken over every position of each probe and its greedy continuation and over the
# whole vocabulary. Measured on the default model (SmolLM2-135M-Instruct, the 3 default probes,
# logits spanning 30-60 per position): f16 weights moved logits by at most 0.041, Q8_0 by at most
# 1.32 (0.3-1.3 at every position: the max over 49k logits of an error spread through 30 layers).
# Greedy output matched in full for both. The tolerances leave about 6x (f16) and 2.3x (Q8_0) room
# for other models and prompts, and stay far below what real mistakes do to the same model:
# without the Q/K permutation the difference is 32-40, with rope theta 10000 instead of 100000 it
# is 10. (llama.cpp computes with its own kernels, e.g. f16 or Q8_0 activations, so its numbers
# differ a little more; it is held to greedy equality instead, see `check_runtime`.)
TOLERANCES = {"f16": 0.25, "q8_0": 3.0}
GREEDY_TOKENS = 16
DEFAULT_PROBES = (
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Translate to French: 'The weather is nice today (23 °C)!'",
)
READER_ONLY = "transformers' GGUF reader only: install liandan[llamacpp] to verify with llama.cpp"


@dataclass
class ProbeCheck:
    """How the exported model, read back by transformers, compares with the source on one probe."""

    prompt: str
    """The user message (rendered with the chat template before tokenizing)."""
    max_logit_diff: float
    """Largest absolute logit difference over the prompt and the source's greedy continuation."""
    greedy_tokens: int
    """Length of the source's greedy continuation (at most 16 tokens, fewer if it stopped)."""
    greedy_matched: int
    """Leading tokens of that continuation the exported model also picks greedily."""


@dataclass
class ToolsCheck:
    """How the export keeps the tool calling of a model whose chat template renders tools."""

    conversations: int
    """Tool conversations the GGUF's chat template rendered exactly as the model's (else no file)."""
    llama_cpp: bool | None
    """Whether llama-cpp-python's chat handler, from the template llama.cpp read, rendered them
    the same; None when llama-cpp-python is not installed."""
    ollama: OllamaTools | None
    """What the Modelfile TEMPLATE does with tools."""

    def summary(self) -> list[str]:
        gguf = (f"Tools: the GGUF's chat template renders {self.conversations} tool conversations (definitions, calls, "
                "results, answers) exactly as the model's")  # fmt: skip
        if self.llama_cpp is not None:
            gguf += "; so does llama-cpp-python's chat handler" if self.llama_cpp else "; llama-cpp-python's does not (see notes)"
        ollama = self.ollama
        if ollama is None or ollama.pieces is None:
            return [gguf, "Ollama: the Modelfile TEMPLATE handles plain chat only (see notes)"]
        how = "exactly" if ollama.json_exact else "exactly but for the JSON Ollama writes itself (see notes)"
        modelfile = (f"Ollama: the Modelfile TEMPLATE handles tools, calls (read back from {ollama_tool_tag(ollama.pieces)}) "
                     f"and tool results, rendering {ollama.checked} tool conversations {how}")  # fmt: skip
        return [gguf, modelfile]


@dataclass
class ExportResult:
    """What `export_gguf` wrote and how well it matched the source, for the CLI to print."""

    path: Path
    quant: str
    size_bytes: int
    arch: str
    """llama.cpp's architecture the file declares (``general.architecture``)."""
    tolerance: float
    """The largest logit difference that was accepted from transformers' reader."""
    probes: list[ProbeCheck]
    modelfile: Path
    template_exact: bool
    """Whether the Modelfile TEMPLATE rendered every checked plain chat conversation exactly as the chat
    template (tool conversations: ``tools``)."""
    runtime: RuntimeCheck | None = None
    """The file run in llama.cpp, or None when llama-cpp-python is not installed."""
    tools: ToolsCheck | None = None
    """How tool calling was kept; None when the model's chat template renders no tools."""
    notes: list[str] = field(default_factory=list)

    @property
    def max_logit_diff(self) -> float:
        return max(p.max_logit_diff for p in self.probes)

    @property
    def greedy_match(self) -> tuple[int, int]:
        return sum(p.greedy_matched for p in self.probes), sum(p.greedy_tokens for p in self.probes)

    @property
    def verifier(self) -> str:
        if self.runtime is None:
            return READER_ONLY
        return f"llama.cpp runtime (llama-cpp-python {self.runtime.version}) and transformers' GGUF reader"

    def summary(self) -> list[str]:
        matched, total = self.greedy_match
        lines = [
            f"Wrote {self.path} ({self.arch}, {self.quant}, {self.size_bytes / 1e6:.1f} MB) and {self.modelfile}",
            f"Verified with {self.verifier}",
            f"transformers' reader on {len(self.probes)} probes: max logit difference {self.max_logit_diff:.4f} "
            f"(tolerance {self.tolerance}), greedy tokens matched {matched}/{total}"
            + (" (where they part, the logits are within tolerance: a near tie)" if matched < total else ""),
        ]
        lines += [f"  {p.max_logit_diff:.4f}  {p.greedy_matched}/{p.greedy_tokens}  {p.prompt}" for p in self.probes]
        if self.runtime is not None:
            equal, total = self.runtime.greedy_equal
            lines.append(f"llama.cpp: greedy output {'equal to' if self.runtime.exact else 'differs from'} the source's "
                         f"({equal}/{total} tokens before the first difference), top-1 agreement "
                         f"{self.runtime.top1_agreement:.1%} over teacher-forced positions, max logit difference "
                         f"{self.runtime.max_logit_diff:.4f}")  # fmt: skip
        if self.tools is not None:
            lines += self.tools.summary()
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
    refuse_non_finite(model.state_dict(), f"export of '{spec}'")  # "verified" equal to a NaN model means nothing
    made = missing_dirs(out)
    try:
        family = family_of(model, spec)
        vocab = gguf_vocab(tokenizer, model.get_input_embeddings().num_embeddings, spec)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Staged in a private directory beside OUT, so the rename is atomic and transformers reads
        # back only this file (no stray tokenizer_config.json from OUT's directory).
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            staged = Path(tmp) / out.name
            notes = vocab["notes"] + write_gguf(model, tokenizer, vocab, family, staged, quant, spec)
            stops = set(stop_token_ids(tokenizer, model.generation_config))
            runs = [source_run(model, tokenizer, prompt, stops) for prompt in probes]
            chats = tool_chats(tokenizer) if tools_problem(tokenizer) is None else None
            checks = verify_gguf(runs, tokenizer, staged, family, tolerance, chats)
            runtime = None
            if llama_cpp_version():
                runtime = run_llama_cpp(staged, runs, stops, GREEDY_TOKENS, chats, tokenizer.chat_template)
                notes += check_runtime(runtime, quant, tolerance) + check_runtime_chats(runtime)
            written = build_modelfile(tokenizer, model.generation_config, out, vocab["add_bos"], spec, quant)
            os.replace(staged, out)
        write_atomic(modelfile, written.text)
    except BaseException:
        for directory in made:  # deepest first; only the ones this export created
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()
        raise
    finally:
        release_model(model)
    tools = None
    if chats is not None:
        llama = None if runtime is None or runtime.chats is None else runtime.chats.exact
        tools = ToolsCheck(conversations=len(chats), llama_cpp=llama, ollama=written.tools)
    return ExportResult(
        path=out, quant=quant, size_bytes=out.stat().st_size, arch=family.arch, tolerance=tolerance, probes=checks,
        modelfile=modelfile, template_exact=written.exact, runtime=runtime, tools=tools, notes=notes + written.notes,
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
# The source's side of every probe


def probe_text(tokenizer: Any, prompt: str) -> str:
    if has_chat_template(tokenizer):
        return render_chat(tokenizer, [{"role": "user", "content": prompt}])
    return prompt


def source_run(model: Any, tokenizer: Any, prompt: str, stops: set[int]) -> SourceRun:
    """The source model on one probe: its greedy continuation and its logits over prompt + continuation."""
    text = probe_text(tokenizer, prompt)
    # As liandan generates: a chat render holds its own special tokens, raw text gets them added.
    special = not has_chat_template(tokenizer)
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    continuation = greedy(model, ids, stops)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + continuation])).logits[0].float()  # (T, V)
    return SourceRun(prompt=prompt, text=text, ids=ids, continuation=continuation, logits=logits.numpy(),
                     add_special_tokens=special)  # fmt: skip


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


# ---------------------------------------------------------------------------------------------
# Verification 1: read the file back with transformers and compare


def load_as_llama_cpp(path: Path, family: Family) -> tuple[Any, Any]:
    """The GGUF as a transformers model, its config completed the way llama.cpp reads the metadata
    (transformers' GGUF loader skips soft-caps, sliding layers, Gemma's query scale, ...)."""
    where, name = str(path.parent), path.name
    fields = {key: value.contents() for key, value in GGUFReader(path).fields.items()}
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        for key, value in llama_cpp_settings(fields, family).items():
            setattr(config, key, value)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, config=config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except Exception as exc:  # transformers raises many types for a file it cannot read; one line for the user
        first = str(exc).strip().splitlines()
        raise LiandanError(f"export failed: transformers cannot read the written GGUF back "
                           f"({first[0] if first else type(exc).__name__}); nothing was written") from exc  # fmt: skip
    drop_quantizer(model)
    model.eval()
    return model, tokenizer


def verify_gguf(runs: list[SourceRun], tokenizer: Any, path: Path, family: Family, tolerance: float,
                chats: list[ToolChat] | None = None) -> list[ProbeCheck]:  # fmt: skip
    """Load ``path`` with transformers and compare it with the source's ``runs`` (and its renders of
    tool ``chats``); raise `LiandanError` (the caller then deletes the file) when it is not the same model."""
    exported, gguf_tokenizer = load_as_llama_cpp(path, family)
    try:
        check_tokenizer(tokenizer, gguf_tokenizer, runs)
        if chats is not None:
            check_tool_template(tokenizer, gguf_tokenizer, path, chats)
        checks = [compare_probe(exported, run) for run in runs]
    finally:
        release_model(exported)
    worst = max(checks, key=lambda c: c.max_logit_diff)
    if worst.max_logit_diff > tolerance:
        raise LiandanError(f"export failed verification: logits differ from the source by up to "
                           f"{worst.max_logit_diff:.4f} (tolerance {tolerance}) on probe {worst.prompt!r}; "
                           "nothing was written")  # fmt: skip
    return checks


def check_tokenizer(source: Any, exported: Any, runs: list[SourceRun]) -> None:
    if (source.chat_template or None) != (exported.chat_template or None):
        raise LiandanError("export failed verification: the GGUF's chat template differs from the model's; "
                           "nothing was written")  # fmt: skip
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(source, name) != getattr(exported, name):
            raise LiandanError(f"export failed verification: the GGUF tokenizer's {name} is {getattr(exported, name)}, "
                               f"the model's is {getattr(source, name)}; nothing was written")  # fmt: skip
    for run in runs:
        for special in (False, True):
            want = source(run.text, add_special_tokens=special)["input_ids"]
            got = exported(run.text, add_special_tokens=special)["input_ids"]
            if want != got:
                at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                raise LiandanError(f"export failed verification: the GGUF tokenizer encodes probe {run.prompt!r} "
                                   f"differently from token {at} on (add_special_tokens={special}); "
                                   "nothing was written")  # fmt: skip


def tool_chats(tokenizer: Any) -> list[ToolChat]:
    """`TOOL_CHECKS` rendered by the model's chat template (with the generation prompt), leaving out
    any the template refuses (one call per turn, ...)."""
    chats = []
    for messages, tools in TOOL_CHECKS:
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        except Exception:  # the template's own refusal; nothing an export can change
            continue
        chats.append(ToolChat(messages=messages, tools=tools, text=text))
    return chats


def check_tool_template(source: Any, exported: Any, path: Path, chats: list[ToolChat]) -> None:
    """Raise unless the GGUF holds the model's chat template byte for byte (as gguf-py reads it)
    and renders every tool conversation exactly as the model's (as transformers reads the file)."""
    written = GGUFReader(path).fields.get("tokenizer.chat_template")
    if written is None or written.contents() != source.chat_template:
        raise LiandanError("export failed verification: the GGUF does not hold the model's chat template byte for "
                           "byte; nothing was written")  # fmt: skip
    for n, chat in enumerate(chats, 1):
        got = exported.apply_chat_template(chat.messages, tools=chat.tools, tokenize=False, add_generation_prompt=True)
        if got != chat.text:
            at = next((i for i, (a, b) in enumerate(zip(got, chat.text)) if a != b), min(len(got), len(chat.text)))
            raise LiandanError(f"export failed verification: the GGUF's chat template renders tool conversation {n} "
                               f"differently from the model's (from character {at} on); nothing was written")  # fmt: skip


def compare_probe(exported: Any, run: SourceRun) -> ProbeCheck:
    """The exported model's logits over the prompt and the source's greedy continuation (teacher-forced).

    Up to the first token where the exported model's argmax differs, both models have seen the
    same text, so the count of leading agreements is exactly how far their greedy outputs agree.
    """
    with torch.inference_mode():
        got = exported(input_ids=torch.tensor([run.ids + run.continuation])).logits[0].float()  # (T, V)
    want = torch.from_numpy(run.logits)
    start, n = len(run.ids) - 1, len(run.continuation)  # logits at position p predict token p + 1
    # Both sides' picks come from a full-sequence pass, so they are computed alike.
    want_picks, got_picks = want[start : start + n].argmax(-1).tolist(), got[start : start + n].argmax(-1).tolist()
    matched = next((i for i, (a, b) in enumerate(zip(got_picks, want_picks)) if a != b), n)
    return ProbeCheck(prompt=run.prompt, max_logit_diff=float((want - got).abs().max()), greedy_tokens=n,
                      greedy_matched=matched)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Verification 2: llama.cpp's verdict


def check_runtime_chats(runtime: RuntimeCheck) -> list[str]:
    """A note on llama-cpp-python's renders of the tool conversations, when they are not the model's
    (its reading and its Jinja, not the file: gguf-py and transformers have read the file exactly)."""
    chats = runtime.chats
    if chats is None or chats.exact:
        return []
    if not chats.same_template:
        note = (f"llama.cpp reads the GGUF's chat template back otherwise than it was written: llama-cpp-python "
                f"{runtime.version} will render chats with another template")  # fmt: skip
    elif chats.error:
        note = (f"llama-cpp-python's chat handler cannot render the tool conversations from the GGUF's chat template "
                f"({chats.error})")  # fmt: skip
    elif chats.chat_format != "chat_template.default":
        note = (f"llama-cpp-python picks its built-in chat format {chats.chat_format!r} for this file, not the GGUF's "
                "chat template: pass chat_format='chat_template.default' to use the template with tools")  # fmt: skip
    else:
        note = f"llama-cpp-python's chat handler renders tool conversations {chats.differs} otherwise than the model's template"
    return [note]


def check_runtime(runtime: RuntimeCheck, quant: str, tolerance: float) -> list[str]:
    """Fail an f16 export that llama.cpp runs differently from the source; notes for the rest.

    f16 is held to the source's greedy picks, in llama.cpp's own greedy run and at every position
    of the teacher-forced one, with one exception: a near tie, where the source's two candidates are
    closer than llama.cpp's rounding moves them (its logits there within ``tolerance``). Tiny and
    real models alike have such positions, and no file can reproduce them exactly.
    """
    notes = []
    if quant == "f16":
        for p in runtime.probes:
            if not p.near_tie(tolerance):
                where = f"from token {p.greedy_equal} on" if not p.exact else "at a teacher-forced position"
                raise LiandanError(f"export failed verification in llama.cpp: its greedy output differs from the "
                                   f"source's on probe {p.prompt!r} {where} (logit difference up to "
                                   f"{max(p.flip_diff, p.parting_diff or 0.0):.4f} where they part, tolerance "
                                   f"{tolerance}); nothing was written")  # fmt: skip
            if not p.exact:
                notes.append(f"llama.cpp's greedy output parts from the source's at a near tie, token {p.greedy_equal} "
                             f"of probe {p.prompt!r}: the source's two candidates are {p.parting_margin:.4f} apart and "
                             f"llama.cpp's logits differ by up to {p.parting_diff:.4f} there")  # fmt: skip
    elif not runtime.exact:
        parted = sum(not p.exact for p in runtime.probes)
        equal, total = runtime.greedy_equal
        notes.append(f"{quant} changes this model's greedy output in llama.cpp on {parted} of "
                     f"{len(runtime.probes)} probes ({equal}/{total} tokens equal before the first difference, "
                     f"top-1 agreement {runtime.top1_agreement:.1%}): this model does not survive {quant} "
                     "unchanged; use f16 if that matters")  # fmt: skip
    for p in runtime.probes:
        if not p.tokens_match:
            notes.append(f"llama.cpp's own tokenizer encodes probe {p.prompt!r} differently from the model's "
                         "tokenizer: text typed into llama.cpp or Ollama may reach the model as other tokens")  # fmt: skip
    return notes
