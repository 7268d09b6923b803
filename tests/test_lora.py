"""LoRA on the DiT (``model.lora``): peft layers from diffusers' ``add_adapter``, trained with the
adapters; exact resume, EMA, checkpointing, fp8, compile; ``ft-export format=lora`` read back by
diffusers' own Wan LoRA loader; a diffusers-format file as ``model.init_from``."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from ft_train.lit import read_metric
from ft_train.models import build_model
from ft_train.models.lora import LoraSettings, read_lora_file
from ft_train.models.weights import read_checkpoint
from ft_train.train import train, validate_config

from .conftest import CONF

LORA = ("model.train_backbone=false", "model.lora.rank=4", "model.lora.alpha=8")


def config(out, run, steps, *extra):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[
            "experiment=tiny_cpu", f"paths.output_dir={out}", f"run_id={run}", "stages=null",
            f"stage.max_steps={steps}", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_steps=2",
            "callbacks.checkpoint.keep_last=10", "data.num_workers=0", *extra,
        ])


def inputs(seed=0, frames=3):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 36, frames, 8, 8, generator=g), timestep=torch.tensor([600.0]),
                text=torch.randn(1, 512, 4096, generator=g), image=torch.randn(1, 257, 1280, generator=g),
                audio=torch.randn(1, 20, 768, generator=g))


def randomise_lora(net, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in net.lora_state():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_lora_layers_are_peft_start_as_no_op_and_are_the_only_new_trainables(tiny_transformer_config):
    from peft.tuners.lora import Linear as LoraLinear

    torch.manual_seed(0)
    plain = build_model(transformer=tiny_transformer_config)
    torch.manual_seed(0)
    net = build_model(transformer=tiny_transformer_config, lora={"rank": 4, "alpha": 8})
    layer = net.transformer.blocks[1].attn2.to_out[0]
    assert isinstance(layer, LoraLinear) and layer.scaling["default"] == 2.0
    assert not isinstance(net.transformer.blocks[1].attn2.add_k_proj, LoraLinear)  # photo's CLIP k/v left alone
    wrapped = {n.rsplit(".lora_", 1)[0] for n, _ in net.lora_state()}
    assert len(wrapped) == 10 * 2  # default targets × 2 blocks
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == set(net.adapter_state_dict()) == set(plain.adapter_state_dict()) | {n for n, _ in net.lora_state()}
    assert all(p.dtype == torch.float32 for _, p in net.lora_state())
    with torch.no_grad():
        assert torch.equal(net(**inputs()), plain(**inputs()))  # B = 0: exactly the plain model
        randomise_lora(net)
        assert not torch.allclose(net(**inputs()), plain(**inputs()))


@pytest.mark.parametrize("override, message", [
    ("model.lora.rank=-1", "model.lora.rank"),
    ("model.lora.alpha=0", "model.lora.alpha"),
    ("model.lora.dropout=1.0", "model.lora.dropout"),
    ("model.lora.targets=[attn1.to_q,attn3.to_x]", "model.lora.targets: 'attn3.to_x'"),
    ("+model.lora.ranks=4", "model.lora.ranks"),
    ("model.lora.rank=4", "model.train_backbone=true"),  # tiny_cpu trains the backbone
])
def test_bad_lora_settings_fail_before_anything_is_built(tmp_path, override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("[", r"\[")):
        validate_config(config(tmp_path, "bad", 1, override))


def test_lora_file_as_init_from_needs_a_lora_rank(tmp_path, tiny_transformer_config):
    from safetensors.torch import save_file

    path = tmp_path / "style.safetensors"
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)}, str(path))
    with pytest.raises(ValueError, match="model.lora.rank"):
        validate_config(config(tmp_path, "x", 1, "model.train_backbone=false", f"model.init_from={path}"))
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        validate_config(config(tmp_path, "x", 1, *LORA, f"model.init_from={tmp_path / 'none.safetensors'}"))
    with pytest.raises(ValueError, match="model.lora.rank=4"):
        build_model(transformer=tiny_transformer_config, lora={"rank": 8}, init_from=str(path))


def test_resume_is_exact_with_lora_dropout_ema_and_checkpointing(tmp_path):
    extra = (*LORA, "model.lora.dropout=0.1", "callbacks.ema.decay=0.9", "model.gradient_checkpointing=true")
    full = train(config(tmp_path, "full", 5, *extra))
    train(config(tmp_path, "cut", 2, *extra))
    train(config(tmp_path, "cut", 5, *extra))
    a = read_metric(tmp_path / "full" / "clip" / "metrics.csv", "train/loss")
    b = read_metric(tmp_path / "cut" / "clip" / "metrics.csv", "train/loss")
    assert len(a[1]) == 5 and a == b
    ckpts = [read_checkpoint(tmp_path / run / "clip" / "checkpoints" / "step-00000005") for run in ("full", "cut")]
    lora_keys = {n for n in ckpts[0].tensors if ".lora_" in n}
    assert len(lora_keys) == 40 and lora_keys <= set(ckpts[0].ema)
    for name in ckpts[0].tensors:
        assert torch.equal(ckpts[0].tensors[name], ckpts[1].tensors[name]), name
        assert torch.equal(ckpts[0].ema[name], ckpts[1].ema[name]), name
    # the LoRA trained (B left zero) while the backbone did not move
    assert any(ckpts[0].tensors[n].abs().sum() > 0 for n in lora_keys if ".lora_B." in n)
    assert not any(n.startswith("transformer.") and ".lora_" not in n for n in ckpts[0].tensors)
    spec = json.loads((tmp_path / "full" / "clip" / "checkpoints" / "step-00000005" / "model_spec.json").read_text())
    assert spec["version"] == 2 and spec["lora"] == {"rank": 4, "alpha": 8, "dropout": 0.1,
                                                     "targets": list(LoraSettings().targets)}
    assert full["module"].net.lora_config.rank == 4


def test_frozen_fp8_keeps_the_base_in_float8_and_trains_the_lora(tiny_transformer_config):
    from ft_train.speed.fp8 import Fp8FrozenLinear

    torch.manual_seed(0)
    ref = build_model(transformer=tiny_transformer_config, lora={"rank": 16})
    torch.manual_seed(0)
    fp8 = build_model(transformer=tiny_transformer_config, lora={"rank": 16}, frozen_fp8=True)
    randomise_lora(ref), randomise_lora(fp8)
    layer = fp8.transformer.blocks[0].ffn.net[2]
    assert isinstance(layer.base_layer, Fp8FrozenLinear)
    assert type(layer.lora_A["default"]) is torch.nn.Linear and layer.lora_A["default"].weight.dtype == torch.float32
    outs = []
    for net in (ref, fp8):
        out = net(**inputs())
        out.square().mean().backward()
        outs.append(out.detach())
    # fp8 is approximate: close, not equal, and every LoRA weight gets a gradient close to the exact one's
    assert torch.allclose(outs[0], outs[1], rtol=0.1, atol=0.05)
    for (name, a), (_, b) in zip(ref.lora_state(), fp8.lora_state()):
        assert b.grad is not None and b.grad.abs().sum() > 0, name
        assert float((a.grad - b.grad).norm() / a.grad.norm()) < 0.15, name


def test_compiled_blocks_give_the_eager_lora_gradients(tiny_transformer_config):
    from ft_train.speed.apply import compile_blocks

    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = build_model(transformer=tiny_transformer_config, lora={"rank": 4})
        randomise_lora(net)
        nets.append(net)
    compile_blocks(nets[1], backend="aot_eager")
    for net in nets:
        net(**inputs()).square().mean().backward()
    for (name, a), (_, b) in zip(nets[0].lora_state(), nets[1].lora_state()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step LoRA run (alpha ≠ rank, so the exported scale matters) and its final step folder."""
    out = tmp_path_factory.mktemp("lora_run")
    train(config(out, "run", 3, *LORA))
    return out / "run" / "clip" / "checkpoints" / "step-00000003"


