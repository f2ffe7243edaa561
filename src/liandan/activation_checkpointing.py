"""Activation checkpointing: keep only each decoder layer's input during the forward pass and
recompute the layer's activations in backward, when a model or a sequence no longer fits.

    from liandan.activation_checkpointing import checkpoint_activations
    undo = checkpoint_activations(model)
    ...train...
    undo()

The activations kept for backward grow with layers x tokens x width (plus the MLP's and
attention's intermediates), and at long sequences or 1B+ models they, not the weights, are what
runs out. With checkpointing only one layer's worth is live at a time, for about one more forward
pass of compute. The recomputation repeats the same operations on the same inputs, so losses and
gradients are the same as without (``tests/test_families.py`` checks every family of the test
matrix; ``tests/test_activation_checkpointing.py`` that the layers really are recomputed).

It is transformers' own checkpointing of its decoder layers, in PyTorch's non-reentrant form:
that form needs no input that requires a gradient, so the hook transformers puts on the
embeddings to make their output require one is taken off again: with LoRA's frozen embeddings,
backward then computes no gradient for the first layer's input, which nobody uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import LiandanError

KWARGS = {"use_reentrant": False}


def checkpoint_activations(model: Any) -> Callable[[], None]:
    """Turn on checkpointing of every decoder layer of ``model`` (a transformers model or a PEFT
    model around one); returns the function that turns it off again."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise LiandanError(f"activation_checkpointing: {type(inner).__name__} does not support it in transformers "
                           "(its layers cannot be recomputed); set activation_checkpointing: false")  # fmt: skip
    # transformers 5.x renamed gradient_* to activation_*; the old name warns where the new exists
    if hasattr(inner, "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=dict(KWARGS))
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(KWARGS))
    inner.disable_input_require_grads()

    def undo() -> None:
        if hasattr(inner, "activation_checkpointing_disable"):
            inner.activation_checkpointing_disable()
        else:
            inner.gradient_checkpointing_disable()

    return undo
