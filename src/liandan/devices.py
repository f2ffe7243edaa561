"""Choosing the device and the dtype a model runs in.

    from liandan.devices import pick_device, pick_dtype
    device = pick_device("auto")            # cuda, then mps, then cpu
    dtype = pick_dtype("auto", device)      # bf16 where the hardware computes it natively
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import LiandanError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(device: str = "auto") -> str:
    """``auto`` -> cuda, then mps, then cpu. An explicit device is checked, not trusted."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise LiandanError(f"--device {device}: CUDA is not available on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise LiandanError(f"--device {device}: MPS is not available on this machine")
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        raise LiandanError(f"--device {device}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_supports_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 / AMX), where bf16 is faster than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(dtype: str, device: str) -> Any:
    """``auto`` -> bf16 where the hardware computes it natively, else fp32 (fp16 on old GPUs)."""
    if dtype not in DTYPES:
        raise LiandanError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return getattr(torch, dtype)
    kind = device.split(":")[0]
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return torch.float32
