"""QLoRA: the frozen base weights stored in 4 bits, LoRA adapters trained on top of them.

    from liandan.config import SFTConfig
    from liandan.train import train_sft
    train_sft(SFTConfig(model="Qwen/Qwen2.5-7B-Instruct", data=["chats.jsonl"], quantize="4bit"))

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs": every linear layer of the
base is stored as 4-bit NormalFloat (NF4) in blocks of 64 weights, each block's scale itself
quantized to 8 bits (double quantization, about 0.4 bit per weight saved). A layer's forward
dequantizes its weight block by block to the compute dtype and multiplies there, so
W x ~= dequant(NF4(W)) x; the LoRA update B A x is added in full precision. Only the adapters are
trained and saved: a run directory holds the adapter, as for plain LoRA.

Through transformers' ``BitsAndBytesConfig`` (bitsandbytes does the quantizing), on CUDA only:
the point is to fit a larger model into GPU memory. The base is loaded straight onto the run's
device, already quantized; embeddings, norms and the output head stay unquantized.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from .config import TrainConfig
from .engines import sharded_launch
from .errors import LiandanError


def check_quantize(config: TrainConfig, device: Any, model_kind: str) -> None:
    """Refuse ``quantize`` where it cannot work, before anything loads; each message names the
    setting. ``model_kind`` is `liandan.models.ModelSource.kind`."""
    if not config.quantize:
        return
    if torch.device(device).type != "cuda":
        raise LiandanError(f"quantize: {config.quantize} saves GPU memory and runs on a CUDA GPU only; this run's device is "
                           f"{torch.device(device).type} (remove quantize to train the weights as stored)")  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LiandanError(f"quantize: {config.quantize} needs the bitsandbytes package: pip install bitsandbytes "
                           "(or pip install 'liandan[gpu]')")  # fmt: skip
    sharding = sharded_launch()
    if sharding:
        # FSDP and DeepSpeed ZeRO-3 need the 4-bit weights stored in a float dtype they can flatten
        # and shard (bnb_4bit_quant_storage), which liandan does not set up or test.
        raise LiandanError(f"quantize: {config.quantize} is not supported under {sharding}; launch with plain DDP "
                           "(accelerate launch --multi_gpu) or on one GPU")  # fmt: skip
    if model_kind in ("gguf", "adapter"):
        what = "a .gguf file" if model_kind == "gguf" else "a LoRA run directory (loaded merged)"
        raise LiandanError(f"quantize: {config.quantize} quantizes safetensors weights as they load; the model is {what}. "
                           + ("Merge it first (liandan merge RUN OUT) and train on the merged directory"
                              if model_kind == "adapter" else "Use the Hugging Face model directory or hub id instead"))  # fmt: skip


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype the 4-bit layers dequantize to and multiply in: the run's mixed precision, as
    `liandan.engines.resolve_precision` settles it on a GPU (auto: bf16 where the GPU has it, else
    fp16), and fp32 without mixed precision."""
    if mixed_precision == "no":
        return torch.float32
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "auto" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def quantization_config(config: TrainConfig) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``config.quantize``: NF4 with double quantization,
    as in the QLoRA paper."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(config.mixed_precision))  # fmt: skip


def prepare_quantized(model: Any) -> Any:
    """PEFT's preparation of a k-bit model for training, without its activation checkpointing
    (PEFT turns it on by default; liandan only where the run's ``activation_checkpointing`` asks,
    through `liandan.activation_checkpointing`, as for any other run). What remains: the base
    frozen, and its unquantized weights (embeddings, norms, output head) in fp32; under bf16 the
    loop stores the frozen ones in bf16 again (`liandan.training_setup.freeze_in_bf16`), as for
    plain LoRA."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def quantized_layers(model: Any) -> int:
    """How many of the model's weights are stored in 4 bits (bitsandbytes' ``Params4bit``)."""
    return sum(type(p).__name__ == "Params4bit" for p in model.parameters())


def manifest_entry(config: TrainConfig) -> dict:
    """The manifest's "quantize" block: how the base was held while the adapter was trained."""
    return {"mode": config.quantize, "quant_type": "nf4", "double_quant": True,
            "compute_dtype": str(compute_dtype(config.mixed_precision)).removeprefix("torch.")}  # fmt: skip