def test_exported_lora_loads_into_diffusers_wan_and_gives_ft_train_outputs(trained, tmp_path, tiny_transformer_config):
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel

    from ft_train.export import export
    from ft_train.models.weights import load_adapter_weights

    file = tmp_path / "lora.safetensors"
    result = export(trained, file, format="lora")
    assert result["tensors"] == 40
    torch.manual_seed(0)
    net = build_model(transformer=tiny_transformer_config, lora={"rank": 4, "alpha": 8})
    load_adapter_weights(net, trained)
    assert any(p.abs().sum() > 0 for n, p in net.lora_state() if ".lora_B." in n)
    # the same base weights, plain diffusers, the file through the pipeline's own loader
    base = WanTransformer3DModel(**tiny_transformer_config)
    base.load_state_dict({k: v for k, v in net.transformer.state_dict().items() if ".lora_" not in k
                          and "base_layer" not in k} | {k.replace(".base_layer", ""): v for k, v in
                          net.transformer.state_dict().items() if ".base_layer." in k})
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None,
                                   transformer=base, vae=None, scheduler=None)
    pipe.load_lora_weights(str(file))
    x = inputs()
    with torch.no_grad():
        ours = net(**{**x, "audio": None})  # audio branch off: the plain Wan forward + the LoRA
        theirs = base(hidden_states=x["hidden_states"], timestep=x["timestep"], encoder_hidden_states=x["text"],
                      encoder_hidden_states_image=x["image"], return_dict=False)[0]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        base.disable_lora()
        assert not torch.allclose(base(hidden_states=x["hidden_states"], timestep=x["timestep"],
                                       encoder_hidden_states=x["text"], encoder_hidden_states_image=x["image"],
                                       return_dict=False)[0], ours, atol=1e-5)


