"""Run an exported GGUF in llama.cpp itself and compare it with the source model, when the optional
extra is installed (``pip install 'liandan[llamacpp]'``, which builds llama-cpp-python).

    from liandan.llama_cpp_check import llama_cpp_version, run_llama_cpp
    if llama_cpp_version():
        check = run_llama_cpp(Path("model.gguf"), runs, stops={2}, max_new_tokens=16)
        print(check.exact, check.top1_agreement, check.max_logit_diff)

Used by `liandan.export`. llama.cpp runs in a child process (``python -m liandan.llama_cpp_check
FOLDER``, see `run_llama_cpp` for why). Token ids from the source tokenizer go into llama.cpp, so
what is compared is the model; llama.cpp's own tokenizer is checked apart on the same rendered
text. Two comparisons per probe: llama.cpp's own greedy run against the source's greedy
continuation, and the source's continuation fed to llama.cpp whole (teacher-forced), its logits
compared position by position.

For a model whose chat template renders tools, the child also renders tool conversations with
llama-cpp-python's chat handler (`Jinja2ChatFormatter`, Python's jinja2) from the template llama.cpp
read out of the file, as ``create_chat_completion`` would, and says where that differs from the
model's own render. llama.cpp's C++ Jinja engine (``llama-server --jinja``) is not reachable from
llama-cpp-python, so it is not checked.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LiandanError


@dataclass
class SourceRun:
    """What the source model did on one probe: the input to both verifiers."""

    prompt: str
    """The user message."""
    text: str
    """The prompt as the model reads it (rendered with the chat template when it has one)."""
    ids: list[int]
    """``text`` tokenized by the source tokenizer."""
    continuation: list[int]
    """The source's greedy continuation, up to a stop token (included)."""
    logits: Any
    """The source's logits over ``ids + continuation``, shape (T, V), fp32."""
    add_special_tokens: bool
    """Whether ``ids`` were tokenized with the tokenizer's special tokens added."""


@dataclass
class ToolChat:
    """A tool conversation and the model's own render of it (with the generation prompt)."""

    messages: list[dict]
    tools: list[dict]
    text: str


@dataclass
class ChatCheck:
    """The GGUF's chat template as llama-cpp-python uses it for chat completions."""

    chat_format: str
    """The chat format it picked for the file ("chat_template.default": the file's own template)."""
    same_template: bool
    """Whether the template llama.cpp read from the file is the model's, byte for byte."""
    differs: list[int]
    """Tool conversations (numbered from 1) that its chat handler renders otherwise than the model."""
    error: str | None = None
    """What its chat handler raised, if it did."""

    @property
    def exact(self) -> bool:
        return self.chat_format == "chat_template.default" and self.same_template and not self.differs and not self.error


@dataclass
class RuntimeProbe:
    """How llama.cpp, running the exported file, compares with the source on one probe."""

    prompt: str
    greedy_tokens: int
    """Length of the source's greedy continuation."""
    greedy_equal: int
    """Leading tokens of llama.cpp's own greedy run that equal the source's continuation."""
    exact: bool
    """llama.cpp's greedy output is the source's, token for token, stop token included."""
    top1_agree: int
    """Positions where llama.cpp's most likely next token is the source's, over prompt and continuation."""
    positions: int
    max_logit_diff: float
    """Largest absolute logit difference, over every position and the whole vocabulary."""
    tokens_match: bool
    """llama.cpp's own tokenizer gives the source tokenizer's ids for the rendered probe."""
    flip_diff: float
    """Largest logit difference at a teacher-forced position where llama.cpp's pick is not the
    source's (0 when there is none): small means the source was within rounding of a tie there."""
    parting_margin: float | None = None
    """Where llama.cpp's greedy run parts from the source's: how far the source's logit for its own
    pick is above its logit for llama.cpp's pick (None when the runs are equal)."""
    parting_diff: float | None = None
    """Where the greedy runs part: the largest logit difference there, teacher-forced."""

    def near_tie(self, tolerance: float) -> bool:
        """Whether every difference in picks is a near tie: at each position where llama.cpp picks
        otherwise, the source's two candidates are closer than twice llama.cpp's logit difference
        there, and that difference is within ``tolerance``."""
        if self.flip_diff > tolerance:
            return False
        return self.exact or (self.parting_margin <= 2 * self.parting_diff and self.parting_diff <= tolerance)


