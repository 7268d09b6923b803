"""The `speed` config group: presets of the model's speed options that ft-train builds the model
with, over whichever model file the command line or an experiment picks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate

from ft_train.speed.fp8 import Fp8FrozenLinear
from ft_train.train import check_model_options
from ft_train.speed import speed_state

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "speed").glob("*.yaml"))


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def preset_keys(name: str) -> dict:
    return yaml.safe_load((CONF / "speed" / f"{name}.yaml").read_text()) or {}


def test_presets_are_the_documented_ones_and_set_only_model_keys():
    assert PRESETS == ["compiled", "fp8", "none", "offload", "single_24gb"]
    model_keys = set(yaml.safe_load((CONF / "model" / "wan2.1_i2v_14b.yaml").read_text()))
    for name in PRESETS:
        assert (CONF / "speed" / f"{name}.yaml").read_text().startswith("# @package model\n"), name
        assert set(preset_keys(name)) <= model_keys, name
    assert preset_keys("none") == {}


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_holds_over_the_model_an_experiment_picks(name):
    """Experiments override /model; the preset still lands on top of that model file, and the
    model file's other keys stay."""
    plain = compose("experiment=stage2_14b", "model.pretrained=/weights/wan14b")
    cfg = compose("experiment=stage2_14b", "model.pretrained=/weights/wan14b", f"speed={name}")
    assert cfg.model.transformer.num_layers == 40
    for key in plain.model:
        expect = preset_keys(name).get(key, plain.model[key])
        assert cfg.model[key] == expect, key
    # A command-line key still beats the preset.
    cfg = compose("experiment=stage2_14b", f"speed={name}", "model.compile_blocks=false")
    assert cfg.model.compile_blocks is False


def test_presets_build_the_model_they_name():
    """Built through the same instantiate(cfg.model) as ft-train, on the tiny model (whose own
    file has checkpointing off: the presets turn it on for the options that work on it)."""
    def build(*overrides):
        cfg = compose(*overrides)
        check_model_options(cfg)  # ft-train's early check passes
        return instantiate(cfg.model)

    plain = build("model.gradient_checkpointing=true")
    assert speed_state(plain).compile_options is None and not speed_state(plain).checkpoint_auto and not speed_state(plain).frozen_fp8
    assert not speed_state(plain).self_attention_auto and not speed_state(plain).checkpoint_save_attention

    fast = build("speed=compiled")
    assert speed_state(fast).compile_options is not None  # every block compiled
    assert speed_state(fast).checkpoint_auto and speed_state(fast).checkpoint_keep == 1  # auto measures one kept block first
    assert speed_state(fast).checkpoint_save_attention and speed_state(fast).self_attention_auto and not speed_state(fast).frozen_fp8

    fp8 = build("speed=fp8")
    layers = [m for m in fp8.modules() if isinstance(m, Fp8FrozenLinear)]
    assert layers and all(m.fp8_backward for m in layers)
    assert speed_state(fp8).frozen_fp8 and speed_state(fp8).compile_options is not None and speed_state(fp8).checkpoint_save_attention

    long = build("speed=offload")
    assert speed_state(long).checkpoint_offload and speed_state(long).frozen_fp8 and speed_state(long).compile_options is not None
    assert not any(m.fp8_backward for m in long.modules() if isinstance(m, Fp8FrozenLinear))

    small = build("speed=single_24gb")
    state = speed_state(small)
    assert state.checkpoint_offload and state.frozen_fp8 and state.compile_options is None
    # auto: every block waits on the host until the first forward sizes it (on a card)
    assert state.block_swap_auto and len(state.block_swap.blocks) == small.num_blocks and state.block_swap.prefetch == 2


def test_fp8_presets_refuse_a_trained_backbone_naming_the_key():
    for name in ("fp8", "offload", "single_24gb"):
        cfg = compose(f"speed={name}", "model.train_backbone=true")
        with pytest.raises(ValueError, match=r"model.train_backbone=true\) \(speed=fp8, speed=offload and speed=single_24gb set it"):
            check_model_options(cfg)  # ft-train's check before anything is built
        with pytest.raises(Exception, match="model.train_backbone=false"):  # Hydra wraps the ValueError
            instantiate(cfg.model)
