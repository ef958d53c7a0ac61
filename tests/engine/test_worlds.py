"""The world interface: a world owns its config section, the core knows only the interface."""
import re
from pathlib import Path

import pytest

from sail.engine.config import config_from_dict, config_to_dict, load_config
from sail.engine.configtree import ConfigError
from sail.engine.worlds import PickapicWorld, make_world

REPO = Path(__file__).resolve().parents[2]


def test_the_toy_section_is_built_by_the_toy_world_and_written_back_under_its_name():
    cfg = load_config("toy_cpu.json", ["toy.world.oracle=tests.datagen:brightness_oracle", "toy.world.seed=3"])
    world = make_world(cfg)
    assert type(world).__name__ == "ToyWorld" and world.evaluates
    assert world.settings.world.oracle == "tests.datagen:brightness_oracle" and world.settings.world.seed == 3
    data = config_to_dict(cfg)
    assert "world_settings" not in data and data["toy"]["world"]["seed"] == 3 and data["world"] == "toy"
    assert config_from_dict(data) == cfg                                   # round trip through the JSON shape


def test_a_section_of_another_world_and_unknown_keys_are_refused_naming_them():
    with pytest.raises(ConfigError, match=r"x\.json: toy: the section of world 'toy', but this run's world is 'pickapic'"):
        config_from_dict({"toy": {"data_dir": "d"}}, "x.json")
    with pytest.raises(ConfigError, match=r"x\.json: unknown key 'toy\.enabled'"):
        config_from_dict({"world": "toy", "toy": {"enabled": True}}, "x.json")
    with pytest.raises(ConfigError, match=r"x\.json: world: unknown 'moon'; worlds: pickapic, toy"):
        config_from_dict({"world": "moon"}, "x.json")
    with pytest.raises(ConfigError, match=r"x\.json: toy\.world\.sampling\.steps: must be >= 1"):
        config_from_dict({"world": "toy", "toy": {"world": {"sampling": {"steps": 0}}}}, "x.json")


def test_a_partial_sampling_section_changes_only_the_keys_it_names():
    cfg = config_from_dict({"world": "toy", "toy": {"world": {"sampling": {"steps": 3}}}})
    sampling = cfg.world_settings.world.sampling
    assert (sampling.steps, sampling.guidance_scale, sampling.batch_size) == (3, 1.5, 512)   # the world's CFG kept
    sail = config_from_dict({"sail": {"sampling": {"steps": 3}}}).sail.sampling
    assert (sail.steps, sail.guidance_scale, sail.batch_size) == (3, 7.5, 64)


def test_the_default_world_is_the_users_files():
    cfg = config_from_dict({})
    assert cfg.world == "pickapic" and isinstance(make_world(cfg), PickapicWorld)
    assert cfg.world_settings.seed_pairs is None and not cfg.world_settings.recipe     # no split: prompt files
    assert not make_world(cfg).evaluates


@pytest.mark.parametrize("module", ["config.py", "run.py", "controller.py", "diagnostics.py"])
def test_the_core_does_not_reach_into_the_toy_world(module):
    text = (REPO / "engine" / module).read_text()
    assert not re.search(r"import .*toy|from sail\.engine\.toy|toy\.enabled|cfg\.toy", text), module
