"""ft-infer end to end on tiny random weights: a Wan folder in the real diffusers layout (tiny DiT
saved with ``save_pretrained`` + the tiny encoders), adapter bundles / the released layout written
by ft-export's own functions, a photo and a 1 s wav → an mp4 with the speech, checked by reading
it back. The adapters are random rather than zero-initialised, so audio and motion change the
output and the paths that carry them are really exercised."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import soundfile
import torch
import yaml
from PIL import Image

from ft_train.diffusion import FlowMatchSampler
from ft_train.export import export_bundle, export_official
from ft_train.models.motion import MotionConfig
from ft_train.spec import ModelSpec
from ft_train.infer import (
    TalkingPortraitPipeline,
    detect_face_box,
    frames_for_audio,
    infer,
    load_config,
    main,
    read_adapters,
    read_image,
    read_speech,
    resolve_arcface,
    scale_box,
    target_size,
)
from ft_train.media import read_video
from ft_train.models import build_model
from ft_train.data.clip_prep import face_crops
from ft_train.tiny import save_tiny_encoders
from ft_train.models.weights import AdapterCheckpoint

from .conftest import CONF

FPS = 25.0          # the bundle's training fps: 1.0 s of speech is exactly 25 = 4·6+1 frames
SECONDS = 1.0
SIZE = 64           # longest edge; the 3:4 photo becomes 48×64 px (a 3×4 token grid per frame)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors on a shared CPU: extra intra-op threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_weights(root, tiny_transformer_config):
    """A tiny diffusers Wan folder and wav2vec folder under ``root``, and conf/model/tiny.yaml's
    keys pointing at them: ``(wan, wav2vec, model_cfg)``."""
    from diffusers import WanTransformer3DModel

    wan, wav2vec = root / "wan", root / "wav2vec"
    torch.manual_seed(0)
    WanTransformer3DModel(**tiny_transformer_config).save_pretrained(wan / "transformer")
    save_tiny_encoders(wan, wav2vec)
    model_cfg = yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())
    model_cfg.pop("_target_")
    model_cfg["pretrained"] = str(wan)
    return wan, wav2vec, model_cfg


def random_adapters(net, seed, identity_std=0.05):
    """Trained-looking adapter weights (zero-initialised k/v and motion output would be no-ops).
    ``identity_std``: the Q-Former's spread; at 0.05 its ID tokens hardly depend on the face."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in net.adapter_state_dict().items():
            std = identity_std if name.startswith("identity.") else 0.05
            value.copy_(torch.randn(value.shape, generator=g) * std)
    return net


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_transformer_config):
    """Base weights, a motion bundle, an audio-only released-layout file, a photo and a wav."""
    from skimage.data import astronaut

    root = tmp_path_factory.mktemp("infer")
    wan, wav2vec, model_cfg = tiny_weights(root, tiny_transformer_config)
    model_cfg["motion"]["enabled"] = True
    net = random_adapters(build_model(**model_cfg, audio_mode="frame"), seed=1)
    trained = AdapterCheckpoint(root / "run", "state_dict", net.adapter_state_dict(),
                                {"stage": "frame", "audio_mode": "frame", "global_step": 100})
    export_bundle(trained, root / "bundle", torch.float32,
                  ModelSpec.from_run_config({"model": model_cfg, "data": {"fps": FPS, "num_frames": 17}}, "frame"), None)
    audio_only = {k: v for k, v in net.adapter_state_dict().items() if not k.startswith("motion.")}
    export_official(AdapterCheckpoint(root / "run", "state_dict", audio_only), root / "fantasytalking_model.ckpt",
                    torch.float32)

    identity_cfg = {**model_cfg, "motion": {**model_cfg["motion"], "enabled": False}}
    identity_cfg["identity"] = {**identity_cfg["identity"], "enabled": True}
    net = random_adapters(build_model(**identity_cfg, audio_mode="clip"), seed=2, identity_std=0.5)
    export_bundle(AdapterCheckpoint(root / "run", "state_dict", net.adapter_state_dict(), {"audio_mode": "clip"}),
                  root / "identity_bundle", torch.float32,
                  ModelSpec.from_run_config({"model": identity_cfg, "data": {"fps": FPS}}, "clip"), None)

    Image.fromarray(astronaut()[:, 64:448]).save(root / "face.png")  # 384×512 (w×h), a 3:4 portrait
    t = np.arange(int(SECONDS * 16000)) / 16000
    speech = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    soundfile.write(root / "speech.wav", speech.astype(np.float32), 16000)
    return {"root": root, "wan": wan, "wav2vec": wav2vec, "bundle": root / "bundle",
            "official": root / "fantasytalking_model.ckpt", "identity": root / "identity_bundle",
            "image": root / "face.png", "audio": root / "speech.wav"}


