"""Find and load models and their tokenizers.

A model argument is one of:

- ``default`` (or nothing): SmolLM2-135M-Instruct, fetched and converted on first use
  (`liandan.default_model`), then loaded from its local safetensors copy,
- a local Hugging Face model directory (``config.json`` + safetensors weights),
- a local ``.gguf`` file,
- a Hugging Face Hub id (``owner/name``), where a hub is reachable.

    from liandan.models import load_model, release_model
    model, tokenizer = load_model("default")          # device and dtype picked automatically
    release_model(model)                              # frees memory, accelerator cache included

Security: ``trust_remote_code`` is off unless asked for, and pickled weights (``*.bin``, ``*.pt``)
are refused unless ``allow_pickle=True``, since unpickling can run arbitrary code.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import yaml
from huggingface_hub import constants, try_to_load_from_cache
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checkpoints import check_run_complete
from .default_model import DEFAULT_MODEL, DEFAULT_MODEL_NAME, default_model_dir, ensure_default_model
from .devices import pick_device, pick_dtype
from .errors import LiandanError
from .files import file_sha256
from .gguf_reading import check_gguf_file, drop_quantizer
from .records import HUB_ID

# Files that hold weights, by how they are read.
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from the user's model argument."""

    spec: str
    """The argument as the user gave it (shown in tables and reports)."""
    kind: str
    """One of: ``default``, ``hf_dir``, ``gguf``, ``hub``, ``adapter`` (a LoRA run directory)."""
    location: str
    """Directory, file or hub id to load from."""

    @property
    def name(self) -> str:
        return DEFAULT_MODEL_NAME if self.kind == "default" else self.spec


def resolve_model(spec: str | os.PathLike | None) -> ModelSource:
    """Turn a model argument into a `ModelSource`, checking local paths before anything loads."""
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    if spec in ("", DEFAULT_MODEL):
        return ModelSource(DEFAULT_MODEL, "default", str(default_model_dir()))
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LiandanError(
                f"model '{spec}': a file must be a .gguf model; for a Hugging Face model "
                "pass its directory"
            )
        check_gguf_file(path)
        return ModelSource(spec, "gguf", str(path))
    if path.is_dir():
        check_run_complete(path)  # a run whose final save never finished is not a model yet
        if (path / "adapter_config.json").is_file():
            return ModelSource(spec, "adapter", str(path))
        check_model_dir(path)
        return ModelSource(spec, "hf_dir", str(path))
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", spec)
    raise LiandanError(
        f"model '{spec}' not found: it is not a local directory or .gguf file, nor a Hugging Face "
        "hub id (owner/name); use 'default' for the built-in SmolLM2-135M-Instruct"
    )


def check_models(specs: list[str]) -> list[ModelSource]:
    """Check every model argument before any work, and fetch the default model now if one of them
    is ``default`` (its first-time conversion shows its own progress, which cannot nest inside a
    command's progress bar)."""
    sources = [resolve_model(spec) for spec in specs]
    if any(source.kind == "default" for source in sources):
        ensure_default_model()
    return sources


def check_model_dir(path: Path) -> None:
    """A model directory needs a config and weights; pickled-only weights are flagged here."""
    if not (path / "config.json").is_file():
        raise LiandanError(
            f"model directory '{path}' has no config.json: expected a Hugging Face model "
            "directory (config.json + model.safetensors) or a .gguf file"
        )
    if not weight_files(path, SAFE_WEIGHTS) and not weight_files(path, PICKLED_WEIGHTS):
        raise LiandanError(
            f"model directory '{path}' has no weights: expected model.safetensors "
            "(or sharded model-*.safetensors with model.safetensors.index.json)"
        )


