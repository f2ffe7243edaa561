"""LoRA layers with the adapter's scale and sum folded into one matmul, for training.

    from liandan.lora_fusion import fuse_lora_layers
    unfuse = fuse_lora_layers(model)     # every plain LoRA linear layer of a PEFT model
    ...train...
    unfuse()                             # PEFT's own forward again

PEFT computes a LoRA linear layer as ``base(x) + lora_B(lora_A(x)) * scaling``: the (tokens x
out) product of lora_B is written, read and written again by the scaling, then read with the
base output and written once more by the sum, and backward multiplies the whole output gradient
by the scale again. Here the second matmul is ``base(x).addmm_(lora_A(x), lora_B.T,
alpha=scaling)``, which accumulates the scaled product straight into the base output, and whose
backward scales only the small (tokens x rank) and (out x rank) gradients. Same result up to
rounding; on a 2-core CPU it is 5% of a LoRA training step on the default model.

Only layers where nothing else is at stake are fused: PEFT's plain ``lora.Linear`` over an
``nn.Linear``, one active adapter without dropout, bias or variant (DoRA etc.), and no hooks on
its modules (DeepSpeed ZeRO-3 gathers weights in hooks). Anything else keeps PEFT's forward, and
so does a fused layer whenever its adapters are disabled or merged. A 4-bit base (QLoRA,
`liandan.quantization`) is never fused: PEFT wraps it in its own bitsandbytes LoRA class, and
its weight is packed NF4 data that only bitsandbytes' forward dequantizes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


def fuse_lora_layers(model: Any) -> Callable[[], None]:
    """Give every eligible LoRA layer of ``model`` the fused forward; return the function that
    puts PEFT's forward back."""
    fused = [m for m in model.modules() if type(m) is LoraLinear and eligible(m)]
    for module in fused:
        module.forward = functools.partial(fused_lora_forward, module, module.active_adapters[0], LoraLinear.forward)

    def unfuse() -> None:
        for module in fused:
            module.__dict__.pop("forward", None)

    return unfuse


def eligible(module: Any) -> bool:
    if len(module.active_adapters) != 1:
        return False
    name = module.active_adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return False
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    parts = (module, base, lora_a, lora_b)
    return (
        # exactly nn.Linear: bitsandbytes' Linear4bit is a subclass whose .weight F.linear cannot use
        type(base) is torch.nn.Linear
        and type(module.lora_dropout[name]) is torch.nn.Identity
        and lora_a.bias is None
        and lora_b.bias is None
        and not any(m._forward_hooks or m._forward_pre_hooks for m in parts)
    )


def fused_lora_forward(module: Any, name: str, peft_forward: Callable, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``base(x) + scaling * lora_B(lora_A(x))`` with the scaled sum inside one ``addmm``, for
    adapter ``name`` (the one that was checked); PEFT's forward for anything else."""
    if args or kwargs or module.disable_adapters or module.merged or list(module.active_adapters) != [name]:
        return peft_forward(module, x, *args, **kwargs)
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    if not torch.is_autocast_enabled(x.device.type) and not x.dtype == base.weight.dtype == lora_a.weight.dtype:
        return peft_forward(module, x, *args, **kwargs)  # mixed dtypes: PEFT casts for us
    rows = x.reshape(-1, x.shape[-1])  # 2-D, so that the in-place addmm below is not on a view
    result = F.linear(rows, base.weight, base.bias)  # (tokens, out)
    down = F.linear(rows, lora_a.weight)  # (tokens, rank)
    # in place: the base output is not needed for backward, and addmm would first copy it
    result.addmm_(down, lora_b.weight.to(result.dtype).t(), alpha=module.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])
