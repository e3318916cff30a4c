"""Shared fixtures: every test writes its runs and data cache under pytest's tmp dirs."""

import pytest
from hydra import compose, initialize_config_module

from moe.config import register_configs, to_train_config


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MOE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture
def compose_train():
    """compose_train(*overrides) -> validated TrainConfig from the real conf/ tree."""
    register_configs()

    def _compose(*overrides: str):
        with initialize_config_module(config_module="moe.conf", version_base="1.3"):
            return to_train_config(compose(config_name="train", overrides=list(overrides)))

    return _compose