def weight_files(path: Path, names: tuple[str, ...]) -> list[Path]:
    found = [path / n for n in names if (path / n).is_file()]
    if names is SAFE_WEIGHTS:
        found += sorted(path.glob("model-*-of-*.safetensors"))
    return found


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(
    spec: str | os.PathLike | None = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    quantization: Any = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` ready for inference (eval mode, on the chosen device).

    ``quantization``: a transformers quantization config (`liandan.quantization`); the weights
    are then quantized as they load, straight onto ``device`` (a quantized model cannot be moved
    or cast afterwards), and ``dtype`` applies to the weights left unquantized."""
    source = resolve_model(spec)
    if quantization is not None and source.kind in ("gguf", "adapter"):
        raise LiandanError(f"model '{source.spec}': only safetensors weights are quantized as they load, not a {source.kind}")
    if source.kind == "default":
        ensure_default_model()
    elif source.kind == "hub":
        check_hub_reachable(source)
    device = pick_device(device)
    torch_dtype = pick_dtype(dtype, device)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    if source.kind == "adapter":
        model = _load_adapter_run(source, tokenizer, torch_dtype, trust_remote_code, allow_pickle)
    else:
        placement = {"quantization_config": quantization, "device_map": {"": device}} if quantization is not None else {}
        model = _load_weights(source, torch_dtype, trust_remote_code, allow_pickle, **placement)
    if quantization is None:
        model.to(device)
    model.eval()
    model.liandan_source = source
    return model, tokenizer


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False) -> Any:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    where, gguf_file = _where(source)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as exc:  # transformers raises many types; the user needs one line
        raise LiandanError(f"could not load the tokenizer of '{source.spec}': {_short(exc)}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Batched generation needs a pad token; eos is safe because padding is masked out.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_hub_reachable(source: ModelSource, timeout: float = 5.0) -> None:
    """Fail in seconds with one line when a hub model is neither cached nor reachable, instead of
    minutes of retries ending in a traceback."""
    if isinstance(try_to_load_from_cache(source.location, "config.json"), str):
        return  # in the local Hugging Face cache
    advice = "pass a local model directory or .gguf file, or 'default' for the built-in model"
    if constants.HF_HUB_OFFLINE:
        raise LiandanError(f"model '{source.spec}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {advice}")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        raise LiandanError(f"model '{source.spec}': cannot reach the Hugging Face Hub at {host} ({exc}); {advice}") from None


def _where(source: ModelSource) -> tuple[str, str | None]:
    if source.kind == "gguf":
        path = Path(source.location)
        return str(path.parent), path.name
    return source.location, None


def _load_weights(source: ModelSource, torch_dtype: Any, trust_remote_code: bool, allow_pickle: bool, **placement: Any):
    where, gguf_file = _where(source)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, **placement}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    elif source.kind == "hub":
        kwargs["use_safetensors"] = None if allow_pickle else True
    else:
        path = Path(where)
        if not weight_files(path, SAFE_WEIGHTS):
            if not allow_pickle:
                pickled = ", ".join(p.name for p in weight_files(path, PICKLED_WEIGHTS))
                raise LiandanError(
                    f"model directory '{path}' has only pickled weights ({pickled}); loading "
                    "pickles can run arbitrary code. Pass --allow-pickle if you trust this model, "
                    "or convert it to safetensors"
                )
            kwargs["use_safetensors"] = False
        else:
            kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except Exception as exc:
        hint = ""
        if source.kind == "hub":
            hint = " (if this machine is offline, pass a local model directory or .gguf file)"
        raise LiandanError(f"could not load model '{source.spec}': {_short(exc)}{hint}") from exc
    if gguf_file:
        drop_quantizer(model)
    return model


def adapter_base(run_dir: Path) -> str:
    """The base model a LoRA run was trained on, checked before anything loads.

    From the run's manifest: a hub id or ``default`` only where the user wrote one; a local path
    resolved against the run directory (never the current directory, and never looked up on the
    hub when it is missing), and its weights checked against the hash the manifest recorded.
    Without a manifest, the path PEFT recorded."""
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        return manifest_base(run_dir, json.loads(manifest.read_text())["base_model"])
    recorded = json.loads((run_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not recorded:
        raise LiandanError(f"'{run_dir}': adapter_config.json does not name its base model")
    return recorded


def manifest_base(run_dir: Path, base: dict) -> str:
    """The manifest's ``base_model`` as a model argument for `load_model`; see `adapter_base`."""
    spec, kind = str(base["spec"]), base.get("kind")
    if kind == "hub":
        return spec
    if kind == "default":
        _check_base_hash(run_dir, spec, resolve_model(spec).location, base.get("weights_sha256"))
        return spec
    candidates = _base_candidates(run_dir, spec, base)
    found = next((path for path in candidates if path.exists()), None)
    if found is None:
        tried = ", ".join(f"'{path}'" for path in candidates)
        raise LiandanError(
            f"run '{run_dir}': its base model '{spec}' (a local {kind or 'model'}) is not at {tried}; put it back, "
            "or set base_model.path_from_run in the run's manifest.json (it is never fetched from the hub instead)"
        )
    _check_base_hash(run_dir, spec, str(found), base.get("weights_sha256"))
    return str(found.resolve())


def _base_candidates(run_dir: Path, spec: str, base: dict) -> list[Path]:
    """Where a local base model may be: recorded relative to the run directory, as an absolute
    path, or (older manifests) the training command's path re-based from its output_dir."""
    if base.get("path_from_run"):
        return [run_dir / base["path_from_run"]]
    path = Path(spec).expanduser()
    if path.is_absolute():
        return [path]
    output_dir = _recorded_output_dir(run_dir)
    if output_dir is not None and not Path(output_dir).expanduser().is_absolute():
        return [run_dir / os.path.relpath(spec, output_dir)]
    # The training command's directory is unknown; the current one is tried only when the
    # recorded weights hash can confirm it is the same model.
    return [run_dir / spec, *([path] if base.get("weights_sha256") else [])]


def _recorded_output_dir(run_dir: Path) -> str | None:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    try:
        loaded = yaml.safe_load(config.read_text())
    except yaml.YAMLError:
        return None
    value = loaded.get("output_dir") if isinstance(loaded, dict) else None
    return str(value) if value else None


def _check_base_hash(run_dir: Path, spec: str, location: str, recorded: str | None) -> None:
    """A base model whose weights changed since the run was trained would load and run, wrongly."""
    if not recorded:
        return
    weights = weights_file(location)
    if weights is None:
        return  # not on disk yet (the default model before its first use is fetched by load_model)
    actual = weights_sha256(location)
    if actual != recorded:
        raise LiandanError(
            f"run '{run_dir}': the base model '{spec}' at '{weights}' has changed since the run was trained "
            f"(sha256 {actual[:12]}..., the manifest recorded {recorded[:12]}...); use the weights it was trained on"
        )


def weights_file(location: str | Path) -> Path | None:
    """The one file holding a model's weights: ``model.safetensors`` of a model directory, or the
    file itself (a GGUF); None for a hub id, or weights sharded over several files."""
    path = Path(location)
    for candidate in (path / "model.safetensors", path):
        if candidate.is_file():
            return candidate
    return None


_HASHES: dict[tuple[str, int, int], str] = {}


def weights_sha256(location: str | Path) -> str | None:
    """The SHA-256 of `weights_file`, computed once per process for a given path, size and mtime
    (the manifest records it, and loading a run checks its base model against it)."""
    path = weights_file(location)
    if path is None:
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def _load_adapter_run(source: ModelSource, tokenizer: Any, torch_dtype: Any, trust_remote_code: bool, allow_pickle: bool):
    """Base model + the run's LoRA adapter, merged in fp32 and then cast to ``torch_dtype``.

    Merging before casting makes a run directory compute exactly what ``liandan merge`` of it
    computes at the same dtype: in bf16, an unmerged adapter (W x + B A x, each rounded) and the
    merged weight (W + B A, rounded once) give slightly different logits, and greedy text can
    then differ. It is also faster: no adapter matmuls at inference.
    """
    merged = load_adapter_model(Path(source.location), trust_remote_code=trust_remote_code,
                                allow_pickle=allow_pickle, tokenizer=tokenizer).merge_and_unload()  # fmt: skip
    return cast_weights(merged, torch_dtype)


def cast_weights(model: Any, torch_dtype: Any) -> Any:
    """Cast floating-point parameters as ``from_pretrained(dtype=...)`` would. ``model.to(dtype)``
    would also cast buffers such as the rotary frequencies, which transformers keeps in fp32,
    and the logits would differ from a model loaded at that dtype."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if param.is_floating_point() and not any(k in name for k in keep):
            param.data = param.data.to(torch_dtype)
    model.config.dtype = torch_dtype
    return model


def load_adapter_model(run_dir: Path, *, tokenizer: Any = None, trust_remote_code: bool = False,
                       allow_pickle: bool = False, trainable: bool = False) -> Any:  # fmt: skip
    """The PEFT model of a LoRA run directory in fp32, adapters not merged (to train further,
    or to check a merge against)."""
    base, _ = load_model(adapter_base(run_dir), device="cpu", dtype="float32",
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)  # fmt: skip
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(resolve_model(str(run_dir)))
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))  # the run added tokens (ChatML for a base model)
    try:
        return PeftModel.from_pretrained(base, str(run_dir), is_trainable=trainable)
    except Exception as exc:
        raise LiandanError(f"could not load the adapter in '{run_dir}': {_short(exc)}") from exc


def context_length(model: Any) -> int | None:
    """The most positions the model was built for (prompt and reply together), if it says."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def release_model(model: Any) -> None:
    """Free a model's memory now, accelerator cache included, so the next one fits."""
    try:
        model.to("meta")  # drops the parameter storage even if a caller still holds a reference
    except Exception:
        pass
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()
    _return_freed_memory_to_os()


def _return_freed_memory_to_os() -> None:
    """glibc keeps freed heap memory for reuse, so a released model (for example one cast to bf16
    at load time) would still count against the process; malloc_trim hands it back."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        pass


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
