"""An Ollama Modelfile for an exported GGUF: the chat template as an Ollama (Go) template.

    from liandan.modelfile import modelfile_text
    text, exact, notes = modelfile_text(tokenizer, generation_config, Path("m.gguf"), add_bos, "m", "f16")

Written by `liandan.export` next to every GGUF file (``OUT.Modelfile``): ``FROM``, ``TEMPLATE``,
``SYSTEM`` when the template has a default system prompt, and ``PARAMETER stop`` per stop token.

Ollama cannot run Jinja, so the TEMPLATE is rebuilt from what the chat template writes around
each message: render conversations whose contents are sentinels, and cut the text at them into
a start, a prefix and a suffix per role, and the generation prompt. A default system prompt the
template adds when there is none becomes the Modelfile's SYSTEM, which Ollama inserts the same
way. The pieces are then checked by re-rendering a few conversations in Python exactly as the Go
template would, against the chat template itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import has_chat_template, stop_token_ids
from .errors import LiandanError

ROLES = ("system", "user", "assistant")
_S, _U, _A, _U2 = "Liandan7System", "Liandan7User", "Liandan7Reply", "Liandan7Again"
_CHECKS = [
    [("user", "Hello there!\nHow are you?")],
    [("system", "Be brief."), ("user", " What is 2+2? ")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("system", "Answer in French."), ("user", "Hi"), ("assistant", "Bonjour !"), ("user", "Merci")],
]


@dataclass(frozen=True)
class ChatPieces:
    """The chat template cut into the literal text it writes around message contents."""

    start: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    default_system: str | None

    @property
    def is_chatml(self) -> bool:
        turns = all(self.prefix[r] == f"<|im_start|>{r}\n" and self.suffix[r] == "<|im_end|>\n" for r in ROLES)
        return turns and not self.start and self.generation == "<|im_start|>assistant\n"

    def render(self, messages: list[dict]) -> str:
        """What Ollama renders with `ollama_template` of these pieces (and SYSTEM)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return self.start + body + self.generation


def _messages(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def _cut(text: str, mark: str) -> tuple[str, str]:
    if text.count(mark) != 1:
        raise ValueError(f"{mark!r} is not in the render exactly once")
    before, _, after = text.partition(mark)
    return before, after


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError("a longer conversation does not extend the shorter one's render")
    return text[len(prefix) :]


def chat_pieces(tokenizer: Any, add_bos: bool) -> ChatPieces | None:
    """Cut the tokenizer's chat template into `ChatPieces`; None when it does not cut cleanly."""

    def render(pairs: list[tuple[str, str]], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(_messages(pairs), tokenize=False, add_generation_prompt=prompt)

    try:
        user = render([("user", _U)])
        generation = _after(render([("user", _U)], prompt=True), user)
        before_user, user_suffix = _cut(user, _U)
        reply = render([("user", _U), ("assistant", _A)])
        assistant_prefix, assistant_suffix = _cut(_after(reply, user), _A)
        user_prefix, rest = _cut(_after(render([("user", _U), ("assistant", _A), ("user", _U2)]), reply), _U2)
        before_system, after_system = _cut(render([("system", _S), ("user", _U)]), _S)
    except Exception:  # a template that raises on one of these conversations does not cut cleanly
        return None
    tail = user_prefix + _U + user_suffix
    if rest != user_suffix or not before_user.endswith(user_prefix) or not after_system.endswith(tail):
        return None
    head = before_user[: len(before_user) - len(user_prefix)]  # start, and any default system turn
    system_suffix = after_system[: len(after_system) - len(tail)]
    bos = tokenizer.bos_token or ""
    default = None
    if before_system.startswith(head):  # no default system turn
        start = head
    else:
        start = _default_system_start(head, before_system, system_suffix, bos, add_bos)
        if start is None:
            return None
        body, system_prefix = head[len(start) :], before_system[len(start) :]
        default = body[len(system_prefix) : len(body) - len(system_suffix)]
    system_prefix = before_system[len(start) :]
    if add_bos and bos and start.startswith(bos):
        start = start[len(bos) :]  # llama.cpp and Ollama add BOS themselves
    return ChatPieces(
        start=start,
        prefix={"system": system_prefix, "user": user_prefix, "assistant": assistant_prefix},
        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
        generation=generation,
        default_system=default,
    )


def _default_system_start(head: str, before_system: str, system_suffix: str, bos: str, add_bos: bool) -> str | None:
    """The template's start when it writes a default system turn: "" or the BOS text, whichever
    leaves ``head`` as exactly one system turn. BOS first when llama.cpp adds it itself (so it can
    be left out of the TEMPLATE), "" first otherwise (ChatML's <|im_start|> may be the BOS token)."""
    for start in ([bos, ""] if add_bos else ["", bos]):
        if not head.startswith(start) or not before_system.startswith(start):
            continue
        body, system_prefix = head[len(start) :], before_system[len(start) :]
        fits = len(body) >= len(system_prefix) + len(system_suffix)
        if fits and body.startswith(system_prefix) and body.endswith(system_suffix):
            return start
    return None


def pieces_match(tokenizer: Any, pieces: ChatPieces, add_bos: bool) -> bool:
    """Whether the pieces re-render every check conversation exactly as the chat template does
    (with the BOS that llama.cpp adds in front when the GGUF says so)."""
    bos = (tokenizer.bos_token or "") if add_bos else ""
    for pairs in _CHECKS:
        messages = _messages(pairs)
        try:
            want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            return False
        if bos + pieces.render(messages) != want:
            return False
    return True


def go_text(text: str) -> str:
    """Literal text for a Go template inside a Modelfile's triple quotes."""
    if "{{" in text or '"""' in text or any(not (c.isprintable() or c in "\n\t\r") for c in text):
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"  # a Go string literal
    return text


def ollama_template(pieces: ChatPieces) -> str:
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


def modelfile_text(tokenizer: Any, generation_config: Any, out: Path, add_bos: bool, spec: str,
                   quant: str) -> tuple[str, bool, list[str]]:  # fmt: skip
    """``(Modelfile text, TEMPLATE exact?, notes)``: FROM, TEMPLATE, SYSTEM, PARAMETER stop."""
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
                         f"on {len(_CHECKS)} test conversations")  # fmt: skip
        template = ollama_template(pieces)
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
    return "\n".join(lines) + "\n", exact, notes
