"""callbacks.ema: the average's rule over real training steps, exact resume, export (1 process)."""

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from ft_train.export import main as export_main
from ft_train.infer import read_adapters
from ft_train.lit.ema import AdapterEMA
from ft_train.models.weights import read_checkpoint
from ft_train.train import train

from .conftest import CONF
from .test_resume import config as resume_config


def config(out, run, steps, *extra):
    """test_resume's run config, with a checkpoint (and so a saved average) after every step."""
    return resume_config(out, run, steps, "data.num_workers=0", "callbacks.checkpoint.every_n_steps=1", *extra)


def step_folder(out, run, step):
    return out / run / "clip" / "checkpoints" / f"step-{step:08d}"


def test_the_average_follows_its_rule_over_the_steps_taken(tmp_path):
    """Every step folder holds the weights after that step and the average so far: recomputed
    here from those weights, the average is the first step's weights, then
    ema ← d·ema + (1 − d)·w with d = min(decay, k / (9 + k)) at the k-th step."""
    decay = 0.2
    train(config(tmp_path, "ema", 4, f"callbacks.ema.decay={decay}"))
    weights = [read_checkpoint(step_folder(tmp_path, "ema", k)).tensors for k in range(1, 5)]
    saved = read_checkpoint(step_folder(tmp_path, "ema", 4)).ema
    trainable = set(saved)
    assert trainable and trainable <= set(weights[0])
    assert any(n.startswith("audio_kv.") for n in trainable) and any(n.startswith("transformer.") for n in trainable)
    expected = {n: weights[0][n].double() for n in trainable}
    for k in range(2, 5):
        d = min(decay, k / (9 + k))
        expected = {n: d * expected[n] + (1 - d) * weights[k - 1][n].double() for n in trainable}
    moved = 0
    for name in trainable:
        assert saved[name].dtype == torch.float32
        torch.testing.assert_close(saved[name].double(), expected[name], rtol=1e-6, atol=1e-7, msg=name)
        moved += not torch.equal(saved[name], weights[3][name])
    assert moved > len(trainable) // 2  # the average is not the last weights


def test_a_resumed_run_continues_the_same_average(tmp_path):
    extra = ("callbacks.ema.decay=0.9",)
    train(config(tmp_path, "full", 4, *extra))
    train(config(tmp_path, "cut", 2, *extra))
    train(config(tmp_path, "cut", 4, *extra))
    full = read_checkpoint(step_folder(tmp_path, "full", 4)).ema
    cut = read_checkpoint(step_folder(tmp_path, "cut", 4)).ema
    assert full.keys() == cut.keys() and full
    for name in full:
        assert torch.equal(full[name], cut[name]), name


def test_export_writes_the_average_on_request(tmp_path, capsys):
    train(config(tmp_path, "ema", 3, "callbacks.ema.decay=0.5"))
    folder = step_folder(tmp_path, "ema", 3)
    ckpt = read_checkpoint(folder)
    for which, expected in (("ema", ckpt.ema), ("raw", ckpt.tensors)):
        out = tmp_path / f"{which}.safetensors"
        assert export_main([f"ckpt={folder}", f"out={out}", f"ema={which == 'ema'}"]) == 0
        exported = read_checkpoint(out)
        assert exported.layout == "official"
        for name, value in exported.tensors.items():  # the audio adapter, in the released naming
            assert torch.equal(value, expected[name].float()), (which, name)
    assert "the EMA average" in capsys.readouterr().out
    # A bundle of the average (every adapter) is what a next stage can start from (stage.init_from).
    assert export_main([f"ckpt={folder}", f"out={tmp_path / 'bundle'}", "format=bundle", "ema=true"]) == 0
    bundle = read_checkpoint(tmp_path / "bundle")
    assert bundle.layout == "bundle" and bundle.tensors
    for name, value in bundle.tensors.items():
        assert torch.equal(value, ckpt.ema[name].float()), name
    assert not torch.equal(ckpt.ema["audio_kv.0.k_proj.weight"], ckpt.tensors["audio_kv.0.k_proj.weight"])

    # ft-infer samples with the average straight from the step folder too.
    spec = read_adapters(folder, ema=True)
    assert spec.checkpoint.tensors.keys() == ckpt.tensors.keys()
    for name, value in spec.checkpoint.tensors.items():
        assert torch.equal(value, ckpt.ema.get(name, ckpt.tensors[name])), name

    train(config(tmp_path, "plain", 1))
    plain = step_folder(tmp_path, "plain", 1)
    with pytest.raises(SystemExit, match=r"ema: .*step-00000001/model.ckpt holds no EMA average"):
        export_main([f"ckpt={plain}", f"out={tmp_path / 'x.ckpt'}", "ema=true"])
    with pytest.raises(ValueError, match=r"ema: .*holds no EMA average .* use its weights with ema=false"):
        read_adapters(plain, ema=True)


