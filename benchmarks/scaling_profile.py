"""Where a liandan training step's time goes, for `scaling.py --profile`: torch.profiler over
the last step of a run, its ops' self CPU time in six buckets.

    from scaling_profile import StepProfile
    window = StepProfile(total_steps=5)     # before the run; profiles step 5's cycle
    train_pretrain(config)
    window.shares                            # {"matmuls": 0.52, "attention": 0.08, ...}

The window opens after step N-1's optimizer step and closes after step N's, so it covers one
whole cycle: step N-1's scheduler step, zero_grad and logging, then step N's forward, backward,
clipping and optimizer step. The profiled step runs slower than the others (the profiler's
cost per op), so `scaling.py` leaves it out of tokens/s.

Nothing is added to liandan for this. Its functions are wrapped here, in the benchmark's own
process, in ``record_function`` ranges: the attention function (transformers' SDPA and eager,
liandan's packed attention), the output head and loss (`liandan.losses.token_nll`, as
`liandan.objectives` calls it), the forward pass (`liandan.objectives.micro_batch_loss`) and
gradient clipping. An op's bucket is its innermost range; a backward op (run by autograd under
``evaluate_function: XBackward``) gets the range of the forward op that made its autograd node,
found by the profiler's sequence number, so the attention's and the head's gradients count with
them. The buckets:

- **matmuls**: ``mm``, ``addmm``, ``bmm``, ``linear`` ... of the layers (and the copies they make);
- **attention**: everything inside the attention function, forward and backward (scores, softmax,
  the weighted sum: matmuls included);
- **element-wise**: every other op of the layers: norms, rotary embeddings, SiLU and products,
  residual sums, casts and copies, embedding lookups, gradient accumulation;
- **head and loss**: the output head and the cross-entropy, forward and backward;
- **optimizer**: AdamW's step, zero_grad and gradient clipping;
- **other**: the rest of the cycle (batching, the loss's division, logging), and the time the
  layers' forward and backward spend outside any op (Python, the autograd engine).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.profiler import ProfilerActivity, profile, record_function

BUCKETS = ("matmuls", "attention", "element-wise", "head and loss", "optimizer", "other")
RANGES = {"bench::attention": "attention", "bench::head_and_loss": "head and loss", "bench::clip": "optimizer",
          "bench::optimizer": "optimizer", "bench::forward": "layers"}  # fmt: skip
MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::matmul",
           "aten::linear", "aten::addbmm", "aten::_addmm_activation", "aten::mv", "aten::addmv", "aten::dot"}  # fmt: skip
BACKWARD = "autograd::engine::evaluate_function"


class StepProfile:
    """Profiles the cycle of the last of ``total_steps`` optimizer steps (see the module docstring).
    ``shares`` (bucket -> share of the self CPU time) and ``seconds`` are set when it closes."""

    def __init__(self, total_steps: int):
        if total_steps < 2:
            raise ValueError("profiling needs at least 2 steps: the window opens after the one before the last")
        self.total, self.done = total_steps, 0
        self.profiler = None
        self.shares: dict[str, float] = {}
        self.seconds = 0.0
        wrap_functions()
        register_optimizer_step_pre_hook(self._before_step)
        register_optimizer_step_post_hook(self._after_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        # The hooks run inside the optimizer's own range, which closes only after the profiler has
        # stopped (and so is never recorded): a range of our own, closed first, holds the step's ops.
        self.inside = record_function("bench::optimizer")
        self.inside.__enter__()

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.inside.__exit__(None, None, None)
        self.done += 1
        if self.done == self.total - 1:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.start()
        elif self.done == self.total and self.profiler is not None:
            self.profiler.stop()
            totals = bucket_times(self.profiler.events())
            whole = sum(totals.values()) or 1.0
            self.shares = {b: totals.get(b, 0.0) / whole for b in BUCKETS}
            self.seconds = whole / 1e6


def in_range(name: str, function):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with record_function(name):
            return function(*args, **kwargs)

    return wrapped


def wrap_functions() -> None:
    """Put the ranges the buckets are read from around liandan's and transformers' functions (in
    this process only)."""
    import transformers.models.llama.modeling_llama as llama
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import liandan.attention
    import liandan.objectives

    liandan.objectives.token_nll = in_range("bench::head_and_loss", liandan.objectives.token_nll)
    liandan.objectives.micro_batch_loss = in_range("bench::forward", liandan.objectives.micro_batch_loss)
    AttentionInterface.register("sdpa", in_range("bench::attention", sdpa_attention_forward))
    liandan.attention.packed_attention = in_range("bench::attention", liandan.attention.packed_attention)
    llama.eager_attention_forward = in_range("bench::attention", llama.eager_attention_forward)
    torch.nn.utils.clip_grad_norm_ = in_range("bench::clip", torch.nn.utils.clip_grad_norm_)


def chain(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def region(event, forward_regions: dict[int, str]) -> str:
    """The innermost range around ``event``: attention, head and loss, optimizer, layers (in the
    forward pass or in backward), or other."""
    for outer in chain(event):
        if outer.name.startswith(BACKWARD):
            return forward_regions.get(outer.sequence_nr, "layers")
        if outer.name.startswith("Optimizer."):
            return "optimizer"
        if outer.name in RANGES:
            return RANGES[outer.name]
    return "other"


def forward_regions(events) -> dict[int, str]:
    """The range of each forward op that made an autograd node, by its sequence number."""
    regions: dict[int, str] = {}
    for event in events:
        if event.sequence_nr >= 0 and not any(e.name.startswith(BACKWARD) for e in chain(event)):
            place = region(event, {})
            if regions.get(event.sequence_nr) in (None, "layers", "other"):  # the innermost named range wins
                regions[event.sequence_nr] = place
    return regions


def buckets(events) -> list[str]:
    """The bucket of each event."""
    regions = forward_regions(events)
    out = []
    for event in events:
        place = region(event, regions)
        if place == "layers" and not event.name.startswith("aten::"):
            place = "other"  # the self time of a range or an autograd node: Python and dispatch
        elif place == "layers":
            place = "matmuls" if any(e.name in MATMULS for e in chain(event)) else "element-wise"
        out.append(place)
    return out


def bucket_times(events) -> dict[str, float]:
    """Self CPU time (microseconds) per bucket."""
    totals: dict[str, float] = defaultdict(float)
    for event, place in zip(events, buckets(events), strict=True):
        totals[place] += event.self_cpu_time_total
    return dict(totals)