def args(files, out, **overrides):
    base = {"image": files["image"], "audio": files["audio"], "adapters": files["bundle"],
            "wav2vec": files["wav2vec"], "out": out, "max_side": SIZE, "sampler.steps": 2,
            "device": "cpu", "progress": "false"}
    base.update(overrides)
    return [f"{k}={v}" for k, v in base.items() if v is not None]


def check_video(path, frames, fps, size=(SIZE, 48)):
    video, got_fps, audio = read_video(path)
    assert video.shape == (frames, *size, 3)
    assert got_fps == pytest.approx(fps)
    assert (frames - 1) % 4 == 0 and abs(frames / fps - SECONDS) <= 1 / fps  # 4k+1, covers the speech
    assert audio is not None  # AAC pads its last 1024-sample frame: 64 ms at most
    assert abs(len(audio) / 16000 - SECONDS) < 0.07
    return video


def test_frames_cover_the_speech_as_4k_plus_1():
    assert frames_for_audio(1.0, 25) == 25            # exactly covered
    assert frames_for_audio(1.0, 23) == 25            # 23 frames needed → next 4k+1
    assert frames_for_audio(1.0 + 1e-5, 25) == 25     # a few samples over a boundary cost nothing
    assert frames_for_audio(1.05, 25) == 29
    assert frames_for_audio(0.01, 23) == 5            # at least one latent frame after the reference
    assert frames_for_audio(12.0, 23) == 81           # capped by max_frames
    assert frames_for_audio(12.0, 23, max_frames=49) == 49
    for seconds in np.linspace(0.2, 3.5, 40):
        n = frames_for_audio(seconds, 23, max_frames=10_001)
        assert (n - 1) % 4 == 0 and n / 23 >= seconds - 1e-3 and (n - 4) / 23 < seconds


def test_image_size_follows_the_release():
    assert target_size(512, 512, 512, 16) == (512, 512)
    assert target_size(1920, 1080, 512, 16) == (512, 288)
    assert target_size(1000, 750, 512, 16) == (512, 384)
    assert target_size(600, 1000, 512, 16) == (320, 512)  # 307 px rounded up to the grid
    assert target_size(384, 512, 64, 16) == (48, 64)


