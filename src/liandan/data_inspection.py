"""Look at training data the way the trainer will see it, before spending compute on it.

    from liandan.data_inspection import inspect_data
    report = inspect_data(["examples/pirate.jsonl"], model="default", show=1)
    report.summary()          # '30 records (messages), 1548 tokens, 417 trained (green); 0 truncated, ...'
    report.shown[0].pieces    # [('<|im_start|>system\\n...<|im_start|>assistant\\n', False),
                              #  ('Arr! The capital of France be Paris, matey.<|im_end|>', True), ('\\n', False)]

Records are read and validated as `liandan sft` reads them (`liandan.data`) and encoded with the
model's own chat template (`liandan.encoding`): the trained tokens are exactly the ones training
would learn, and a stop token that truncation cuts off is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .assistant_masks import encode_chat_example, explain_mask
from .chat import ensure_chat_template
from .data import Example, read_examples, summarize_skipped
from .encoding import encode_all
from .models import load_tokenizer, resolve_model
from .tools import prepare_tools


@dataclass
class ShownExample:
    source: str
    """``FILE:LINE`` of the record."""
    pieces: list[tuple[str, bool]]
    """The encoded example as runs of text, each marked trained (True) or context (False)."""


@dataclass
class DataInspection:
    format: str
    """The data format read (messages, sharegpt, alpaca, prompt_completion)."""
    records: int
    """Valid records read."""
    stats: dict
    """`liandan.encoding.encode_all`'s counts: tokens and trained tokens of the examples kept,
    ``truncated``, ``no_trained_tokens`` (their sources), ``stop_cut_off``."""
    skipped: list = field(default_factory=list)
    """Invalid records dropped with ``skip_invalid``."""
    shown: list[ShownExample] = field(default_factory=list)

    @property
    def stops_kept(self) -> bool:
        """Whether every trained assistant turn still ends in its trained stop token."""
        return self.stats["stop_cut_off"] == 0

    def summary(self) -> str:
        s = self.stats
        dropped = f", {len(self.skipped)} dropped: {summarize_skipped(self.skipped)}" if self.skipped else ""
        return (f"{self.records} records ({self.format}), {s['tokens']} tokens, {s['trained_tokens']} trained "
                f"(green); {s['truncated']} truncated, {len(s['no_trained_tokens'])} with no trained token{dropped}")  # fmt: skip

    def verdict(self) -> str:
        if self.stops_kept:
            return "every assistant turn ends in a trained stop token"
        return f"{self.stats['stop_cut_off']} examples lose a stop token (truncated)"


def inspect_data(paths: list[str], *, model: str = "default", format: str | None = None, max_length: int = 1024,
                 show: int = 3, skip_invalid: bool = False, trust_remote_code: bool = False,
                 tools_template: str | None = None) -> DataInspection:  # fmt: skip
    """Read, validate and encode ``paths`` with ``model``'s tokenizer and chat template; keep the
    first ``show`` examples as trained / context runs of text. ``tools_template``: as in SFT, for
    tool-calling data on a model whose template renders no tools."""
    tokenizer = load_tokenizer(resolve_model(model), trust_remote_code=trust_remote_code)
    ensure_chat_template(tokenizer)
    data = read_examples(paths, format=format, purpose="sft", skip_invalid=skip_invalid)
    prepare_tools(tokenizer, tools_template, data.examples)
    _, stats = encode_all(tokenizer, data.examples, max_length)  # raises on the first record that cannot be masked
    shown = [show_example(tokenizer, example, max_length) for example in data.examples[:show]]
    return DataInspection(format=data.format, records=len(data.examples), stats=stats, skipped=data.skipped, shown=shown)


def show_example(tokenizer, example: Example, max_length: int) -> ShownExample:
    enc = encode_chat_example(tokenizer, example.messages, max_length, tools=example.tools)
    return ShownExample(source=example.source, pieces=explain_mask(tokenizer, enc.input_ids, enc.labels))