def test_off_by_default_and_refused_under_zero3(tmp_path):
    train(config(tmp_path, "plain", 1))
    assert read_checkpoint(step_folder(tmp_path, "plain", 1)).ema == {}
    zero3 = SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True))
    with pytest.raises(ValueError, match="callbacks.ema: ZeRO-3 splits every weight"):
        AdapterEMA(decay=0.999).setup(zero3, None, "fit")
    AdapterEMA(decay=0.0).setup(zero3, None, "fit")  # off: nothing to refuse
    with pytest.raises(ValueError, match=r"callbacks.ema.decay must be in \[0, 1\)"):
        AdapterEMA(decay=1.0)


def test_validation_samples_with_the_average_and_training_keeps_its_weights(tmp_path):
    """callbacks.validation.ema: sampling sees the average (here the weights the EMA copied at
    the start, before they were moved), then the weights are back bit for bit; without it the
    same clips are sampled with the moved weights."""
    from hydra.utils import instantiate

    from ft_train.lit.validation import ValidationCallback

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "data.num_workers=0",
                                          "data.num_samples=2", "data.samples_per_shard=2", "data.num_frames=17"])
    instantiate(cfg.data).prepare_data()
    net = instantiate(cfg.model).train()
    ema = AdapterEMA(decay=0.99)

    class Module:
        device = torch.device("cpu")

    class Trainer:
        global_step, global_rank, world_size, loggers, callback_metrics = 0, 0, 1, [], {}
        strategy = None
        callbacks = [ema]

    Module.net = net
    decoded = []

    def validation(use_ema):
        return ValidationCallback(
            shards=cfg.data.root, num_samples=1, every_n_steps=0, ema=use_ema, samples_dir=None,
            sampler=instantiate({"_target_": "ft_train.diffusion.FlowMatchSampler", "steps": 2}),
            decode=lambda z: decoded.append(z.clone()) or torch.zeros(1, 9, 8, 8, 3, dtype=torch.uint8))

    validation(False).validate(Trainer(), Module())  # the starting weights
    ema.on_fit_start(Trainer(), Module())  # the average starts as a copy of them
    with torch.no_grad():
        for _, p in ema._trainable(Module()):
            p.add_(torch.randn_like(p) * 0.05)  # "training" moved the weights
    moved = {n: p.detach().clone() for n, p in net.named_parameters()}
    validation(True).validate(Trainer(), Module())
    validation(False).validate(Trainer(), Module())
    assert torch.equal(decoded[1], decoded[0])  # the average = the starting weights
    assert not torch.equal(decoded[2], decoded[0])  # the moved weights sample something else
    for name, p in net.named_parameters():
        assert torch.equal(p, moved[name]), name
    assert net.training

    class NoEMA(Trainer):
        callbacks = []

    with pytest.raises(ValueError, match=r"callbacks.validation.ema=true .* set callbacks.ema.decay"):
        validation(True).setup(NoEMA(), Module(), "fit")
