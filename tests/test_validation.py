"""The validation callback in a tiny training run, and ft-eval on folders of videos.

Stand-ins (random or hand-made networks, as in the metric tests) check the plumbing: the FVD one
goes through its weight path (TorchScript), FID and Sync are handed in as ready Metrics through
the same Hydra config keys a user sets to weight paths.
"""

import csv
import io
import math
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.io.wavfile
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from ft_train.diffusion import FlowMatchSampler
from ft_train.eval import evaluate, main
from ft_train.media import read_video, write_video
from ft_train.metrics import FrechetFeatureDistance, SyncMetric
from ft_train.lit.validation import ValidationCallback
from ft_train.tiny import save_tiny_encoders
from ft_train.train import train

from .conftest import CONF, tensorboard_events
from .test_metrics_fid import TinyExtractor
from .test_metrics_fvd import StandInI3D
from .test_metrics_sync import BrightnessEnergyEncoder

TINY_FID = {"_target_": "ft_train.metrics.FrechetFeatureDistance", "num_features": 16,
            "reset_real_features": False, "feature_net": {"_target_": "tests.test_metrics_fid.TinyExtractor"}}
TINY_SYNC = {"_target_": "ft_train.metrics.SyncMetric", "crop": "none",  # synthetic clips have no face
             "net": {"_target_": "tests.test_metrics_sync.BrightnessEnergyEncoder"}}


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fvd") / "i3d_torchscript.pt"
    torch.jit.script(StandInI3D()).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    # wav2vec keeps the real width (768, model/tiny.yaml's audio_in_dim): long-form validation encodes speech with it
    save_tiny_encoders(root / "wan", root / "wav2vec", image_dim=32, text_dim=32, image_size=28)
    return root / "wan"


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


# -- the callback ------------------------------------------------------------------------------------

def test_training_run_logs_all_metrics_and_writes_videos(tmp_path, tiny_wan, i3d_file):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):  # the clips' speech (latent shards hold only wav2vec features)
        wave = (0.3 * np.sin(np.arange(int(33 / 23 * 16000)) * 0.05) * rng.uniform(0.2, 1.0)).astype(np.float32)
        scipy.io.wavfile.write(audio_dir / f"synthetic-{i:06d}.wav", 16000, (wave * 32767).astype(np.int16))
    cfg = compose_train([
        "experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "stage.max_steps=4", "data.num_workers=0",
        "data.num_samples=4", "data.samples_per_shard=2", "data.shuffle_buffer=0",
        "data.num_frames=33",  # the tiny Wan VAE decodes ~0.1 s per frame on CPU
        "+callbacks@callbacks.validation=validation",
        "callbacks.validation.shards=${data.root}", "callbacks.validation.num_samples=2",
        "callbacks.validation.every_n_steps=2", "callbacks.validation.sampler.steps=2",
        f"callbacks.validation.vae={tiny_wan}", f"callbacks.validation.fvd={i3d_file}",
        f"callbacks.validation.audio_dir={audio_dir}", "callbacks.validation.fid_frames=8",
        "callbacks.validation.at_train_start=true", "logger=tensorboard",
        "callbacks.ema.decay=0.9", "callbacks.validation.ema=true",  # sampled with the moving average
    ])
    with open_dict(cfg):
        cfg.callbacks.validation.fid = TINY_FID
        cfg.callbacks.validation.sync = TINY_SYNC
    result = train(cfg)

    callback = next(c for c in result["trainer"].callbacks if isinstance(c, ValidationCallback))
    assert [h["step"] for h in callback.history] == [0, 2, 4]  # at_train_end: step 4 was already done
    for h in callback.history:
        for name in ("val/fid", "val/fvd", "val/sync_c", "val/sync_d"):
            assert math.isfinite(h.get(name, float("nan"))), (name, h)
    assert all(math.isfinite(result["metrics"][k]) for k in ("val/fid", "val/fvd", "val/sync_c", "val/sync_d"))
    with open(Path(result["stage_dir"]) / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("val/fvd")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]

    for step in (0, 2, 4):
        videos = sorted((Path(result["stage_dir"]) / "samples" / f"step-{step:08d}").glob("*.mp4"))
        assert [v.name for v in videos] == ["000_synthetic-000000.mp4", "001_synthetic-000001.mp4"]
        frames, fps, audio = read_video(videos[0])
        assert frames.shape == (33, 64, 64, 3) and fps == pytest.approx(23.0)
        assert audio is not None and len(audio) > 16000 * 1.4

    # logger=tensorboard: the metrics as scalars and each sample as a strip of 4 of its frames
    events = tensorboard_events(Path(result["stage_dir"]) / "tensorboard")
    assert [step for step, tag, _ in events if tag == "val/fvd"] == [0, 2, 4]
    for key in ("000_synthetic-000000", "001_synthetic-000001"):
        strips = [(step, png) for step, tag, png in events if tag == f"val_samples/{key}"]
        assert [step for step, _ in strips] == [0, 2, 4]
        assert PIL.Image.open(io.BytesIO(strips[-1][1])).size == (4 * 64, 64)

    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(k.startswith("net.") for k in ckpt["state_dict"])
    saved = [k for k in ckpt["callbacks"] if "ValidationCallback" in k]
    assert saved and ckpt["callbacks"][saved[0]] == {"last_step": 4}  # no metric networks


