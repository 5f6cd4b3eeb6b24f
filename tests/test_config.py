from pathlib import Path

import pytest

from spikewalze_cli.config import load_config, parse_override
from spikewalze_cli.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "small", "base"])
def test_shipped_configs_validate(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.model.d_model % config.model.n_head == 0


def test_override_parses_yaml_values():
    config = load_config(CONFIGS / "tiny.yaml", ["train.lr=1e-2", "eval.contexts=[256, 512]", "train.peak_flops=null"])
    assert config.train.lr == 1e-2
    assert config.eval.contexts == [256, 512]
    assert config.train.peak_flops is None


def test_unknown_key_names_closest_key():
    with pytest.raises(UserError, match=r"unknown config key 'model.n_layr'; did you mean 'model.n_layer'"):
        load_config(CONFIGS / "tiny.yaml", ["model.n_layr=3"])


def test_out_of_range_value_names_key_and_value():
    with pytest.raises(UserError, match=r"invalid value -0.1 for config key 'train.lr'"):
        load_config(None, ["train.lr=-0.1"])


def test_window_larger_than_context_rejected():
    with pytest.raises(UserError, match=r"window \(512\) must not exceed context \(256\)"):
        load_config(None, ["model.context=256", "model.window=512"])


def test_yaml_syntax_error_gives_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 2\n  d_model: [128\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.yaml: YAML syntax error at line \d+"):
        load_config(bad)


def test_override_without_equals_rejected():
    with pytest.raises(UserError, match="expected dotted.key=value"):
        parse_override("train.lr")


def test_section_rule_names_section():
    with pytest.raises(UserError, match=r"invalid config section 'train': min_lr \(0.5\) must not exceed lr"):
        load_config(None, ["train.min_lr=0.5"])


def test_override_error_names_command_line():
    with pytest.raises(UserError, match=r"^command line: unknown config key 'train.max_step'"):
        load_config(CONFIGS / "tiny.yaml", ["train.max_step=3"])


def test_infinite_value_rejected():
    with pytest.raises(UserError, match=r"'generate.temperature': Input should be a finite number"):
        load_config(None, ["generate.temperature=.inf"])
