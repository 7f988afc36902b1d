"""One way to merge a recipe and its flags, for every command: a flag typed wins and says so."""

import pytest

from lmstack.cli.main import build_parser
from lmstack.cli.train import _config
from lmstack.config import config_from_recipe
from lmstack.errors import ConfigError
from lmstack.train.config import SFTConfig

RECIPE = "recipes/train/sft-qlora-smollm2.yaml"  # sets epochs: 0.5


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_max_steps_on_the_command_line_beats_the_recipes_epochs(capsys):
    cfg = _config(parse("sft", RECIPE, "--max-steps", "10"))
    assert cfg.max_steps == 10 and cfg.epochs == 0
    assert "--max-steps 10 replaces the recipe's epochs: 0.5" in capsys.readouterr().err


def test_without_the_flag_the_recipes_epochs_stand(capsys):
    cfg = _config(parse("sft", RECIPE))
    assert cfg.epochs == 0.5
    assert capsys.readouterr().err == ""


def test_max_steps_and_epochs_both_typed_is_an_error():
    with pytest.raises(ConfigError, match="expected one of them"):
        _config(parse("sft", RECIPE, "--max-steps", "10", "--epochs", "1"))


def test_a_flag_that_changes_a_recipe_value_is_stated(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 0.001\nbatch_size: 4\n")
    said = []
    cfg = config_from_recipe(SFTConfig, recipe, parse("sft", "--lr", "0.01", "--batch-size", "4"), log=said.append)
    assert cfg.lr == 0.01 and cfg.batch_size == 4
    assert said == [f"--lr 0.01 overrides the recipe's lr: 0.001 ({recipe})"]  # batch_size is unchanged


@pytest.mark.parametrize("argv", [("sft", RECIPE, "--max-step", "3"), ("serve", "--max-slot", "2"),
                                  ("data", "prepare", "x.yaml", "--outp", "o")])
def test_abbreviated_flags_are_refused_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_recipe_that_is_not_a_mapping_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- lr: 1\n")
    with pytest.raises(ConfigError, match="expected a mapping of fields at the top level, got list"):
        _config(parse("sft", str(recipe)))