def test_adapter_settings_come_from_each_layout(files, tmp_path):
    """Bundle JSON, the released file (frame mode, audio only), an ft-train step folder with its
    run's config.yaml, and bare tensors (motion rebuilt from its shapes; identity refused)."""
    read = read_adapters(files["bundle"])
    bundle = read.spec
    assert (bundle.audio_mode, bundle.audio_expand, bundle.fps, bundle.num_frames) == ("frame", 4, FPS, 17)
    assert read.has_motion and not read.has_identity and bundle.pretrained == str(files["wan"])
    assert (bundle.audio_in_dim, bundle.audio_proj_dim) == (768, 2048)
    assert read.model_kwargs() == bundle.model_kwargs()
    read = read_adapters(files["official"])
    official = read.spec
    assert (official.audio_mode, official.audio_expand, official.fps, official.pretrained) == ("frame", 4, None, None)
    assert not read.has_motion and read.checkpoint.layout == "official"
    override = read_adapters(files["official"], audio_mode="clip", audio_expand=2).spec
    assert (override.audio_mode, override.audio_expand) == ("clip", 2)
    with pytest.raises(ValueError, match=r"^audio_mode: 'word' is not one of \('clip', 'frame'\)$"):
        read_adapters(files["official"], audio_mode="word")
    with pytest.raises(ValueError, match=r"^audio_expand: must be a whole number of tokens >= 0, got -1$"):
        read_adapters(files["official"], audio_expand=-1)

    tensors = read_adapters(files["bundle"]).checkpoint.tensors
    stage = tmp_path / "run" / "clip"
    step = stage / "checkpoints" / "step-00000005"
    step.mkdir(parents=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in tensors.items()}, "global_step": 5,
                "ft_train": {"stage": "clip", "audio_mode": "clip"}}, step / "model.ckpt")
    motion = {"enabled": True, "hidden_dim": 32}
    run_cfg = {"model": {"pretrained": "/elsewhere/wan", "audio_expand": 3, "motion": motion},
               "data": {"fps": 24.0, "num_frames": 49}}
    (stage / "config.yaml").write_text(yaml.safe_dump(run_cfg))
    lightning = read_adapters(step).spec
    assert (lightning.audio_mode, lightning.audio_expand, lightning.fps, lightning.num_frames) == ("clip", 3, 24.0, 49)
    assert lightning.motion == MotionConfig.from_dict(motion).to_dict() and lightning.pretrained == "/elsewhere/wan"

    torch.save(dict(tensors), tmp_path / "bare.pt")
    bare = read_adapters(tmp_path / "bare.pt").spec
    assert bare.motion == {"enabled": True, "hidden_dim": 32, "freq_dim": 256}
    torch.save({**tensors, "identity.qformer.queries": torch.zeros(4, 32)}, tmp_path / "face.pt")
    with pytest.raises(ValueError, match=r"^adapters: .*face.pt holds identity-branch tensors but no model.identity"):
        read_adapters(tmp_path / "face.pt")


def test_ft_infer_writes_the_talking_video_with_its_speech(files, tmp_path, capsys):
    """The bundle gives the base folder (wan unset), the fps (25) and the motion module (ω used)."""
    out = tmp_path / "talk.mp4"
    assert main(args(files, out, omega_l=0.2, omega_b=0.9)) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "ω_l 0.2 ω_b 0.9" in printed and "frame-level audio" in printed
    video = check_video(out, frames=25, fps=FPS)
    assert video.std() > 1  # a picture, not a flat frame


def test_motion_and_audio_reach_the_model(files):
    """Same seed → same video; other ω → another video; batched and one-by-one guidance passes agree."""
    adapters = read_adapters(files["bundle"])
    assert adapters.has_motion and adapters.spec.audio_mode == "frame" and adapters.spec.fps == FPS
    pipe = TalkingPortraitPipeline.load(adapters, files["wan"], files["wav2vec"],
                                        sampler=FlowMatchSampler(steps=2), device="cpu")
    picture = read_image(files["image"]).resize(target_size(384, 512, SIZE, pipe.grid))
    speech = read_speech(files["audio"])

    def run(omega, speech=speech):
        return pipe(picture, speech, 9, FPS, prompt="a woman is talking", omega=omega, seed=3).int()

    calm = run((0.1, 0.1))
    assert calm.shape == (9, SIZE, 48, 3)
    assert torch.equal(calm, run((0.1, 0.1)))
    assert not torch.equal(calm, run((0.9, 0.9)))
    assert not torch.equal(calm, run((0.1, 0.1), speech=np.zeros_like(speech)))
    pipe.sampler = FlowMatchSampler(steps=2, batch_passes=False)
    assert (calm - run((0.1, 0.1))).abs().max() <= 1  # float reassociation may move a rounding


def record_face(model):
    """Record the ``face`` each forward of ``model`` receives (None when not given)."""
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("face")), with_kwargs=True)
    return seen