@dataclass
class RuntimeCheck:
    """llama.cpp's verdict on an exported file."""

    version: str
    """llama-cpp-python's version (it pins the llama.cpp it was built from)."""
    probes: list[RuntimeProbe]
    chats: ChatCheck | None = None
    """The tool conversations rendered by its chat handler, when there were any to render."""

    @property
    def exact(self) -> bool:
        return all(p.exact for p in self.probes)

    @property
    def greedy_equal(self) -> tuple[int, int]:
        return sum(p.greedy_equal for p in self.probes), sum(p.greedy_tokens for p in self.probes)

    @property
    def top1_agreement(self) -> float:
        return sum(p.top1_agree for p in self.probes) / sum(p.positions for p in self.probes)

    @property
    def max_logit_diff(self) -> float:
        return max(p.max_logit_diff for p in self.probes)

    @property
    def tokenizer_matches(self) -> bool:
        return all(p.tokens_match for p in self.probes)


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, or None when it is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    return importlib.metadata.version("llama_cpp_python")


def run_llama_cpp(path: Path, runs: list[SourceRun], stops: set[int], max_new_tokens: int,
                  chats: list[ToolChat] | None = None, template: str | None = None) -> RuntimeCheck:  # fmt: skip
    """Load ``path`` in llama.cpp and compare it with ``runs``, in a child process of its own; with
    ``chats``, also render them with llama-cpp-python's chat handler (`render_chats`) and check that
    llama.cpp reads the model's chat template (``template``) back from the file byte for byte.

    Apart because in a process that has run torch, llama.cpp runs about 50 times slower (both use
    the one OpenMP runtime loaded, whose threads spin against each other), and because a failed
    assertion in llama.cpp aborts the process it runs in. Raises `LiandanError` when llama.cpp
    cannot load or run the file (the export is then not kept).
    """
    with tempfile.TemporaryDirectory(prefix="liandan-llama-cpp-") as tmp:
        folder = Path(tmp)
        request = {"path": str(path), "stops": sorted(stops), "max_new_tokens": max_new_tokens,
                   "runs": [{f.name: getattr(r, f.name) for f in fields(r) if f.name != "logits"} for r in runs],
                   "chats": None if chats is None else [asdict(c) for c in chats], "template": template}  # fmt: skip
        (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")
        for i, run in enumerate(runs):
            np.save(folder / f"logits-{i}.npy", np.asarray(run.logits, dtype=np.float32))
        child = [sys.executable, "-m", "liandan.llama_cpp_check", str(folder)]
        here = str(Path(__file__).resolve().parent.parent)  # this liandan, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
        done = subprocess.run(child, capture_output=True, text=True, check=False, env=env)
        answer = folder / "result.json"
        if done.returncode != 0 or not answer.is_file():
            tail = " | ".join(line for line in done.stderr.strip().splitlines()[-3:])
            raise LiandanError(f"export failed: llama.cpp stopped (exit status {done.returncode}) running the written "
                               f"GGUF: {tail or 'no message'}; nothing was written")  # fmt: skip
        result = json.loads(answer.read_text(encoding="utf-8"))
    if "error" in result:
        raise LiandanError(f"export failed: llama.cpp cannot load the written GGUF ({result['error']}); nothing was written")
    chats_result = ChatCheck(**result["chats"]) if result.get("chats") else None
    return RuntimeCheck(version=result["version"], probes=[RuntimeProbe(**p) for p in result["probes"]], chats=chats_result)


# ---------------------------------------------------------------------------------------------
# The child process: python -m liandan.llama_cpp_check FOLDER


def main(folder: Path) -> None:
    """Read FOLDER/request.json and the source's logits, write FOLDER/result.json."""
    from llama_cpp import Llama

    request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
    runs = [SourceRun(**r, logits=np.load(folder / f"logits-{i}.npy")) for i, r in enumerate(request["runs"])]
    stops, max_new_tokens = set(request["stops"]), request["max_new_tokens"]
    n_ctx = max(len(r.ids) + max(len(r.continuation), max_new_tokens) for r in runs) + 8
    log: list[str] = []
    with llama_cpp_log(log):
        try:
            # Half the cores: llama.cpp's threads wait for each other spinning, so a thread without a
            # core of its own (another process busy) slows every step down by orders of magnitude.
            threads = max(1, min(4, len(os.sched_getaffinity(0)) // 2))
            llm = Llama(model_path=request["path"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                        n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip
        except (ValueError, RuntimeError) as exc:
            result: dict = {"error": "; ".join(line for line in log if line)[-400:] or str(exc)}
        else:
            probes = [compare_run(llm, run, stops, max_new_tokens) for run in runs]
            chats = None
            if request["chats"] is not None:
                chats = render_chats(llm, [ToolChat(**c) for c in request["chats"]], request["template"])
            llm.close()
            result = {"version": llama_cpp_version(), "probes": [asdict(p) for p in probes],
                      "chats": None if chats is None else asdict(chats)}  # fmt: skip
    (folder / "result.json").write_text(json.dumps(result), encoding="utf-8")


@contextlib.contextmanager
def llama_cpp_log(lines: list[str]) -> Iterator[None]:
    """Collect llama.cpp's warnings and errors in ``lines`` (and print nothing) while open."""
    import llama_cpp
    from llama_cpp import _logger

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: Any) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h)
            lines.append(text.decode("utf-8", errors="replace").strip())

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield
    finally:  # llama-cpp-python's own logger back; `collect` must outlive every call into llama.cpp
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def compare_run(llm: Any, run: SourceRun, stops: set[int], max_new_tokens: int) -> RuntimeProbe:
    sequence = run.ids + run.continuation
    llm.reset()
    llm.eval(sequence)
    got = np.array(llm.scores[: len(sequence)], dtype=np.float32)  # (T, V)
    want = np.asarray(run.logits, dtype=np.float32)
    diff = np.abs(got - want).max(-1)  # (T,)
    flips = got.argmax(-1) != want.argmax(-1)
    greedy = llama_cpp_greedy(llm, run.ids, stops, max_new_tokens)
    n = min(len(greedy), len(run.continuation))
    equal = next((i for i in range(n) if greedy[i] != run.continuation[i]), n)
    probe = RuntimeProbe(
        prompt=run.prompt, greedy_tokens=len(run.continuation), greedy_equal=equal, exact=greedy == run.continuation,
        top1_agree=int((~flips).sum()), positions=len(sequence), max_logit_diff=float(diff.max()),
        tokens_match=same_tokens(llm, run), flip_diff=float(diff[flips].max()) if flips.any() else 0.0,
    )  # fmt: skip
    if not probe.exact and equal < n:  # both runs saw the same tokens up to here: position len(ids) - 1 + equal
        at = len(run.ids) - 1 + equal
        probe.parting_margin = float(want[at, run.continuation[equal]] - want[at, greedy[equal]])
        probe.parting_diff = float(diff[at])
    elif not probe.exact:  # one run stopped where the other went on: not a tie of two candidates
        probe.parting_margin, probe.parting_diff = float("inf"), 0.0
    return probe


def llama_cpp_greedy(llm: Any, ids: list[int], stops: set[int], max_new_tokens: int) -> list[int]:
    """llama.cpp's own greedy continuation of ``ids`` (argmax, token by token, with its KV cache)."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if out[-1] in stops:
            break
        llm.eval([out[-1]])
    return out


def same_tokens(llm: Any, run: SourceRun) -> bool:
    """Whether llama.cpp tokenizes the rendered probe as the source tokenizer did: special tokens
    parsed from the text, BOS/EOS added only as the file's ``add_bos``/``add_eos`` say."""
    return llm.tokenize(run.text.encode("utf-8"), add_bos=run.add_special_tokens, special=True) == run.ids


def render_chats(llm: Any, chats: list[ToolChat], model_template: str | None) -> ChatCheck:
    """Render ``chats`` as llama-cpp-python's ``create_chat_completion`` does with the file's own
    template: its `Jinja2ChatFormatter`, given the template and the BOS/EOS texts llama.cpp read."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template", "")
    model = llm._model  # llama-cpp-python takes the BOS/EOS texts from here for its own handler
    bos, eos = (model.token_get_text(t) if t != -1 else "" for t in (llm.token_bos(), llm.token_eos()))
    check = ChatCheck(chat_format=str(llm.chat_format), same_template=template == model_template, differs=[])
    try:
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        for n, chat in enumerate(chats, 1):
            if formatter(messages=chat.messages, tools=chat.tools).prompt != chat.text:
                check.differs.append(n)
    except Exception as exc:  # jinja2 raises many types; one line for the report
        check.error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return check


if __name__ == "__main__":
    main(Path(sys.argv[1]))
