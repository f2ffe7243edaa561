"""`liandan.activation_checkpointing`: the decoder layers really are recomputed in backward, far
fewer activations are kept for it, and turning it off restores the model. (That the training it
gives is the same, losses and weights, in every family: tests/test_families.py.)"""

from __future__ import annotations

import pytest
import torch

from families import build_family_dir

from liandan.activation_checkpointing import checkpoint_activations
from liandan.config import SFTConfig
from liandan.models import load_model
from liandan.prepare import attach_trainable


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    model, _ = load_model(str(build_family_dir(tmp_path_factory.mktemp("llama"), "llama")), dtype="float32")
    return attach_trainable(model, SFTConfig(data=["unused"], lora={"dropout": 0.0}), []).train()


def layer_calls_and_saved_bytes(model) -> tuple[int, int]:
    """Calls of the decoder layers' MLPs during one forward and backward pass over 512 tokens, and
    the bytes autograd kept for that backward outside the recomputed regions. (The MLP, a part
    inside the layer: transformers checkpoints the layer's forward, not its hooks. Counted as it
    starts: the recomputation stops as soon as it has what backward needs, before the MLP ends.)"""
    layers = model.get_base_model().model.layers
    calls, saved = [0], [0]

    def count(*_):
        calls[0] += 1

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    hooks = [layer.mlp.register_forward_pre_hook(count) for layer in layers]
    try:
        ids = torch.randint(0, 100, (1, 512))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=ids, use_cache=False).logits.float().square().mean()
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return calls[0], saved[0]


def test_layers_are_recomputed_and_fewer_activations_kept(lora_model):
    layers = len(lora_model.get_base_model().model.layers)
    plain_calls, plain_saved = layer_calls_and_saved_bytes(lora_model)
    undo = checkpoint_activations(lora_model)
    try:
        calls, saved = layer_calls_and_saved_bytes(lora_model)
    finally:
        undo()
    assert (plain_calls, calls) == (layers, 2 * layers)  # each layer once more, in backward
    assert saved < plain_saved / 2, (saved, plain_saved)
    assert layer_calls_and_saved_bytes(lora_model) == (plain_calls, plain_saved)  # off again


def test_a_lora_model_keeps_no_input_gradient_hook(lora_model):
    """transformers hooks the embeddings so that their output requires a gradient (needed only by
    reentrant checkpointing); liandan takes the hook off: LoRA's first layer input needs none."""
    undo = checkpoint_activations(lora_model)
    try:
        embedded = lora_model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
        assert not embedded.requires_grad
    finally:
        undo()