def test_a_diffusers_lora_file_starts_training_with_the_same_update(trained, tmp_path, tiny_transformer_config):
    from ft_train.export import export

    file = tmp_path / "style.safetensors"
    export(trained, file, format="lora")
    ref = build_model(transformer=tiny_transformer_config, lora={"rank": 4, "alpha": 8}, init_from=str(trained))
    # another alpha: the file's update B·A is kept, so B is rescaled
    net = build_model(transformer=tiny_transformer_config, lora={"rank": 4, "alpha": 2}, init_from=str(file))
    for (name, a), (_, b) in zip(ref.lora_state(), net.lora_state()):
        torch.testing.assert_close(a * (4.0 if ".lora_B." in name else 1.0), b, msg=name)
    assert read_lora_file(file, "x").rank == 4
    # a list loads in order: the adapters from the checkpoint, then the LoRA from the file
    both = build_model(transformer=tiny_transformer_config, lora={"rank": 4, "alpha": 2},
                       init_from=[str(trained), str(file)])
    for name, value in both.adapter_state_dict().items():
        want = dict(net.lora_state())[name] if ".lora_" in name else ref.adapter_state_dict()[name]
        torch.testing.assert_close(value, want, msg=name)


def test_original_wan_keys_are_converted_by_diffusers_reader(tmp_path):
    from safetensors.torch import save_file

    a, b = torch.randn(4, 64), torch.randn(64, 4)
    path = tmp_path / "comfy.safetensors"
    save_file({"diffusion_model.blocks.1.self_attn.q.lora_A.weight": a,
               "diffusion_model.blocks.1.self_attn.q.lora_B.weight": b}, str(path))
    lora = read_lora_file(path, "extra_lora")
    assert lora.layers == ("attn1.to_q",) and lora.rank == 4
    torch.testing.assert_close(lora.tensors["transformer.blocks.1.attn1.to_q.lora_B.weight"] @
                               lora.tensors["transformer.blocks.1.attn1.to_q.lora_A.weight"], b @ a)