def test_sampling_is_deterministic_and_restores_train_mode(tmp_path, tiny_wan):
    cfg = compose_train(["experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "data.num_workers=0",
                         "data.num_samples=2", "data.samples_per_shard=2", "data.num_frames=17"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    net = instantiate(cfg.model).train()

    decoded = []
    cb = ValidationCallback(shards=cfg.data.root, num_samples=2, every_n_steps=0, vae=str(tiny_wan),
                            sampler=instantiate({"_target_": "ft_train.diffusion.FlowMatchSampler", "steps": 2}),
                            decode=lambda z: decoded.append(z.clone()) or torch.zeros(1, 9, 8, 8, 3, dtype=torch.uint8),
                            samples_dir=None)

    class Trainer:
        global_step, global_rank, world_size, loggers, callback_metrics = 7, 0, 1, [], {}
        strategy = None

    class Module:
        device = torch.device("cpu")

    Module.net = net
    cb.validate(Trainer(), Module())
    cb.validate(Trainer(), Module())
    assert len(decoded) == 4 and torch.equal(decoded[0], decoded[2]) and not torch.equal(decoded[0], decoded[1])
    assert net.training and all(m.training for m in net.modules())
    assert cb.history[0] == {"step": 7}  # no metric configured: nothing logged, noted in the log


class SpySampler(FlowMatchSampler):
    """The real sampler, recording the ``model_kwargs`` of each call."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def __call__(self, *args, model_kwargs=None, **kw):
        self.calls.append({k: v.clone() for k, v in (model_kwargs or {}).items()})
        return super().__call__(*args, model_kwargs=model_kwargs, **kw)


def test_each_clip_is_sampled_with_its_own_motion_and_face(tmp_path, tiny_wan):
    """With the motion and identity modules on, clip i is sampled with its shard's (ω_l, ω_b) and
    its ``face`` (when the shard has one), so its sample differs from the defaults' (ω = 0.5,
    whole-frame CLIP tokens); a model without those modules gets neither."""
    cfg = compose_train(["experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "data.num_workers=0",
                         "data.num_samples=2", "data.samples_per_shard=2", "data.num_frames=9",
                         "model.motion.enabled=true", "model.identity.enabled=true"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    net = instantiate(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters: zero-initialised ones ignore ω and the face
        for value in net.adapter_state_dict().values():
            value.copy_(torch.randn(value.shape, generator=g) * 0.05)

    decoded = []
    sampler = SpySampler(steps=2, cfg=1.0, audio_cfg=None)
    cb = ValidationCallback(shards=cfg.data.root, num_samples=2, every_n_steps=0, vae=str(tiny_wan), sampler=sampler,
                            decode=lambda z: decoded.append(z.clone()) or torch.zeros(1, 9, 8, 8, 3, dtype=torch.uint8),
                            samples_dir=None)

    class Trainer:
        global_step, global_rank, world_size, loggers, callback_metrics = 3, 0, 1, [], {}
        strategy = None

    class Module:
        device = torch.device("cpu")

    Module.net = net
    cb.setup(Trainer(), Module(), "fit")
    first, second = cb.samples
    assert not torch.equal(first["motion"], second["motion"])  # synthetic clips: random ω
    face = first["face"] = torch.randn(6, first["clip"].shape[-1], generator=g)
    cb.validate(Trainer(), Module())
    own = sampler.calls
    assert torch.equal(own[0]["motion"], first["motion"][None]) and torch.equal(own[0]["face"], face[None])
    assert torch.equal(own[1]["motion"], second["motion"][None]) and "face" not in own[1]

    for s in cb.samples:  # what validation sampled before: the defaults
        s["motion"] = torch.tensor([0.5, 0.5])
        s.pop("face", None)
    cb.validate(Trainer(), Module())
    assert not torch.equal(decoded[0], decoded[2]) and not torch.equal(decoded[1], decoded[3])

    plain = instantiate(compose_train(["experiment=tiny_cpu", f"paths.output_dir={tmp_path}"]).model)
    Module.net = plain
    cb.samples[0]["face"] = face
    cb.validate(Trainer(), Module())
    assert sampler.calls[-2:] == [{}, {}]


def test_long_form_clip_becomes_one_video_of_its_whole_speech_scored_whole(tmp_path, tiny_wan, i3d_file, monkeypatch):
    """long_form=true: clip 0's speech lasts ~2.5 of its 17-frame windows, so it is sampled in 3
    overlapping segments (ft-infer's loop) into one 33-frame video with the whole speech muxed in,
    and the metrics score that video; clip 1's speech fits its window and stays one window."""
    from ft_train.infer import frames_for_audio
    from ft_train.metrics.video import VideoMetrics

    fps, audio_dir = 23.0, tmp_path / "audio"
    audio_dir.mkdir()
    rng = np.random.default_rng(0)
    seconds = {"synthetic-000000": 31.5 / fps, "synthetic-000001": 17 / fps}
    for key, length in seconds.items():
        t = np.arange(int(length * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(len(t))
        scipy.io.wavfile.write(audio_dir / f"{key}.wav", 16000, (wave * 32767).astype(np.int16))
    cfg = compose_train([
        "experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "stages=null", "stage.max_steps=1",
        "data.num_workers=0", "data.num_samples=2", "data.samples_per_shard=2", "data.shuffle_buffer=0",
        "data.num_frames=17", "+callbacks@callbacks.validation=validation", "callbacks.validation.shards=${data.root}",
        "callbacks.validation.num_samples=2", "callbacks.validation.every_n_steps=0",
        "callbacks.validation.sampler.steps=2", f"callbacks.validation.vae={tiny_wan}",
        f"callbacks.validation.fvd={i3d_file}", f"callbacks.validation.audio_dir={audio_dir}",
        "callbacks.validation.fid_frames=8", "callbacks.validation.long_form=true",
        f"callbacks.validation.wav2vec={tiny_wan.parent / 'wav2vec'}",
    ])
    with open_dict(cfg):
        cfg.callbacks.validation.fid = TINY_FID
        cfg.callbacks.validation.sync = TINY_SYNC
    scored = []
    update = VideoMetrics.update

    def spied_update(self, generated, reference, fps, audio, key=None):
        scored.append((key, generated.shape[0], None if audio is None else len(audio)))
        return update(self, generated, reference, fps, audio, key=key)

    monkeypatch.setattr(VideoMetrics, "update", spied_update)
    result = train(cfg)

    callback = next(c for c in result["trainer"].callbacks if isinstance(c, ValidationCallback))
    # the metrics saw the whole video and the whole speech
    assert scored == [("synthetic-000000", 33, int(seconds["synthetic-000000"] * 16000)),
                      ("synthetic-000001", 17, int(seconds["synthetic-000001"] * 16000))]
    assert [len(p) for p in callback.plans.values()] == [3] and list(callback.plans) == ["synthetic-000000"]
    videos = sorted((Path(result["stage_dir"]) / "samples" / "step-00000001").glob("*.mp4"))
    assert [v.name for v in videos] == ["000_synthetic-000000.mp4", "001_synthetic-000001.mp4"]
    for video, length in zip(videos, seconds.values()):
        frames, got_fps, audio = read_video(video)
        # the whole speech: its frame count at the clips' fps, and its sound muxed in (AAC pads a little)
        assert frames.shape == (frames_for_audio(length, fps, max_frames=1000), 64, 64, 3) and got_fps == pytest.approx(fps)
        assert abs(len(audio) / 16000 - length) < 0.07, (video.name, len(audio) / 16000, length)
    assert frames_for_audio(seconds["synthetic-000000"], fps, max_frames=1000) == 33
    long_video = read_video(videos[0])[0].astype(np.float32)
    assert long_video[17:].std() > 1  # the later segments are generated pictures, not a blank tail
    values = callback.history[-1]
    for name in ("val/fid", "val/fvd", "val/sync_c", "val/sync_d"):
        assert math.isfinite(values.get(name, float("nan"))), (name, values)
    with open(Path(result["stage_dir"]) / "metrics.csv", newline="") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh) if r.get("val/fvd")] == [1]


def test_long_form_ranks_sample_as_many_windows(tmp_path, tiny_wan):
    """Under ZeRO-3 every DiT forward is a collective: with 2 ranks, rank 0's clip in 3 segments and
    rank 1's in one window, rank 1 samples 2 padding windows (thrown away) to stay in step."""
    cfg = compose_train(["experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "data.num_workers=0",
                         "data.num_samples=2", "data.samples_per_shard=2", "data.num_frames=9"])
    instantiate(cfg.data).prepare_data()
    net = instantiate(cfg.model).eval()
    (tmp_path / "audio").mkdir()
    for key, frames in (("synthetic-000000", 21), ("synthetic-000001", 9)):
        scipy.io.wavfile.write(tmp_path / "audio" / f"{key}.wav", 16000, np.zeros(int(frames / 23 * 16000), np.int16))
    counts, videos = [], {}
    for rank in (0, 1):
        sampler = SpySampler(steps=1, cfg=1.0, audio_cfg=None)
        cb = ValidationCallback(shards=cfg.data.root, num_samples=2, every_n_steps=0, vae=str(tiny_wan), sampler=sampler,
                                samples_dir=str(tmp_path / f"rank{rank}"), audio_dir=str(tmp_path / "audio"),
                                long_form=True, wav2vec=str(tiny_wan.parent / "wav2vec"), overlap_frames=1)

        class Trainer:
            global_step, global_rank, world_size, loggers, callback_metrics = 5, rank, 2, [], {}
            strategy = None

        class Module:
            device = torch.device("cpu")

        Module.net = net
        cb.validate(Trainer(), Module())
        counts.append(len(sampler.calls))
        videos[rank] = [(v.name, read_video(v)[0].shape[0]) for v in (tmp_path / f"rank{rank}" / "step-00000005").glob("*.mp4")]
    assert [len(p) for p in cb.plans.values()] == [3]  # 21 frames: windows of 9 overlapping by 1 at 0, 8, 16
    assert counts == [3, 3]
    assert videos == {0: [("000_synthetic-000000.mp4", 21)], 1: [("001_synthetic-000001.mp4", 9)]}


@pytest.mark.parametrize("override, message", [
    ("callbacks.validation.long_form=yes", "callbacks.validation.long_form: must be true or false"),
    ("callbacks.validation.overlap_frames=4", "callbacks.validation.overlap_frames: must be 4m+1"),
    ("callbacks.validation.segment_frames=20", "callbacks.validation.segment_frames: must be 4k+1"),
    ("callbacks.validation.long_mode=loop", "callbacks.validation.long_mode: must be continue"),
    ("callbacks.validation.max_seconds=0", "callbacks.validation.max_seconds: must be a number"),
    ("callbacks.validation.wav2vec=null", "callbacks.validation.wav2vec: not set"),
    ("callbacks.validation.audio_dir=null", "callbacks.validation.audio_dir: long_form=true reads"),
])
def test_long_form_keys_are_checked_when_the_callback_is_built(tmp_path, tiny_wan, override, message):
    cfg = compose_train(["experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "+callbacks@callbacks.validation=validation",
                         "callbacks.validation.shards=/x", f"callbacks.validation.vae={tiny_wan}",
                         f"callbacks.validation.audio_dir={tmp_path}", "callbacks.validation.long_form=true",
                         f"callbacks.validation.wav2vec={tiny_wan.parent / 'wav2vec'}", override])
    with pytest.raises(Exception, match=message.replace(".", r"\.").replace("+", r"\+")):
        instantiate(cfg.callbacks.validation)


def test_long_form_speech_too_long_or_windows_too_long_stop_before_the_first_step(tmp_path, tiny_wan):
    cfg = compose_train(["experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "data.num_workers=0",
                         "data.num_samples=1", "data.samples_per_shard=1", "data.num_frames=9"])
    instantiate(cfg.data).prepare_data()
    (tmp_path / "audio").mkdir()
    scipy.io.wavfile.write(tmp_path / "audio" / "synthetic-000000.wav", 16000, np.zeros(3 * 16000, np.int16))

    class Trainer:
        global_step, global_rank, world_size, loggers, callback_metrics = 0, 0, 1, [], {}
        strategy = None

    for kw, message in (({"max_seconds": 2.5}, r"callbacks\.validation\.max_seconds: the speech of validation clip "
                                                r"synthetic-000000 lasts 3\.0 s, longer than max_seconds=2\.5"),
                        ({"segment_frames": 13}, r"callbacks\.validation\.segment_frames: 13 frames is longer than "
                                                 r"validation clip synthetic-000000's 9")):
        cb = ValidationCallback(shards=cfg.data.root, num_samples=1, vae=str(tiny_wan), audio_dir=str(tmp_path / "audio"),
                                long_form=True, wav2vec=str(tiny_wan.parent / "wav2vec"), **kw)
        with pytest.raises(ValueError, match=message):
            cb.setup(Trainer(), None, "fit")


def test_config_errors_name_the_key(tmp_path):
    cfg = compose_train(["experiment=tiny_cpu", f"paths.output_dir={tmp_path}",
                         "+callbacks@callbacks.validation=validation", "callbacks.validation.shards=/x"])
    # Hydra wraps constructor errors (InstantiationException); the one-line message is kept
    with pytest.raises(Exception, match=r"callbacks\.validation\.vae: set a local Wan2\.1"):
        instantiate(cfg.callbacks.validation)
    with open_dict(cfg):
        cfg.callbacks.validation.vae = str(tmp_path)
        cfg.callbacks.validation.fvd = str(tmp_path / "missing_i3d.pt")
    with pytest.raises(Exception, match=r"callbacks\.validation\.fvd: .*missing_i3d\.pt"):
        instantiate(cfg.callbacks.validation)


# -- ft-eval -----------------------------------------------------------------------------------------

def _video_folder(folder: Path, shift: int = 0, names=("a", "b", "c")) -> Path:
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i, name in enumerate(names):
        level = g.uniform(40, 160, 32)[:, None, None, None]
        pattern = g.uniform(-30, 30, (1, 32, 32, 3))
        frames = np.clip(level + pattern + shift, 0, 255).astype(np.uint8)
        audio = (0.4 * np.sin(np.arange(32 * 640) * 0.07) * np.repeat(level[:, 0, 0, 0] / 160, 640)).astype(np.float32)
        write_video(folder / f"{name}.mp4", frames, 25.0, audio=audio)
    return folder


def _metrics():
    return dict(fid=FrechetFeatureDistance(TinyExtractor(), 16),
                sync=SyncMetric(net=BrightnessEnergyEncoder(), crop="none"))  # no face in these videos


def test_ft_eval_identical_folders_score_zero_and_different_ones_do_not(tmp_path, i3d_file):
    gen = _video_folder(tmp_path / "gen")
    same = tmp_path / "same"
    shutil.copytree(gen, same)
    (gen / "only_here.mp4").write_bytes((gen / "a.mp4").read_bytes())
    (gen / "broken.mp4").write_bytes(b"not a video")
    (same / "broken.mp4").write_bytes(b"not a video")
    other = _video_folder(tmp_path / "other", shift=70)

    # all_clips: both sides cut the same clips, so identical folders give 0 (stylegan_v takes the
    # reference's clip at a random start and the generated one at frame 0: tests/test_metrics_protocols.py)
    res = evaluate(gen, same, fvd=str(i3d_file), fvd_protocol="all_clips", **_metrics())
    assert res["protocol"]["fvd_protocol"] == "all_clips"
    m = res["metrics"]
    assert abs(m["fid"]) < 1e-6 and abs(m["fvd"]) < 1e-6
    assert math.isfinite(m["sync_c"]) and math.isfinite(m["sync_d"])
    assert res["pairs"] == 3 and res["unpaired_generated"] == ["only_here.mp4"] and list(res["skipped"]) == ["broken.mp4"]
    assert (gen / "metrics.json").is_file()

    diff = evaluate(gen, other, fvd=str(i3d_file), out=tmp_path / "diff.json", **_metrics())["metrics"]
    assert diff["fid"] > 1e-3 and diff["fvd"] > 1.0
    assert (tmp_path / "diff.json").is_file()


def test_ft_eval_command_and_its_errors(tmp_path, i3d_file, capsys):
    gen = _video_folder(tmp_path / "gen")
    ref = tmp_path / "ref"
    shutil.copytree(gen, ref)
    assert main([f"generated={gen}", f"reference={ref}", f"fvd={i3d_file}", f"out={tmp_path / 'r.json'}"]) == 0
    printed = capsys.readouterr().out
    assert "fvd" in printed and "pairs scored" in printed and (tmp_path / "r.json").is_file()

    with pytest.raises(SystemExit, match=r"ft-eval: generated: no folder at .*nowhere"):
        main([f"generated={tmp_path / 'nowhere'}", f"reference={ref}", f"fvd={i3d_file}"])
    with pytest.raises(SystemExit, match="ft-eval: give the weights of at least one metric"):
        main([f"generated={gen}", f"reference={ref}"])
    with pytest.raises(SystemExit, match=r"ft-eval: fid: .*no file at .*missing\.pth"):
        main([f"generated={gen}", f"reference={ref}", f"fid={tmp_path / 'missing.pth'}"])
    with pytest.raises(SystemExit, match="ft-eval: set generated"):
        main([f"reference={ref}"])


def test_validation_list_file_picks_clips_by_key_or_video_in_its_order(tmp_path):
    """callbacks.validation.clips: an HDTF-style split names videos or clip keys; the callback
    validates exactly those clips, in the file's order, and a name not in the shards fails."""
    import webdataset as wds

    from ft_train.data.synthetic import write_synthetic_shards
    from ft_train.data.validation_set import read_validation_samples

    src = write_synthetic_shards(tmp_path / "syn", num_samples=4, samples_per_shard=4, num_frames=17)
    keys = ["WRA_Obama_000_1a2b3c4d_00000", "WRA_Obama_000_1a2b3c4d_00001", "RD_Radio_9f8e7d6c_00000",
            "RD_Radio_9f8e7d6c_00001"]
    (tmp_path / "val").mkdir()
    with wds.TarWriter(str(tmp_path / "val" / "shard-000000.tar")) as sink:
        for key, raw in zip(keys, wds.WebDataset([str(src[0])], shardshuffle=False, empty_check=False)):
            sink.write({**{k: v for k, v in raw.items() if not k.startswith("__")}, "__key__": key})
    clips = tmp_path / "split.txt"
    clips.write_text("# HDTF test split\n\nRD_Radio.mp4\nWRA_Obama_000_1a2b3c4d_00001   # one clip\n"
                     "videos/WRA_Obama_000\n")
    got = read_validation_samples(str(tmp_path / "val"), 1, "callbacks.validation.shards", clips)
    assert [s["__key__"] for s in got] == [keys[2], keys[1], keys[0]]
    every = {s["__key__"]: s for s in read_validation_samples(str(tmp_path / "val"), 4, "x")}
    for sample in got:
        torch.testing.assert_close(sample["latents"], every[sample["__key__"]]["latents"], rtol=0, atol=0)

    clips.write_text("RD_Radio\nKeynote_007\nWRA_Obama_000_1a2b3c4d_00009\n")
    with pytest.raises(ValueError, match=r"callbacks\.validation\.clips: 2 of 3 entries of .*split\.txt are not in "
                                         r"callbacks\.validation\.shards \(Keynote_007, WRA_Obama_000_1a2b3c4d_00009\)"):
        read_validation_samples(str(tmp_path / "val"), 1, "callbacks.validation.shards", clips)
    with pytest.raises(FileNotFoundError, match=r"callbacks\.validation\.clips: no file at .*nope\.txt"):
        ValidationCallback(shards=str(tmp_path / "val"), vae=str(tmp_path), clips=str(tmp_path / "nope.txt"))
