"""The worker of `liandan serve`: one thread owns the model and runs generation jobs from a queue,
one at a time, each in its own batch and cache, so no request sees another's tokens.

    worker = Worker(model, tokenizer, threading.Lock(), ServeLimits())
    worker.start()
    worker.submit([Job(prompt_ids=[1, 2, 3], n=1, max_tokens=16, temperature=0.0, top_p=1.0,
                       stop=[], seed=None, first_index=0, stream=False, stop_ids=[2])])

`Tracker` ends each choice on a stop token or stop string and decodes only the last few tokens of
each reply per step (decoding whole replies each time would be quadratic). A job with ``logprobs``
also gets each token's log-probability: the log-softmax of the raw logits of the step that chose it
(read by a forward hook, as ``generate`` hands stopping criteria only the processed scores), and
with ``echo`` those of its prompt, from one forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel

from .chat import stop_token_ids
from .generation import find_stop, streamable_length
from .openai_api import ApiError, ServeLimits, TokenLogprob

log = logging.getLogger("liandan.serve")
ECHO_ROWS = 256
"""Prompt positions whose log-softmax is taken at once when an echoed prompt is scored."""


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; send the request again once it is back",
                    type="server_error", code="server_shutting_down")  # fmt: skip


@dataclass
class Choice:
    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    """Tokens generated, the stop token included (what ``usage.completion_tokens`` counts)."""
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    """Characters of ``text`` already streamed."""
    prefix: int = 0
    read: int = 0
    """``ids[prefix:read]`` is decoded again with each new token, as context for its text; ``ids[read:]``
    is what has not become text yet (a character's first bytes)."""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """The tokens that became text, each with where it starts in ``text`` (``starts``)."""
    starts: list[int] = field(default_factory=list)
    pending: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    """Log-probability and top ``(id, logprob)`` of each of ``ids[read:]``."""
    logprobs_sent: int = 0


@dataclass
class Job:
    """One prompt with its sampling settings; ``n`` rows generate together. Results come back
    through ``events`` on the request's event loop: ``("delta", index, text)`` while streaming,
    then ``("done", [Choice])`` or ``("error", ApiError)``."""

    prompt_ids: list[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    first_index: int
    stream: bool
    stop_ids: list[int]
    """Token ids that end a row: the model's stop tokens (`liandan.chat.chat_stop_ids` for chat)."""
    logprobs: int | None = None
    """How many of the most likely tokens to list for each token; None: no log-probabilities."""
    echo: bool = False
    """The prompt's text (and, with ``logprobs``, its tokens) comes first in each choice."""
    loop: asyncio.AbstractEventLoop | None = None
    """The request's event loop, set by `_Server.prepare` (jobs are made in a thread, off the loop)."""
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class Tracker:
    """A stopping criterion for ``model.generate``, called after every token with the sequences so
    far: it ends each row on a stop token or stop string, and streams the text that can no longer
    turn into a stop string."""

    def __init__(self, job: Job, decode: Callable[[list[int]], str], stop_ids: list[int]) -> None:
        self.job, self.decode, self.stop_ids = job, decode, set(stop_ids)
        self.choices = [Choice(job.first_index + i) for i in range(job.n)]
        self.longest_stop = max((len(s) for s in job.stop), default=0)
        self.logits: torch.Tensor | None = None
        """The raw logits of the step that chose the newest tokens, (n, V), when ``job.logprobs``."""

    def see_logits(self, module: Any, args: Any, output: Any) -> None:
        """A forward hook on the model: keeps the last position's raw logits, as ``generate`` reads them."""
        self.logits = output.logits[:, -1].float()  # (n, V)

    def __call__(self, input_ids, scores, **kwargs):
        tokens = input_ids[:, -1].tolist()
        scored = [None] * len(tokens) if self.job.logprobs is None else score(self.logits, tokens, self.job.logprobs)
        for choice, token, token_score in zip(self.choices, tokens, scored):
            if choice.finish_reason is None:  # finished rows only receive padding
                self._advance(choice, token, token_score)
        done = [self.job.cancelled or c.finish_reason is not None for c in self.choices]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _advance(self, choice: Choice, token: int, token_score: tuple | None) -> None:
        choice.tokens += 1
        if token in self.stop_ids:  # not part of the text, so not of the log-probabilities either
            choice.finish_reason = "stop"
            self._add_text(choice, final=True)
        else:
            choice.ids.append(token)
            if token_score is not None:
                choice.pending.append(token_score)
            self._add_text(choice, final=False)
        self._send(choice)

    def _add_text(self, choice: Choice, final: bool) -> None:
        read = choice.read
        piece = new_text(choice, self.decode, final)
        if choice.read > read and self.job.logprobs is not None:
            self._resolve(choice, read, piece)
        if not piece:
            return
        start = max(len(choice.text) - self.longest_stop + 1, 0)  # a new stop string ends in the new piece
        choice.text += piece
        cut = find_stop(choice.text[start:], self.job.stop)
        if cut is not None:
            choice.text, choice.finish_reason = choice.text[: start + cut], "stop"
            kept = sum(start < len(choice.text) for start in choice.starts)  # not the tokens wholly after the cut
            del choice.starts[kept:], choice.logprobs[kept:]

    def _resolve(self, choice: Choice, read: int, piece: str) -> None:
        """``ids[read:]`` just became ``piece``: the last of them adds it, any before it "" (they
        end inside a character), so that the tokens join to the text."""
        for i, (logprob, top) in enumerate(choice.pending, start=read):
            text = piece if i == len(choice.ids) - 1 else ""
            choice.logprobs.append(TokenLogprob(text, logprob, alternatives(choice.ids, i, text, top, self.decode)))
            choice.starts.append(len(choice.text))
        choice.pending = []

    def _send(self, choice: Choice) -> None:
        if not self.job.stream:
            return
        final = choice.finish_reason is not None
        end = len(choice.text) if final else streamable_length(choice.text, self.job.stop)
        count = choice.logprobs_sent  # the tokens whose text goes out now
        while count < len(choice.logprobs) and (final or choice.starts[count] + len(choice.logprobs[count].token) <= end):
            count += 1
        if end > choice.sent or count > choice.logprobs_sent:
            tokens = None if self.job.logprobs is None else choice.logprobs[choice.logprobs_sent : count]
            self.job.emit(("delta", choice.index, choice.text[choice.sent : end], tokens))
            choice.sent, choice.logprobs_sent = end, count

    def finish(self) -> list[Choice]:
        for choice in self.choices:
            if choice.finish_reason is None:
                self._add_text(choice, final=True)  # may still find a stop string
                choice.finish_reason = choice.finish_reason or "length"
                self._send(choice)
        return self.choices


def new_text(choice: Choice, decode: Callable[[list[int]], str], final: bool) -> str:
    """The text the last tokens of ``choice.ids`` add, decoding only a few tokens (whole replies each
    time would be quadratic): ``ids[prefix:]`` less ``ids[prefix:read]``, the context that keeps a
    leading space or a multi-byte character right. Held back while it ends in half a character."""
    if choice.read == len(choice.ids):
        return ""
    known = decode(choice.ids[choice.prefix : choice.read])
    text = decode(choice.ids[choice.prefix :])
    if not final and (len(text) <= len(known) or text.endswith("\ufffd")):
        return ""
    choice.prefix, choice.read = choice.read, len(choice.ids)
    return text[len(known) :]


def token_pieces(ids: list[int], decode: Callable[[list[int]], str]) -> list[str]:
    """The text each of ``ids`` adds, by the same rule as a reply's tokens: they join to the text."""
    choice, pieces = Choice(0), []
    for i, token in enumerate(ids):
        choice.ids.append(token)
        read = choice.read
        piece = new_text(choice, decode, final=i == len(ids) - 1)
        if choice.read > read:
            pieces += [""] * (choice.read - read - 1) + [piece]
    return pieces


def score(logits: torch.Tensor, tokens: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of ``logits`` (R, V): the log-probability of its token and the ``k`` most
    likely ``(id, logprob)``, most likely first."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (R, V)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    top = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)  # k = 0: (R, 0)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top.indices.tolist(), top.values.tolist())]


CONTEXT_TOKENS = 4
"""Tokens decoded before an alternative, so that its leading space or character reads right."""


def alternatives(ids: list[int], i: int, text: str, top: list[tuple[int, float]], decode: Callable) -> list[tuple[str, float]]:
    """``top`` with each token as the text it would have added in place of ``ids[i]`` (whose own
    text is ``text``)."""
    context = ids[max(i - CONTEXT_TOKENS, 0) : i]
    known = decode(context) if any(alt != ids[i] for alt, _ in top) else ""
    return [(text if alt == ids[i] else decode([*context, alt])[len(known) :], logprob) for alt, logprob in top]


class Worker:
    """Owns the model. Requests never share a batch or a cache, so none can see another's tokens."""

    def __init__(self, model: Any, tokenizer: Any, lock: threading.Lock, limits: ServeLimits) -> None:
        self.model, self.tokenizer, self.lock, self.limits = model, tokenizer, lock, limits
        self.stop_ids = stop_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop_ids[0] if self.stop_ids else None)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="liandan-serve", daemon=True)
        self.current: Job | None = None
        self.closing = False
        self.held = 0
        """Jobs queued or running, at most ``limits.max_queued``."""
        self.held_lock = threading.Lock()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """Refuses new jobs and answers those still queued with a 503 at once; the running job
        finishes. Called as the server begins to shut down, so that no client waits for a reply
        that will not come (or for the whole queue to run first)."""
        with self.held_lock:
            self.closing = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:  # stop() came first: the worker still has to see it
                return self.jobs.put(None)
            job.emit(("error", _shutting_down()))
            with self.held_lock:
                self.held -= 1

    def stop(self) -> None:
        self.close()
        if self.current is not None:
            self.current.cancelled = True
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, jobs: list[Job]) -> None:
        """Queues all of ``jobs`` or, when that would hold more than ``max_queued``, none (a 429)."""
        with self.held_lock:  # held with the puts, so that close() sees all of the jobs or none
            if self.closing:
                raise _shutting_down()
            if self.held + len(jobs) > self.limits.max_queued:
                raise ApiError(429, f"the server is busy ({self.held} jobs queued, at most {self.limits.max_queued}); "
                               "retry later", type="rate_limit_error", code="server_busy",
                               headers={"Retry-After": str(self.limits.retry_after_s)})  # fmt: skip
            self.held += len(jobs)
            for job in jobs:
                self.jobs.put(job)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                self._take(job)
            finally:
                with self.held_lock:
                    self.held -= 1

    def _take(self, job: Job) -> None:
        if job.cancelled:  # its client has gone: nobody reads this
            return job.emit(("error", ApiError(499, "the client left", type="server_error")))
        if self.closing:
            return job.emit(("error", _shutting_down()))
        self.current = job
        try:
            job.emit(("done", self._run(job)))
        except Exception:
            log.exception("generation failed")  # the details stay in the server's log
            job.emit(("error", ApiError(500, "generation failed (the server's log has the details)", type="server_error")))
        finally:
            self.current = None

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _run(self, job: Job) -> list[Choice]:
        # Seeded per request, so the same request with the same seed gives the same output.
        if job.seed is None:
            torch.seed()
        else:
            torch.manual_seed(job.seed)
        tracker = Tracker(job, self._decode, job.stop_ids)
        echo = self._echo(job) if job.echo else None
        if echo is not None and job.stream:
            for choice in tracker.choices:
                job.emit(("delta", choice.index, *echo))
        if job.max_tokens > 0:
            self._generate(job, tracker)
        choices = tracker.finish()
        if echo is not None:
            for choice in choices:
                choice.text = echo[0] + choice.text
                choice.logprobs = (echo[1] or []) + choice.logprobs
        return choices

    def _generate(self, job: Job, tracker: Tracker) -> None:
        input_ids = torch.tensor([job.prompt_ids] * job.n, device=self.model.device)  # (n, T)
        sampling = {"do_sample": False} if job.temperature == 0 else {
            "do_sample": True, "temperature": job.temperature, "top_p": job.top_p, "top_k": 0,
        }  # fmt: skip
        # generate() runs the model without its adapter wrapper (peft), so the hook goes on the model it runs.
        runs = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        hook = runs.register_forward_hook(tracker.see_logits) if job.logprobs is not None else None
        try:
            with torch.inference_mode():
                self.model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=job.max_tokens, eos_token_id=job.stop_ids or None,
                    pad_token_id=self.pad_id, repetition_penalty=1.0, stopping_criteria=[tracker], **sampling,
                )  # fmt: skip
        finally:
            if hook is not None:
                hook.remove()

    def _echo(self, job: Job) -> tuple[str, list[TokenLogprob] | None]:
        """The prompt's text as its tokens read, and with ``job.logprobs`` each token's log-probability
        from one forward pass (the first token's is None: nothing before it predicts it)."""
        ids = job.prompt_ids
        pieces = token_pieces(ids, self._decode)
        if job.logprobs is None:
            return "".join(pieces), None
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0, :-1]  # (T-1, V)
            scored = []
            for at in range(0, len(ids) - 1, ECHO_ROWS):  # log-softmax in float32 a block at a time: V is large
                scored += score(logits[at : at + ECHO_ROWS], ids[at + 1 : at + 1 + ECHO_ROWS], job.logprobs)
        tokens = [TokenLogprob(pieces[0], None, None)]
        for i, (logprob, top) in enumerate(scored, start=1):
            tokens.append(TokenLogprob(pieces[i], logprob, alternatives(ids, i, pieces[i], top, self._decode)))
        return "".join(pieces), tokens
