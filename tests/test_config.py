import pytest

from liandan.config import LoraConfig, SFTConfig, load_config
from liandan.errors import LiandanError


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
