"""What a run logs about its own speed: the FLOPs behind MFU, and StepPerf's step/wait times."""

from __future__ import annotations

import csv
import logging
import sys
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from ft_train.flops import adapter_sizes, forward_flops, training_step_flops
from ft_train.lit.perf import StepPerf, Throughput, peak_flops
from ft_train.models import build_model


def tiny_inputs(tcfg: dict, frames_latent: int = 3, hw: int = 8, audio_tokens: int = 44):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, frames_latent, hw, hw, generator=g)
    hidden = torch.cat([latents, torch.zeros_like(latents[:, :4]), latents], dim=1)
    text = torch.randn(1, 512, tcfg["text_dim"], generator=g)
    clip = torch.randn(1, 257, tcfg["image_dim"], generator=g)
    audio = torch.randn(1, audio_tokens, 768, generator=g)
    return latents, hidden, text, clip, audio


def measured_forward(net, hidden, text, clip, audio) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(hidden, torch.tensor([500.0]), text, clip, audio)
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["clip", "frame"])
@pytest.mark.parametrize("full", [False, True])
def test_step_flops_are_the_counted_forward_times_the_training_rule(tiny_pretrained, tiny_transformer_config, mode, full):
    """training_step_flops = 3 × the forward torch's FlopCounterMode counts (full fine-tune), or
    2 × it plus the trainable weights' gradients (frozen backbone). The counter may leave
    attention out (it depends on the SDPA kernel torch picks here), so both sums are accepted."""
    net = build_model(pretrained=str(tiny_pretrained), audio_mode=mode, train_backbone=full)
    latents, hidden, text, clip, audio = tiny_inputs(tiny_transformer_config)
    counted = measured_forward(net, hidden, text, clip, audio)
    flops = training_step_flops(net, tuple(latents.shape), audio.shape[1])
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    grads = 0 if full else 2 * audio.shape[1] * trainable

    def expected(fwd):
        return 3 * fwd if full else 2 * fwd + grads

    sizes = adapter_sizes(net, audio.shape[1], (latents.shape[2] - 1) * 4 + 1, frame_level=mode == "frame")
    fwd = forward_flops(net.transformer.config, tuple(latents.shape[2:]), adapter=sizes)
    assert counted in (pytest.approx(fwd["blocks"] + fwd["embed"] + fwd["adapter"], rel=1e-3),
                       pytest.approx(fwd["blocks"] + fwd["embed"] + fwd["adapter"] - fwd["attention"], rel=1e-3))
    assert flops == pytest.approx(expected(fwd["blocks"] + fwd["embed"] + fwd["adapter"]), rel=1e-9)
    assert flops in (pytest.approx(expected(counted), rel=1e-3), pytest.approx(expected(counted + fwd["attention"]), rel=1e-3))


def test_clip_level_audio_attention_costs_more_than_frame_windows(tiny_pretrained, tiny_transformer_config):
    latents, *_ = tiny_inputs(tiny_transformer_config, frames_latent=5, audio_tokens=68)
    clip = training_step_flops(build_model(pretrained=str(tiny_pretrained), audio_mode="clip"), tuple(latents.shape), 68)
    frame = training_step_flops(build_model(pretrained=str(tiny_pretrained), audio_mode="frame"), tuple(latents.shape), 68)
    assert clip > frame


class Samples(Dataset):
    def __init__(self, n: int, delay: float):
        self.n, self.delay = n, delay

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        return {"latents": torch.randn(16, 1, 2, 2), "target": torch.randn(4)}


