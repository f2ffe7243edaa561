"""An Ollama Modelfile for an exported GGUF: the chat template as an Ollama (Go) template.

    from liandan.modelfile import build_modelfile
    modelfile = build_modelfile(tokenizer, generation_config, Path("m.gguf"), add_bos, "m", "f16")
    modelfile.text, modelfile.exact, modelfile.tools, modelfile.notes

Written by `liandan.export` next to every GGUF file (``OUT.Modelfile``): ``FROM``, ``TEMPLATE``,
``SYSTEM`` when the template has a default system prompt, and ``PARAMETER stop`` per stop token.
The TEMPLATE is built from the literal text the chat template writes around each message
(`liandan.chat_pieces`), and handles Ollama's tools where the template's tool parts cut the same
way (`liandan.ollama_tools`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import has_chat_template, stop_token_ids
from .chat_pieces import CHECKS, ROLES, ChatPieces, chat_pieces, go_text, pieces_match
from .errors import LiandanError
from .ollama_tools import OllamaTools, ToolPieces, no_tools, ollama_tools, ollama_tools_template


def ollama_template(pieces: ChatPieces, tools: ToolPieces | None = None) -> str:
    """The Go template of these pieces; with ``tools``, one that also handles Ollama's ``.Tools``,
    each message's ``.ToolCalls`` and role ``tool`` (`liandan.ollama_tools.render_ollama` is it in Python)."""
    if tools is not None:
        return ollama_tools_template(pieces, tools)
    parts = [go_text(pieces.start), "{{ range .Messages }}"]
    for i, role in enumerate(ROLES):
        parts.append(("{{ if" if i == 0 else "{{ else if") + ' eq .Role "' + role + '" }}')
        parts += [go_text(pieces.prefix[role]), "{{ .Content }}", go_text(pieces.suffix[role])]
    parts += ["{{ end }}{{ end }}", go_text(pieces.generation)]
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Modelfile values. Ollama's parser (parser/parser.go) has no escapes: a value runs to the first
# line end at which it is a whole quoted string ("..." or """..."""), and characters that are not
# printable are dropped. So a value is written in the first quoting that Ollama reads back as
# exactly that text, and left out (with a note) when none does, rather than written wrongly.


def ollama_reads(written: str) -> str | None:
    """The value Ollama's Modelfile parser reads from ``written`` (what follows ``SYSTEM ``), or
    None when the value would end early and spill what follows into new commands."""
    buffer = ""
    for at, char in enumerate(written + "\n"):
        if char in "\r\n":
            value = _unquote(buffer.strip())
            if value is not None:
                return value if at == len(written) else None
            buffer += char
        elif char in " \t" or char.isprintable():
            buffer += char
    return None


def _unquote(text: str) -> str | None:
    if text.startswith('"""'):
        return text[3:-3] if len(text) >= 6 and text.endswith('"""') else None
    if text.startswith('"'):
        return text[1:-1] if len(text) >= 2 and text.endswith('"') else None
    return text


def modelfile_string(value: str, triple_first: bool = False) -> str | None:
    """``value`` quoted so that Ollama reads it back exactly, or None when no quoting can."""
    candidates = (f'"{value}"', f'"""{value}"""')
    for written in reversed(candidates) if triple_first else candidates:
        if ollama_reads(written) == value:
            return written
    return None


def _comment(text: str) -> str:
    """Text for a ``#`` comment line: a line end in it would start a new command."""
    return " ".join(text.splitlines())


@dataclass(frozen=True)
class Modelfile:
    """A Modelfile's text and what is known of its TEMPLATE."""

    text: str
    exact: bool
    """Whether the TEMPLATE renders every plain check conversation exactly as the chat template."""
    tools: OllamaTools | None
    """What the TEMPLATE does with tools; None when the chat template renders none."""
    notes: list[str]


