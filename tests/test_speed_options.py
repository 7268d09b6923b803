"""ft_train.speed: the network takes no speed option; SpeedOptions states every rule once and
names the key to change; apply() puts the options on a built network and can change them again."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from ft_train.models import FantasyTalkingDiT, build_model
from ft_train.speed import SpeedOptions, apply, speed_state
from ft_train.speed.fp8 import Fp8FrozenLinear


def test_the_network_takes_no_speed_option():
    params = set(inspect.signature(FantasyTalkingDiT.__init__).parameters)
    assert params == {"self", "transformer", "audio_mode", "audio_in_dim", "audio_proj_dim", "audio_expand",
                      "train_backbone", "identity", "motion", "lora"}
    assert not params & set(SpeedOptions.keys())
    speed_methods = ("set_checkpointing", "compile_blocks", "set_frozen_fp8", "set_attention_backend",
                     "set_self_attention_kernel", "pick_self_attention_kernel", "fp8_buffer_names")
    assert not [m for m in speed_methods if hasattr(FantasyTalkingDiT, m)]


def test_speed_options_are_the_model_keys_users_type():
    import yaml

    from tests.conftest import CONF

    for name in ("tiny", "wan2.1_i2v_14b"):
        keys = set(yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text()))
        assert set(SpeedOptions.keys()) <= keys, name


@pytest.mark.parametrize("options, context, message", [
    (dict(checkpoint_keep=1), {}, "model.checkpoint_keep=1 needs model.gradient_checkpointing=true"),
    (dict(checkpoint_keep="auto"), {}, "model.checkpoint_keep=auto needs model.gradient_checkpointing=true"),
    (dict(gradient_checkpointing=True, checkpoint_keep="most"), {}, "model.checkpoint_keep must be a number of blocks or auto"),
    (dict(gradient_checkpointing=True, checkpoint_keep=-1), {}, "model.checkpoint_keep must be between 0 and"),
    (dict(gradient_checkpointing=True, checkpoint_keep=3), dict(num_blocks=2), "model.checkpoint_keep must be between 0 and 2"),
    (dict(checkpoint_offload=True), {}, "model.checkpoint_offload=true needs model.gradient_checkpointing=true"),
    (dict(checkpoint_save_attention=True), {}, "model.checkpoint_save_attention=true needs model.gradient_checkpointing=true"),
    (dict(gradient_checkpointing=True, checkpoint_offload=True, checkpoint_save_attention=True), {},
     "model.checkpoint_offload and model.checkpoint_save_attention cannot be combined"),
    (dict(frozen_fp8_backward=True), {}, "model.frozen_fp8_backward=true needs model.frozen_fp8=true"),
    (dict(frozen_fp8=True), dict(train_backbone=True), "model.frozen_fp8=true stores the frozen backbone in float8"),
    (dict(self_attention_kernel="fastest"), {}, "model.self_attention_kernel must be one of cudnn, flash, efficient, math"),
    (dict(self_attention_kernel="cudnn"), dict(accelerator="cpu"), "model.self_attention_kernel=cudnn needs a CUDA GPU"),
    (dict(self_attention_kernel="efficient"), dict(accelerator="cpu"), "model.self_attention_kernel=efficient needs a CUDA GPU"),
])
def test_impossible_combinations_are_refused_naming_the_key(options, context, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SpeedOptions(**options).validate(**context)


def test_possible_combinations_pass():
    for options in (dict(), dict(gradient_checkpointing=True, checkpoint_keep="auto", checkpoint_memory_gib=40),
                    dict(gradient_checkpointing=True, checkpoint_offload=True, checkpoint_keep=2, frozen_fp8=True),
                    dict(gradient_checkpointing=True, checkpoint_save_attention=True, compile_blocks=True,
                         frozen_fp8=True, frozen_fp8_backward=True, self_attention_kernel="auto")):
        SpeedOptions(**options).validate(train_backbone=False, accelerator="gpu", num_blocks=2)
    SpeedOptions(self_attention_kernel="cudnn").validate(accelerator="gpu")


def test_split_separates_the_speed_keys_from_the_network_keys():
    rest, speed = SpeedOptions.split({"audio_mode": "frame", "gradient_checkpointing": True, "checkpoint_keep": 1})
    assert rest == {"audio_mode": "frame"} and speed == SpeedOptions(gradient_checkpointing=True, checkpoint_keep=1)


def test_apply_checks_against_the_network_and_changes_options_again(tiny_transformer_config):
    net = build_model(transformer=dict(tiny_transformer_config), train_backbone=True)
    with pytest.raises(ValueError, match="model.frozen_fp8=true stores the frozen backbone"):
        apply(net, SpeedOptions(frozen_fp8=True))
    with pytest.raises(ValueError, match="model.checkpoint_keep must be between 0 and 2"):
        apply(net, SpeedOptions(gradient_checkpointing=True, checkpoint_keep=3))

    net = build_model(transformer=dict(tiny_transformer_config))
    state = apply(net, SpeedOptions(gradient_checkpointing=True, checkpoint_keep="auto", checkpoint_memory_gib=3))
    assert state is speed_state(net) and net.transformer.gradient_checkpointing
    assert state.checkpoint_auto and state.checkpoint_keep == 1 and state.checkpoint_memory_gib == 3
    apply(net, SpeedOptions(gradient_checkpointing=True, checkpoint_offload=True, checkpoint_keep=2))
    assert not state.checkpoint_auto and state.checkpoint_offload and state.checkpoint_keep == 2
    apply(net, SpeedOptions(frozen_fp8=True, compile_blocks=True))
    assert not net.transformer.gradient_checkpointing and state.checkpoint_keep == 0 and not state.checkpoint_offload
    assert state.frozen_fp8 and state.compile_options == {}
    assert all(b._compiled_call_impl is not None for b in net.transformer.blocks)
    assert any(isinstance(m, Fp8FrozenLinear) for m in net.modules())
    apply(net, SpeedOptions(frozen_fp8=True))
    assert state.compile_options is None and all(b._compiled_call_impl is None for b in net.transformer.blocks)
    with pytest.raises(ValueError, match="model.frozen_fp8=false: .*one-way"):
        apply(net, SpeedOptions())


def test_gpu_kernel_is_refused_at_forward_on_the_cpu(tiny_transformer_config):
    net = build_model(transformer=dict(tiny_transformer_config), self_attention_kernel="efficient")
    x = dict(hidden_states=torch.randn(1, 36, 1, 8, 8), timestep=torch.tensor([500.0]),
             text=torch.zeros(1, 512, 4096), image=torch.zeros(1, 257, 1280))
    with pytest.raises(ValueError, match="model.self_attention_kernel=efficient needs a CUDA GPU"):
        net(**x)
    apply(net, SpeedOptions())
    assert net(**x).shape == (1, 16, 1, 8, 8)