def test_identity_branch_reads_the_face_crop(files, tmp_path, caplog):
    """A precomputed identity branch gets the CLIP tokens of the crop around the face mediapipe
    finds (the crop training used), which changes the video against face=none (whole-image CLIP
    tokens); a photo without a face falls back to the whole image with a warning."""
    adapters = read_adapters(files["identity"])
    pipe = TalkingPortraitPipeline.load(adapters, files["wan"], files["wav2vec"],
                                        sampler=FlowMatchSampler(steps=2), device="cpu")
    photo = read_image(files["image"])
    size = target_size(*photo.size, SIZE, pipe.grid)
    picture = photo.resize(size)
    box = scale_box(detect_face_box(photo), photo.size, size)
    # The astronaut's face: upper middle of the 48×64 frame, well inside it.
    assert box is not None and 10 < (box[0] + box[2]) / 2 < 38 and 8 < (box[1] + box[3]) / 2 < 32
    assert 6 < box[2] - box[0] < 30
    speech = read_speech(files["audio"])
    seen = record_face(pipe.model)
    crop = pipe(picture, speech, 9, FPS, seed=3, face_box=box).int()
    crop_tokens = pipe.image_encoder(face_crops(np.asarray(picture)[None], [box], pipe.face_margin).float() / 127.5 - 1)
    assert seen and all(f is not None and f.shape[1:] == (257, 1280) for f in seen)
    torch.testing.assert_close(seen[0][:1], crop_tokens)
    seen.clear()
    whole = pipe(picture, speech, 9, FPS, seed=3, face_box=None).int()
    assert seen and all(f is None for f in seen)  # the model falls back to the CLIP image tokens
    assert not torch.equal(crop, whole)

    out = tmp_path / "id.mp4"
    result = infer(**load_config(args(files, out, adapters=files["identity"])))
    assert result["identity"] and result["motion"] is None and result["audio_mode"] == "clip"
    assert result["face_box"] == pytest.approx(box)
    assert (result["num_frames"], result["fps"], result["width"], result["height"]) == (25, FPS, 48, SIZE)
    check_video(out, frames=25, fps=FPS)
    assert infer(**load_config(args(files, out, adapters=files["identity"], face="none")))["face_box"] is None

    Image.fromarray(np.full((512, 384, 3), 128, np.uint8)).save(tmp_path / "wall.png")
    with caplog.at_level("WARNING", logger="ft_train.infer"):
        result = infer(**load_config(args(files, out, adapters=files["identity"], image=tmp_path / "wall.png")))
    assert result["face_box"] is None
    assert "face: no face found in" in caplog.text and "whole image's CLIP tokens" in caplog.text
    with pytest.raises(SystemExit, match="ft-infer: face: must be auto"):
        main(args(files, tmp_path / "x.mp4", adapters=files["identity"], face="crop"))


@pytest.fixture(scope="module")
def arcface_bundle(files, tiny_transformer_config):
    """An identity bundle whose branch runs a tiny random ArcFace (IResNet) on face crops; its
    config names the training machine's backbone path, which is not here."""
    from .test_identity_motion import random_iresnet

    root = files["root"]
    backbone = root / "backbone.pth"
    torch.save(random_iresnet().state_dict(), backbone)
    model_cfg = yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())
    model_cfg.pop("_target_")
    model_cfg["pretrained"] = str(files["wan"])
    model_cfg["identity"].update(enabled=True, encoder="arcface", arcface_path=str(backbone), face_dim=512)
    net = random_adapters(build_model(**model_cfg, audio_mode="clip"), seed=4)
    model_cfg["identity"]["arcface_path"] = "/train/weights/backbone.pth"
    export_bundle(AdapterCheckpoint(root / "run", "state_dict", net.adapter_state_dict(), {"audio_mode": "clip"}),
                  root / "arcface_bundle", torch.float32,
                  ModelSpec.from_run_config({"model": model_cfg, "data": {"fps": FPS}}, "clip"), None)
    return root / "arcface_bundle", backbone