class Sleepy(L.LightningModule):
    """A step that takes ``step_s`` of host time."""

    def __init__(self, step_s: float):
        super().__init__()
        self.layer = torch.nn.Linear(64, 4)
        self.step_s = step_s
        self.flops_per_batch = 1e6

    def training_step(self, batch, batch_idx):
        time.sleep(self.step_s)
        return torch.nn.functional.mse_loss(self.layer(batch["latents"].flatten(1)), batch["target"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


ACCELERATORS = ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events: on a GPU"))]


class Hungry(Sleepy):
    """A step that also fills, then frees, ``gib`` GiB of host memory (every page touched)."""

    def __init__(self, step_s: float, gib: float):
        super().__init__(step_s)
        self.gib = gib

    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            torch.ones(int(self.gib * 2**30) // 4).sum()
        return super().training_step(batch, batch_idx)


def fit(tmp_path, loader_delay: float, step_s: float, callbacks, steps: int = 14, accelerator: str = "cpu",
        module: L.LightningModule | None = None) -> list[dict]:
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module or Sleepy(step_s), DataLoader(Samples(steps, loader_delay), batch_size=1, num_workers=0))
    return list(csv.DictReader(open(tmp_path / "metrics.csv")))


def column(rows, name):
    return [float(r[name]) for r in rows if r.get(name)]


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_a_slow_loader_shows_as_wait_and_warns_once(tmp_path, caplog, accelerator):
    """On a GPU the times are CUDA events: the device idles through the host's sleeps, so they
    read the same."""
    perf = StepPerf(stall_fraction=0.5, window=20, min_steps=5)
    with caplog.at_level(logging.WARNING, logger="ft_train.lit.perf"):
        rows = fit(tmp_path, loader_delay=0.08, step_s=0.01, callbacks=[perf, Throughput(window_size=4)],
                   accelerator=accelerator)
    steps, waits = column(rows, "perf/step_s"), column(rows, "perf/wait_s")
    assert len(steps) == 14 and len(waits) == 13  # no wait before the first step
    assert all(0.009 < s < 0.06 for s in steps[1:])
    assert all(w > 0.07 for w in waits)
    stalls = [r for r in caplog.records if "loader cannot keep up" in r.getMessage()]
    assert len(stalls) == 1 and "data.num_workers" in stalls[0].getMessage()
    # ThroughputMonitor: one sample per batch at ~1/(0.08 + 0.01) batches/s, FLOPs = flops_per_batch × that.
    rate = column(rows, "perf/samples_per_s")  # one sample per batch
    flops = column(rows, "perf/flops_per_s")
    assert not any(name.startswith("train/") for name in rows[0])  # only our perf/ names
    assert rate and 5 < rate[-1] < 12
    assert flops[-1] == pytest.approx(1e6 * rate[-1], rel=0.05)


@pytest.mark.parametrize("accelerator", ACCELERATORS)
def test_a_fast_loader_does_not_warn(tmp_path, caplog, accelerator):
    perf = StepPerf(stall_fraction=0.5, window=20, min_steps=5)
    with caplog.at_level(logging.WARNING, logger="ft_train.lit.perf"):
        rows = fit(tmp_path, loader_delay=0.0, step_s=0.05, callbacks=[perf], accelerator=accelerator)
    waits = column(rows, "perf/wait_s")
    assert waits and sorted(waits)[len(waits) // 2] < 0.025
    assert all(s > 0.045 for s in column(rows, "perf/step_s"))
    assert not [r for r in caplog.records if "loader cannot keep up" in r.getMessage()]
    if accelerator == "gpu":
        peaks = column(rows, "perf/memory_peak_gib")
        assert peaks and 0 < peaks[-1] < 1  # a 64×4 linear layer and its batches


def proc_status_gib(field: str) -> float:
    """A ``kB`` line of /proc/self/status (``VmRSS``: resident now, ``VmHWM``: its peak), in GiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_memory_peak_is_the_process_peak_rss(tmp_path):
    """On the CPU perf/memory_peak_gib is the process's peak resident memory in GiB: at least what
    it held before the run plus the 0.25 GiB a step filled and freed (so a peak, not the current
    RSS), at most the kernel's own high-water mark after the run."""
    before = proc_status_gib("VmRSS")
    rows = fit(tmp_path, loader_delay=0.0, step_s=0.0, steps=4, callbacks=[StepPerf()], module=Hungry(0.0, 0.25))
    after = proc_status_gib("VmHWM")
    peaks = column(rows, "perf/memory_peak_gib")
    assert len(peaks) == 4
    assert before + 0.24 <= peaks[-1] <= after + 1e-3
    assert peaks == sorted(peaks)  # a peak never falls
    assert not column(rows, "perf/memory_reserved_gib")  # the allocator pool is a CUDA figure


@pytest.mark.parametrize("kwargs, key", [({"stall_fraction": 0.0}, "stall_fraction"), ({"window": 0}, "window")])
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"callbacks.perf.{key}"):
        StepPerf(**kwargs)
    with pytest.raises(ValueError, match="callbacks.throughput.window_size"):
        Throughput(window_size=1)


def test_mfu_peak_is_the_dense_bf16_one():
    """Lightning's own table gives an H200 its sparse figure or nothing; ours is the dense bf16 peak."""
    assert peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", torch.float16) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) is None  # fp32: Lightning's TF32 figure applies
    assert peak_flops("NVIDIA GeForce RTX 3060", torch.bfloat16) is None
