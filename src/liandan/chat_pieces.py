"""A chat template cut into the literal text it writes around each message, for an Ollama TEMPLATE.

    from liandan.chat_pieces import chat_pieces, pieces_match
    pieces = chat_pieces(tokenizer, add_bos=False)   # None when the template does not cut cleanly
    pieces.prefix["user"], pieces.suffix["user"], pieces.generation, pieces_match(tokenizer, pieces, False)

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
from typing import Any

ROLES = ("system", "user", "assistant")
# Sentinel message contents: the pieces are the text the template writes around them.
SYSTEM_SENTINEL, USER_SENTINEL, _A, _U2 = "Liandan7System", "Liandan7User", "Liandan7Reply", "Liandan7Again"
CHECKS = [
    [("user", "Hello there!\nHow are you?")],
    [("system", "Be brief."), ("user", " What is 2+2? ")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("system", "Answer in French."), ("user", "Hi"), ("assistant", "Bonjour !"), ("user", "Merci")],
]
"""Conversations (role, content) the pieces must render exactly as the chat template does (`pieces_match`)."""


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
        """What Ollama renders with `liandan.modelfile.ollama_template` of these pieces (and SYSTEM)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        body = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return self.start + body + self.generation


def _messages(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def cut_at(text: str, mark: str) -> tuple[str, str]:
    """``text`` before and after ``mark``; ValueError when ``mark`` is not in it exactly once."""
    if text.count(mark) != 1:
        raise ValueError(f"{mark!r} is not in the render exactly once")
    before, _, after = text.partition(mark)
    return before, after


def text_after(text: str, prefix: str) -> str:
    """``text`` less the render ``prefix`` it starts with; ValueError when it does not start so."""
    if not text.startswith(prefix):
        raise ValueError("a longer conversation does not extend the shorter one's render")
    return text[len(prefix) :]


def chat_pieces(tokenizer: Any, add_bos: bool) -> ChatPieces | None:
    """Cut the tokenizer's chat template into `ChatPieces`; None when it does not cut cleanly."""

    def render(pairs: list[tuple[str, str]], prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(_messages(pairs), tokenize=False, add_generation_prompt=prompt)

    try:
        user = render([("user", USER_SENTINEL)])
        generation = text_after(render([("user", USER_SENTINEL)], prompt=True), user)
        before_user, user_suffix = cut_at(user, USER_SENTINEL)
        reply = render([("user", USER_SENTINEL), ("assistant", _A)])
        assistant_prefix, assistant_suffix = cut_at(text_after(reply, user), _A)
        user_prefix, rest = cut_at(text_after(render([("user", USER_SENTINEL), ("assistant", _A), ("user", _U2)]), reply), _U2)
        before_system, after_system = cut_at(render([("system", SYSTEM_SENTINEL), ("user", USER_SENTINEL)]), SYSTEM_SENTINEL)
    except Exception:  # a template that raises on one of these conversations does not cut cleanly
        return None
    tail = user_prefix + USER_SENTINEL + user_suffix
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
    for pairs in CHECKS:
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