def modelfile_text(tokenizer: Any, generation_config: Any, out: Path, add_bos: bool, spec: str,
                   quant: str) -> tuple[str, bool, list[str]]:  # fmt: skip
    """``(Modelfile text, TEMPLATE exact?, notes)`` of `build_modelfile`."""
    modelfile = build_modelfile(tokenizer, generation_config, out, add_bos, spec, quant)
    return modelfile.text, modelfile.exact, modelfile.notes


def build_modelfile(tokenizer: Any, generation_config: Any, out: Path, add_bos: bool, spec: str, quant: str) -> Modelfile:
    """FROM, TEMPLATE (with tools when the chat template renders them), SYSTEM, PARAMETER stop."""
    source = f"./{out.name}"
    source = source if ollama_reads(source) == source and " " not in source else modelfile_string(source)
    if source is None:
        raise LiandanError(f"'{out.name}': Ollama's Modelfile cannot name this file; choose a name without line breaks")
    lines = [_comment(f"# Ollama Modelfile for {out.name}, written by liandan export from '{spec}' ({quant})."),
             _comment(f"# Create the model: ollama create {out.stem} -f {out.with_suffix('.Modelfile').name}"),
             f"FROM {source}"]  # fmt: skip
    notes: list[str] = []
    exact = False
    pieces = chat_pieces(tokenizer, add_bos) if has_chat_template(tokenizer) else None
    tools = ollama_tools(tokenizer, pieces, add_bos) if has_chat_template(tokenizer) else None
    if not has_chat_template(tokenizer):
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        notes.append("the model has no chat template: the Modelfile passes prompts through as raw text")
    elif pieces is None:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        notes.append("could not derive an Ollama TEMPLATE from the chat template; the GGUF carries the chat "
                     "template (llama.cpp uses it with --jinja), but the Modelfile needs a TEMPLATE "
                     "written by hand")  # fmt: skip
    else:
        exact = pieces_match(tokenizer, pieces, add_bos)
        if not exact:
            lines.append("# TEMPLATE is a best effort: it differs from the chat template on some conversations.")
            notes.append("the Modelfile TEMPLATE is a best effort: it differs from the chat template on "
                         "some conversations")  # fmt: skip
        elif not pieces.is_chatml:
            notes.append("the chat template is not ChatML; the Modelfile TEMPLATE is a best effort that matched it "
                         f"on {len(CHECKS)} test conversations")  # fmt: skip
        template = ollama_template(pieces, tools.pieces if tools else None)
        if tools and tools.pieces and ollama_reads(f'"""{template}"""') != template:
            tools = OllamaTools(None, 0, False, no_tools("its tool parts cannot be written in a Modelfile exactly"))
            template = ollama_template(pieces)
        if tools and tools.note:
            notes.append(tools.note)
        if tools and tools.pieces and not tools.json_exact:
            lines.append("# TEMPLATE handles tools; Ollama writes their JSON its own way (compact, keys in its order).")
        if ollama_reads(f'"""{template}"""') == template:
            lines.append(f'TEMPLATE """{template}"""')
        else:
            exact = False
            lines.append('TEMPLATE """{{ .Prompt }}"""')
            notes.append("the Ollama TEMPLATE derived from the chat template cannot be written in a Modelfile "
                         "exactly; it needs a TEMPLATE written by hand")  # fmt: skip
        if pieces.default_system is not None:
            system = modelfile_string(pieces.default_system, triple_first=True)
            if system is None:
                notes.append("the default system prompt cannot be written in a Modelfile exactly "
                             f"({pieces.default_system!r:.60}) and was left out")  # fmt: skip
            else:
                lines.append(f"SYSTEM {system}")
    for token_id in stop_token_ids(tokenizer, generation_config):
        stop = tokenizer.decode([token_id], skip_special_tokens=False)
        written = modelfile_string(stop)
        if written is None:
            notes.append(f"the stop string {stop!r} cannot be written in a Modelfile exactly and was left out")
        else:
            lines.append(f"PARAMETER stop {written}")
    return Modelfile("\n".join(lines) + "\n", exact, tools, notes)