def test_arcface_bundle_reads_the_pixel_crop(files, arcface_bundle, tmp_path, capsys):
    """An arcface identity branch gets the 112×112 face crop in [-1, 1] (ArcFace's input); its
    network comes from `arcface` (default: the path it was trained with). Without a face, or with
    face=none, there is nothing for it to read: one line says so before any weights load."""
    bundle, backbone = arcface_bundle
    adapters = read_adapters(bundle)
    assert adapters.spec.identity["encoder"] == "arcface"
    adapters.spec = replace(adapters.spec, identity=resolve_arcface(adapters.spec.identity, backbone))
    pipe = TalkingPortraitPipeline.load(adapters, files["wan"], files["wav2vec"],
                                        sampler=FlowMatchSampler(steps=2), device="cpu")
    photo = read_image(files["image"])
    size = target_size(*photo.size, SIZE, pipe.grid)
    picture = photo.resize(size)
    box = scale_box(detect_face_box(photo), photo.size, size)
    seen = record_face(pipe.model)
    speech = read_speech(files["audio"])
    video = pipe(picture, speech, 9, FPS, seed=3, face_box=box)
    assert video.shape == (9, SIZE, 48, 3)
    expected = face_crops(np.asarray(picture)[None], [box], pipe.face_margin, 112).float() / 127.5 - 1
    assert seen and all(f.shape[1:] == (3, 112, 112) for f in seen)
    torch.testing.assert_close(seen[0][:1], expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="face: the identity branch .*arcface.* reads a face crop"):
        pipe(picture, speech, 9, FPS, seed=3, face_box=None)

    out = tmp_path / "arc.mp4"
    assert main(args(files, out, adapters=bundle, arcface=backbone)) == 0
    assert "identity: face crop" in capsys.readouterr().out
    check_video(out, frames=25, fps=FPS)

    with pytest.raises(SystemExit) as info:
        main(args(files, tmp_path / "x.mp4", adapters=bundle))
    assert str(info.value) == ("ft-infer: arcface: no file at /train/weights/backbone.pth (the adapters' "
                               "model.identity.arcface_path); point arcface at the insightface backbone.pth "
                               "the adapters were trained with")
    with pytest.raises(SystemExit, match=r"^ft-infer: face: none, but the adapters' identity branch "
                                         r"\(model.identity.encoder=arcface\) reads a face crop; use face=auto$"):
        main(args(files, tmp_path / "x.mp4", adapters=bundle, arcface=backbone, face="none"))
    Image.fromarray(np.full((512, 384, 3), 128, np.uint8)).save(tmp_path / "wall.png")
    with pytest.raises(SystemExit) as info:
        main(args(files, tmp_path / "x.mp4", adapters=bundle, arcface=backbone, image=tmp_path / "wall.png"))
    text = str(info.value)
    assert text.startswith("ft-infer: face: no face found in ") and "arcface" in text and "\n" not in text
    assert not (tmp_path / "x.mp4").exists()


