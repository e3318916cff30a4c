"""conf/data/*.yaml against the DataConfig schema, composed the way Hydra composes train.yaml."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from moe.data import DataConfig, as_data_config
from moe.data.config import SOURCES

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


# Presets named after a source select it; the others are named variants of one source.
VARIANTS = {"planted": "synthetic"}


def test_every_source_has_its_preset():
    assert sorted(PRESETS) == sorted([*SOURCES, *VARIANTS])


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_merges_onto_schema(preset):
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / "data" / f"{preset}.yaml"))
    cfg = as_data_config(node)
    assert isinstance(cfg, DataConfig) and cfg.source == VARIANTS.get(preset, preset)


def test_builtin_preset_is_exactly_the_schema_defaults():
    """Defaults live only in the dataclass; builtin.yaml just picks the source."""
    node = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(CONF / "data" / "builtin.yaml"))
    assert OmegaConf.to_object(node) == DataConfig()


def test_every_knob_is_documented_in_the_presets():
    docs = "\n".join(
        line
        for p in (CONF / "data").glob("*.yaml")
        for line in p.read_text().splitlines()
        if line.lstrip().startswith("#")
    )
    top = [f.name for f in dataclasses.fields(DataConfig)]
    for name in top:
        assert re.search(rf"#\s+{re.escape(name)}\b", docs), f"data.{name} is not documented in conf/data"
    for group in ("builtin", "synthetic", "local", "hf"):
        sub = type(getattr(DataConfig(), group))
        for f in dataclasses.fields(sub):
            assert f"{group}.{f.name}" in docs, f"data.{group}.{f.name} is not documented in conf/data"


def test_misspelt_key_fails_at_composition():
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"seq_length": 128})
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"builtin": {"domain": ["code"]}})
    with pytest.raises(ValidationError):
        OmegaConf.merge(OmegaConf.structured(DataConfig), {"seq_len": "long"})


@dataclass
class _Root:
    # A stand-in for TrainConfig: `data: DataConfig` filled from the `data` group.
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"data": "builtin"}])
    data: DataConfig = field(default_factory=DataConfig)


def test_hydra_composes_each_preset_with_overrides():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="_moe_data_test_root", node=_Root)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("_moe_data_test_root")
        assert as_data_config(cfg.data) == DataConfig()
        cfg = compose(
            "_moe_data_test_root", overrides=["data=synthetic", "data.synthetic.overlap=0.5", "data.seq_len=32"]
        )
        data = as_data_config(cfg.data)
        assert data.source == "synthetic" and data.synthetic.overlap == 0.5 and data.seq_len == 32
        cfg = compose("_moe_data_test_root", overrides=["data=hf"])
        assert as_data_config(cfg.data).hf.domain_field == "meta.pile_set_name"
        cfg = compose(
            "_moe_data_test_root", overrides=["data=local", "data.local.path=/tmp/x", "++data.mixture={a: 2.0, b: 1.0}"]
        )
        assert as_data_config(cfg.data).mixture == {"a": 2.0, "b": 1.0}
        with pytest.raises(Exception, match="seq_length"):
            compose("_moe_data_test_root", overrides=["data.seq_length=3"])
