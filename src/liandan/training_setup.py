"""What the training loop changes on a loaded model, and undoes before the model is saved or
generates: the attention used for training, LoRA layers fused for speed, frozen weights stored in
bf16 under bf16 autocast, activation checkpointing when asked for.

    restore = speed_up_training(model, config, accelerator, packing=True)
    ...train...
    restore()     # the model as loaded (frozen bf16 weights stay bf16: only the adapters are saved)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .activation_checkpointing import checkpoint_activations
from .attention import restore_attention, use_training_attention
from .config import TrainConfig
from .engines import sharded
from .lora_fusion import fuse_lora_layers


def speed_up_training(model, config: TrainConfig, accelerator, packing: bool) -> Callable[[], None]:
    """What the loop changes on the model for speed, all in one place; returns the function that
    puts the model back as loaded (its attention, PEFT's LoRA forward and input casts) before it
    is saved or generates. Frozen bf16 weights stay bf16: only the adapters are saved. Activation
    checkpointing, when asked for, is turned on here too and off again by the same function."""
    attention = use_training_attention(model, config.attention, packing, accelerator.device)
    uncheckpoint = checkpoint_activations(model) if config.activation_checkpointing else lambda: None
    # FSDP / DeepSpeed own the dtypes and wrap the modules themselves: no bf16 freezing or fusion
    fused = not sharded(accelerator)
    if fused:
        if not config.full and accelerator.mixed_precision == "bf16":
            freeze_in_bf16(model)
        unfuse = fuse_lora_layers(model)

    def restore() -> None:
        restore_attention(model, attention)
        if fused:
            unfuse()
            set_adapter_input_casting(model, True)
        uncheckpoint()

    return restore


def freeze_in_bf16(model) -> None:
    """LoRA under bf16 autocast: store the frozen weights in bf16 (autocast would otherwise cast
    every one of them on every forward pass, and keep the copies for backward) and keep the
    trained adapter weights in fp32, so their optimizer updates are not rounded away. PEFT's
    casting of each adapter's input to the adapter's fp32 is switched off: under autocast the
    matmul runs in bf16 anyway, and the casts cost a copy of the activations per adapted layer."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(torch.bfloat16)
    set_adapter_input_casting(model, False)


def set_adapter_input_casting(model, enabled: bool) -> None:
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = enabled