def test_installed_command_with_the_released_file(files, tmp_path):
    """The ft-infer script; the released layout runs frame-level, has no motion module (ω warned
    about and ignored) and no base path (wan given); fps given explicitly."""
    out = tmp_path / "official.mp4"
    command = shutil.which("ft-infer") or os.path.join(os.path.dirname(sys.executable), "ft-infer")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [command, *args(files, out, adapters=files["official"], wan=files["wan"], fps=25, omega_l=0.3)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frame-level audio" in proc.stdout and "adapters: official" in proc.stdout
    assert "no motion module" in proc.stderr and "ignored" in proc.stderr
    check_video(out, frames=25, fps=25.0)


@pytest.mark.parametrize("override, message", [
    ({"omega_l": 1.5}, "omega_l: 1.5 is outside [0, 1]"),
    ({"omega_b": -0.1}, "omega_b: -0.1 is outside [0, 1]"),
    ({"omega_l": "fast"}, "omega_l: must be a number in [0, 1]"),
    ({"segment_frames": 80}, "segment_frames: must be 4k+1"),
    ({"overlap_frames": 4}, "overlap_frames: must be 4m+1"),
    ({"overlap_frames": 81}, "overlap_frames: must be 4m+1 (1, 5, 9, ...) and below segment_frames=81"),
    ({"max_seconds": 0}, "max_seconds: must be a number of seconds > 0"),
    ({"max_seconds": 0.5}, "lasts 1.0 s, longer than max_seconds=0.5"),  # the speech is refused
    ({"long_mode": "loop"}, "long_mode: must be continue"),
    ({"device": "tpu"}, "device: "),
    ({"dtype": "int8"}, "dtype: unknown 'int8'"),
    ({"sampler.steps": 0}, "sampler.steps must be a positive integer"),
])
def test_bad_settings_fail_in_one_line_naming_the_key(files, tmp_path, override, message):
    with pytest.raises(SystemExit) as info:
        main(args(files, tmp_path / "x.mp4", **override))
    text = str(info.value)
    assert text.startswith("ft-infer: ") and message in text and "\n" not in text
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.parametrize("key", ["image", "audio", "adapters", "wav2vec", "wan"])
def test_missing_paths_fail_naming_the_key(files, tmp_path, key):
    missing = tmp_path / f"no_{key}"
    with pytest.raises(SystemExit) as info:
        main(args(files, tmp_path / "x.mp4", **{key: missing}))
    text = str(info.value)
    assert text.startswith(f"ft-infer: {key}: ") and str(missing) in text and "\n" not in text


def test_unreadable_inputs_and_unset_keys(files, tmp_path):
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(SystemExit, match=r"ft-infer: image: cannot read .*notes.txt as an image"):
        main(args(files, tmp_path / "x.mp4", image=tmp_path / "notes.txt"))
    with pytest.raises(SystemExit, match=r"ft-infer: audio: .*notes.txt"):
        main(args(files, tmp_path / "x.mp4", audio=tmp_path / "notes.txt"))
    with pytest.raises(SystemExit, match="wan: not set"):  # the released file names no base folder
        main(args(files, tmp_path / "x.mp4", adapters=files["official"]))
    with pytest.raises(SystemExit, match=r"ft-infer: set image \(e.g. ft-infer "):
        main([a for a in args(files, tmp_path / "x.mp4") if not a.startswith("image=")])


def test_compiled_blocks_sample_the_same_video(files):
    """compile_blocks=true (Inductor) samples what the eager model samples."""
    adapters = read_adapters(files["bundle"])
    outs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        pipe = TalkingPortraitPipeline.load(read_adapters(files["bundle"]), files["wan"], files["wav2vec"],
                                            sampler=FlowMatchSampler(steps=2), device="cpu", compile_blocks=compiled)
        assert all((b._compiled_call_impl is not None) == compiled for b in pipe.model.transformer.blocks)
        picture = read_image(files["image"]).resize(target_size(384, 512, SIZE, pipe.grid))
        outs.append(pipe(picture, read_speech(files["audio"]), 9, FPS, prompt="a woman is talking",
                         omega=(0.5, 0.5), seed=3).int())
    assert adapters.spec.audio_mode == "frame"
    assert (outs[0] - outs[1]).abs().max() <= 1  # kernels fused differently may move a rounding


def test_fp8_blocks_sample_nearly_the_same_video(files):
    """frozen_fp8=true (ft-infer key) quantises the loaded DiT's block weights on the device and
    samples a video close to the full-precision one."""
    from ft_train.speed.fp8 import Fp8FrozenLinear

    outs = []
    for fp8 in (False, True):
        pipe = TalkingPortraitPipeline.load(read_adapters(files["bundle"]), files["wan"], files["wav2vec"],
                                            sampler=FlowMatchSampler(steps=2), device="cpu", frozen_fp8=fp8)
        assert any(isinstance(m, Fp8FrozenLinear) for m in pipe.model.modules()) == fp8
        picture = read_image(files["image"]).resize(target_size(384, 512, SIZE, pipe.grid))
        outs.append(pipe(picture, read_speech(files["audio"]), 9, FPS, prompt="a woman is talking",
                         omega=(0.5, 0.5), seed=3).float())
    assert outs[0].shape == outs[1].shape
    assert (outs[0] - outs[1]).abs().mean() < 2.0 and not torch.equal(outs[0], outs[1])
