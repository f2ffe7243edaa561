import dataclasses

import pytest

from liandan.config import DPOConfig, GRPOConfig, LoraConfig, PretrainConfig, SFTConfig, TrainConfig, load_config, resume_config
from liandan.errors import LiandanError
from liandan.prompts import shipped_example


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: default\ndata: [a.jsonl]\nlr: 1e-3\nlora:\n  rank: 4\n")
    config = load_config(SFTConfig, recipe, ["lr=1e-4", "lora.rank=8", "packing=false", "data=b.jsonl"])
    assert config.lr == 1e-4 and config.lora == LoraConfig(rank=8) and config.packing is False
    assert config.data == ["b.jsonl"]


def test_yes_no_words_stay_strings_on_the_command_line():
    assert load_config(SFTConfig, None, ["mixed_precision=no"]).mixed_precision == "no"


def test_int_accepted_for_float_and_keyword_values():
    config = load_config(SFTConfig, None, ["lr=1"], output_dir="runs/x")
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.output_dir == "runs/x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("learning_rate=1e-4", "unknown setting 'learning_rate'"),
        ("lora.rnak=8", "unknown setting 'lora.rnak'; did you mean 'lora.rank'?"),
        ("lr=fast", "setting 'lr': expected float, got 'fast'"),
        ("packing=3", "setting 'packing': expected bool"),
        ("lr", "--set 'lr': expected key=value"),
        ("lora.rank=0", "lora.rank must be at least 1"),
        ("grad_accum=0", "grad_accum must be at least 1"),
        ("log_every=0", "log_every must be at least 1"),
        ("max_grad_norm=nan", "max_grad_norm must be a finite number, 0 (off) or more (got nan)"),
        ("max_grad_norm=.inf", "max_grad_norm must be a finite number"),
        ("lr=nan", "lr must be a finite number above 0"),
        ("epochs=.inf", "epochs must be a finite number"),
        ("weight_decay=nan", "weight_decay must be a finite number"),
        ("save_every=-1", "save_every must be 0 (no checkpoints) or more"),
        ("save_total_limit=-1", "save_total_limit must be 0 (keep all) or more"),
        ("max_bad_steps=0", "max_bad_steps must be at least 1"),
        ("eval_every=-1", "eval_every must be 0"),
    ],
)
def test_bad_settings_are_clear(override, message):
    with pytest.raises(LiandanError) as info:
        load_config(SFTConfig, None, [override])
    assert message in str(info.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1\nlora: [\n")
    with pytest.raises(LiandanError, match=r"r\.yaml:\d+: not valid YAML"):
        load_config(SFTConfig, recipe)


@pytest.mark.parametrize(
    "cls, override, message",
    [
        (PretrainConfig, "packing=true", "pretrain: unknown setting 'packing' (a setting of sft, which pretrain does not use)"),
        (DPOConfig, "format=alpaca", "dpo: unknown setting 'format' (a setting of sft, which dpo does not use)"),
        (PretrainConfig, "beta=0.2", "pretrain: unknown setting 'beta' (a setting of dpo and grpo, which pretrain does not use)"),
        (SFTConfig, "beta=0.5", "sft: unknown setting 'beta' (a setting of dpo and grpo, which sft does not use)"),
        (SFTConfig, "warmup_ration=0.1", "sft: unknown setting 'warmup_ration'; did you mean 'warmup_ratio'?"),
        (DPOConfig, "betta=0.2", "dpo: unknown setting 'betta'; did you mean 'beta'?"),
        (PretrainConfig, "zzz=1", "pretrain: unknown setting 'zzz'; the nearest valid key is"),
    ],
)
def test_a_setting_the_stage_does_not_use_is_refused_with_the_nearest_key(cls, override, message):
    with pytest.raises(LiandanError) as info:
        load_config(cls, None, [override])
    assert message in str(info.value)


def test_every_stage_setting_is_its_own_or_shared():
    """Each stage has exactly the shared settings plus its own; none inherits another stage's."""
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    own = {cls: {f.name for f in dataclasses.fields(cls)} - shared for cls in (SFTConfig, DPOConfig, PretrainConfig)}
    assert own[SFTConfig] == {"format", "skip_invalid", "packing", "replay", "replay_ratio", "replay_prompts",
                              "replay_max_new_tokens", "tools_template"}  # fmt: skip
    assert own[DPOConfig] == {"beta", "label_smoothing", "loss", "sft_weight", "simpo_gamma", "desirable_weight", "undesirable_weight"}
    assert own[PretrainConfig] == set()  # its own defaults only (max_length is the block size)
    assert (DPOConfig().lr, PretrainConfig().max_length, SFTConfig().lr) == (5e-5, 512, 2e-4)


def test_a_yaml_recipe_with_another_stages_setting_names_the_stage(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: [a.txt]\nreplay: self\n")
    with pytest.raises(LiandanError, match="pretrain: unknown setting 'replay' \\(a setting of sft"):
        load_config(PretrainConfig, recipe)


def test_shipped_recipes_load_with_their_stage():
    for cls, name in ((SFTConfig, "sft-pirate.yaml"), (DPOConfig, "dpo-onesent.yaml"), (PretrainConfig, "pretrain-veloria.yaml"),
                      (GRPOConfig, "grpo-onesent.yaml")):  # fmt: skip
        assert load_config(cls, shipped_example(name)).data


def test_resume_names_the_run_settings_and_refuses_remote_code_from_them(tmp_path, capsys):
    assert resume_config(str(tmp_path), []) is None  # no config.yaml: the command line's settings
    (tmp_path / "config.yaml").write_text("model: someone/else\ntrust_remote_code: true\n")
    with pytest.raises(LiandanError, match="sets trust_remote_code: true.*--set trust_remote_code=true"):
        resume_config(str(tmp_path), [])
    assert resume_config(str(tmp_path), ["trust_remote_code=true"]) == tmp_path / "config.yaml"
    assert "resuming with the settings in" in capsys.readouterr().err


def test_safety_defaults():
    config = SFTConfig()
    assert config.save_every > 0 and config.save_total_limit == 2 and config.max_bad_steps == 3
    assert config.resume_changed is False and config.trust_remote_code is False