# -- inference ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def infer_files(tmp_path_factory, tiny_transformer_config):
    """Base weights + tiny encoders, a bundle with a trained-looking LoRA (alpha ≠ rank), the net
    it came from, a photo and a wav."""
    import numpy as np
    import soundfile
    from PIL import Image
    from skimage.data import astronaut

    from ft_train.export import export_bundle
    from ft_train.models.weights import AdapterCheckpoint
    from ft_train.spec import ModelSpec

    from .test_infer import tiny_weights

    root = tmp_path_factory.mktemp("lora_infer")
    wan, wav2vec, model_cfg = tiny_weights(root, tiny_transformer_config)
    model_cfg.update(lora={**model_cfg["lora"], "rank": 4, "alpha": 8})
    net = build_model(**model_cfg, audio_mode="frame")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for value in net.adapter_state_dict().values():
            value.copy_(torch.randn(value.shape, generator=g) * 0.05)
    ckpt = AdapterCheckpoint(root / "run", "state_dict", net.adapter_state_dict(), {"audio_mode": "frame"})
    export_bundle(ckpt, root / "bundle", torch.float32,
                  ModelSpec.from_run_config({"model": model_cfg, "data": {"fps": 25.0}}, "frame"), None)
    Image.fromarray(astronaut()[:, 64:448]).save(root / "face.png")
    t = np.arange(16000) / 16000
    soundfile.write(root / "speech.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    return {"root": root, "wan": wan, "wav2vec": wav2vec, "bundle": root / "bundle", "net": net.eval()}


def load_pipe(files, **kw):
    from ft_train.diffusion import FlowMatchSampler
    from ft_train.inference.adapters import read_adapters
    from ft_train.inference.pipeline import TalkingPortraitPipeline

    return TalkingPortraitPipeline.load(read_adapters(files["bundle"]), files["wan"], files["wav2vec"],
                                        sampler=FlowMatchSampler(steps=2), device="cpu", dtype="float32", **kw)


def test_inference_applies_the_bundles_lora_at_lora_scale(infer_files):
    from ft_train.inference.adapters import read_adapters

    assert read_adapters(infer_files["bundle"]).spec.lora["alpha"] == 8
    net, x = infer_files["net"], inputs(frames=7)
    with torch.no_grad():
        trained = net(**x)
        for scale in (1.0, 0.5, 0.0):
            pipe = load_pipe(infer_files, lora_scale=scale)
            got = pipe.model(**x)
            # reference: the trained net with its LoRA update scaled by hand
            saved = {n: p.detach().clone() for n, p in net.lora_state()}
            for n, p in net.lora_state():
                if ".lora_B." in n:
                    p.mul_(scale)
            want = net(**x)
            for n, p in net.lora_state():
                p.copy_(saved[n])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert (scale == 1.0) == torch.allclose(got, trained, rtol=1e-5, atol=1e-5)


def test_an_extra_diffusers_lora_adds_its_update_at_its_scale(infer_files, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(4, 64, generator=g) * 0.1, torch.randn(64, 4, generator=g) * 0.1
    path = tmp_path / "style.safetensors"
    save_file({"transformer.blocks.1.attn1.to_v.lora_A.weight": a,
               "transformer.blocks.1.attn1.to_v.lora_B.weight": b}, str(path))
    pipe = load_pipe(infer_files, lora_scale=0.0, extra_lora=[path], extra_lora_scale=0.5)
    base = load_pipe(infer_files, lora_scale=0.0)
    with torch.no_grad():  # reference: the update merged into the weight by hand
        layer = base.model.transformer.blocks[1].attn1.to_v.base_layer
        layer.weight += 0.5 * b @ a
        x = inputs(frames=7)
        torch.testing.assert_close(pipe.model(**x), base.model(**x), rtol=1e-5, atol=1e-5)


def test_ft_infer_with_a_lora_bundle_and_an_extra_lora(infer_files, tmp_path, capsys):
    from safetensors.torch import save_file

    from ft_train.infer import main
    from ft_train.media import read_video

    path = tmp_path / "style.safetensors"
    save_file({"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.randn(4, 64) * 0.1,
               "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.randn(128, 4) * 0.1}, str(path))
    out = tmp_path / "talk.mp4"
    f = infer_files
    argv = [f"image={f['root'] / 'face.png'}", f"audio={f['root'] / 'speech.wav'}", f"adapters={f['bundle']}",
            f"wav2vec={f['wav2vec']}", f"out={out}", "max_side=64", "sampler.steps=2",
            "device=cpu", "progress=false", "lora_scale=0.7", f"extra_lora={path}", "extra_lora_scale=0.3"]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert read_video(out)[0].shape[0] == 25  # 1 s of speech at the bundle's 25 fps: one window
    for bad, message in (("lora_scale=abc", "lora_scale"), (f"extra_lora={tmp_path / 'no.safetensors'}", "extra_lora")):
        with pytest.raises(SystemExit, match=message):
            main([a for a in argv if not a.startswith(bad.split("=")[0] + "=")] + [bad])


@pytest.mark.slow
def test_lora_trains_under_ddp_zero2_and_zero3_alike_and_resumes_under_zero3(tmp_path):
    """Two processes each: DDP, ZeRO-2 (whole weights on each rank, the LoRA's gradients and Adam
    state partitioned; with an EMA) and ZeRO-3 (every weight, the LoRA's included, sharded over the
    ranks) train the same LoRA, and ft-export format=lora gathers each checkpoint into the same
    file. Under ZeRO-3 a run cut after step 2 (its step-3 save lost) resumes exactly: the LoRA's
    shards and their Adam state come back from the sharded checkpoint, the frozen base weights
    (left out of it) from the base. ZeRO-2's exact resume (with an EMA) is test_strategies'."""
    from ft_train.export import export

    from .test_strategies import cut_copy, ft_train, side_by_side

    strategies = ("ddp", "deepspeed_zero2", "deepspeed_zero3")
    extra = {s: (f"strategy={s}", *LORA, *{"deepspeed_zero2": ["callbacks.ema.decay=0.9"],  # ZeRO-3 refuses one
                                           "deepspeed_zero3": ["callbacks.checkpoint.every_n_steps=2"]}.get(s, []))
             for s in strategies}

    def zero3_and_resume():  # then a copy cut after step 2 (its step-3 save lost) resumes
        got = ft_train(tmp_path, "deepspeed_zero3", 3, *extra["deepspeed_zero3"])
        cut_copy(tmp_path, "deepspeed_zero3", "deepspeed_zero3-cut", 3)
        return got, ft_train(tmp_path, "deepspeed_zero3-cut", 3, *extra["deepspeed_zero3"])

    # two launches side by side: ZeRO-3 and its resume on one worker, DDP then ZeRO-2 on the other
    zero3, ddp, zero2 = side_by_side(zero3_and_resume, *(lambda s=s: ft_train(tmp_path, s, 3, *extra[s])
                                                         for s in ("ddp", "deepspeed_zero2")))
    (zero3, resumed), ddp, zero2 = zero3.result(), ddp.result(), zero2.result()
    losses = {"ddp": ddp, "deepspeed_zero2": zero2, "deepspeed_zero3": zero3}
    files = {}
    for strategy in strategies:
        steps, values = losses[strategy]
        assert steps == [0, 1, 2] and all(v == v for v in values)
        ckpts = tmp_path / strategy / "clip" / "checkpoints"
        if strategy == "deepspeed_zero3":
            cut = tmp_path / f"{strategy}-cut"
            assert resumed == losses[strategy]
            full, again = (read_checkpoint(run / "clip" / "checkpoints" / "step-00000003")
                           for run in (tmp_path / strategy, cut))
            assert full.layout == "deepspeed" and len([n for n in full.tensors if ".lora_" in n]) == 40
            for name in full.tensors:
                assert torch.equal(full.tensors[name], again.tensors[name]), name
        if strategy == "deepspeed_zero2":  # the EMA of the LoRA, kept in DeepSpeed's client state
            ckpt = read_checkpoint(ckpts / "step-00000003")
            lora_keys = {n for n in ckpt.tensors if ".lora_" in n}
            assert len(lora_keys) == 40 and lora_keys <= set(ckpt.ema)
            assert any(not torch.equal(ckpt.ema[n], ckpt.tensors[n].float()) for n in lora_keys)
        files[strategy] = read_lora_file(export(ckpts / "step-00000003", tmp_path / f"{strategy}.safetensors",
                                                format="lora")["out"], "x")
    ddp = files["ddp"]
    assert len(ddp.tensors) == 40
    assert sum(".lora_B." in n and bool(b.abs().sum() > 0) for n, b in ddp.tensors.items()) == 20  # every B moved
    for strategy in strategies[1:]:
        got = files[strategy]
        assert got.tensors.keys() == ddp.tensors.keys(), strategy
        for name, b in ddp.tensors.items():
            a = got.tensors[name]
            # as in test_strategies: same maths, another reduction order, Adam's first steps amplify
            # rounding; a wrongly gathered shard (or a LoRA DeepSpeed left untrained) would be ~100 % off
            rel = float((a - b).norm() / b.norm().clamp(min=1e-12))
            assert a.shape == b.shape and rel <= 0.05, (strategy, name, rel)


def test_step_flops_count_the_lora_not_a_full_fine_tune(tiny_transformer_config):
    from ft_train.flops import training_step_flops

    shape, audio = (1, 16, 3, 8, 8), 20
    torch.manual_seed(0)
    frozen = training_step_flops(build_model(transformer=tiny_transformer_config), shape, audio)
    full = training_step_flops(build_model(transformer=tiny_transformer_config, train_backbone=True), shape, audio)
    net = build_model(transformer=tiny_transformer_config, lora={"rank": 4, "targets": ["attn1.to_q"]})
    # one rank-4 LoRA on attn1.to_q (64 → 64) per block over 3·4·4 = 48 video tokens: 3 matmuls × 2 FLOPs
    lora = 2 * 3 * 2 * 48 * (4 * 64 + 64 * 4)
    assert training_step_flops(net, shape, audio) == pytest.approx(frozen + lora) and frozen + lora < full
