"""Frozen encoders: tiny random models saved in the real folder layouts load back through the real
loaders, give the documented shapes, and missing/broken folders fail with the config key named."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ft_train.models.audio import wav2vec_num_tokens
from ft_train.data.clip_prep import (
    FACE_CROP_SIZE,
    clip_audio_window,
    crop_face,
    encode_clips,
    face_crop_box,
    face_form,
    lip_mask_to_latent,
)
from ft_train.models.encoders import EncoderWeightsError, load_encoders
from ft_train.tiny import save_tiny_encoders

# Deliberately not the real widths (1280/4096/768): every width must come from the loaded model.
WIDTHS = dict(image_dim=48, text_dim=40, audio_dim=24, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    save_tiny_encoders(root / "wan", root / "wav2vec", **WIDTHS)
    return root / "wan", root / "wav2vec"


@pytest.fixture(scope="module")
def encoders(folders):
    return load_encoders(*folders)


def test_round_trip_loads_the_saved_weights(folders, encoders):
    wan, wav2vec = folders
    saved = {
        "vae": (load_file(wan / "vae" / "diffusion_pytorch_model.safetensors"), encoders.vae.vae),
        "image": (load_file(wan / "image_encoder" / "model.safetensors"), encoders.image.model),
        "text": (load_file(wan / "text_encoder" / "model.safetensors"), encoders.text.model),
        "audio": (load_file(wav2vec / "model.safetensors"), encoders.audio.model),
    }
    for name, (tensors, module) in saved.items():
        state = module.state_dict()
        for key, value in tensors.items():
            assert key in state, f"{name}: {key} not loaded"
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"{name}: {key}")
        assert not any(p.requires_grad for p in module.parameters()), f"{name} is not frozen"
        assert not module.training, f"{name} is not in eval mode"
    assert encoders.widths() == {"image": 48, "text": 40, "audio": 24}
    assert encoders.audio.feature_extractor is not None  # preprocessor_config.json was found


def test_vae_shapes_normalisation_and_condition(encoders):
    vae = encoders.vae
    torch.manual_seed(0)
    video = torch.rand(2, 3, 9, 16, 32) * 2 - 1
    latents = vae(video)
    assert latents.shape == (2, 16, 3, 2, 4) and latents.dtype == torch.float32
    cfg = vae.vae.config
    mu = vae.vae.encode(video).latent_dist.mode()
    expect = (mu - torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)) / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents, expect)
    cond = vae.encode_condition(video[:, :, 0], 9)
    assert cond.shape == latents.shape
    # The VAE is causal: latent frame 0 sees frame 0 only, so the condition shares it with the clip.
    torch.testing.assert_close(cond[:, :, 0], latents[:, :, 0])
    assert not torch.allclose(cond[:, :, 1:], latents[:, :, 1:])
    with pytest.raises(ValueError, match="4k\\+1"):
        vae(torch.zeros(1, 3, 8, 16, 16))


def test_clip_text_audio_shapes(encoders):
    images = torch.rand(3, 3, 50, 70) * 2 - 1  # any size: resized to the model's image_size
    assert encoders.image(images).shape == (3, (32 // 8) ** 2 + 1, 48)

    long, short, empty = encoders.text(["a person is talking to the camera", "a man", ""])
    assert long.shape == (8, 40) and short.shape == (3, 40) and empty.shape == (1, 40)  # words + </s>
    # Padding is masked out: a prompt encodes the same alone or beside a longer one.
    torch.testing.assert_close(encoders.text(["a man"])[0], short)

    waves = [np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1 for i, n in enumerate((16000, 16000, 10880))]
    feats = encoders.audio(waves)
    assert [tuple(f.shape) for f in feats] == [(wav2vec_num_tokens(16000), 24)] * 2 + [(wav2vec_num_tokens(10880), 24)]
    assert wav2vec_num_tokens(16000) == 49  # 50 tokens/s
    # The feature extractor normalises each waveform: loudness does not change the features.
    torch.testing.assert_close(encoders.audio([waves[2] * 3])[0], feats[2], atol=1e-4, rtol=1e-4)
    # Batch neighbours of another length do not change a clip's features.
    torch.testing.assert_close(encoders.audio([waves[2]])[0], feats[2])


def test_encode_clips_one_call_gives_every_condition(encoders):
    frames = torch.randint(0, 256, (2, 9, 16, 32, 3), dtype=torch.uint8)
    masks = torch.zeros(2, 9, 16, 32, dtype=torch.bool)
    masks[:, :, 8:16, 8:24] = True
    out = encode_clips(encoders, frames, [np.zeros(5760, np.float32)] * 2, masks, ["a man", ""])
    assert out["latents"].shape == out["image_latents"].shape == (2, 16, 3, 2, 4)
    assert out["clip"].shape == (2, 17, 48) and out["lip_mask"].shape == (2, 3, 2, 4)
    assert [t.shape[0] for t in out["text"]] == [3, 1] and out["audio"][0].shape[1] == 24
    # The I2V condition is VAE([frame 0, zeros...]) of exactly these frames.
    video = frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    torch.testing.assert_close(out["image_latents"], encoders.vae.encode_condition(video[:, :, 0], 9))


def test_face_crop_is_a_square_holding_the_face_box():
    h, w = 120, 200
    frame = np.zeros((h, w, 3), np.uint8)
    box = (120.0, 30.0, 160.0, 80.0)  # 40×50 face box
    frame[30:80, 120:160] = (255, 0, 0)
    x0, y0, x1, y1 = face_crop_box(box, h, w, margin=0.2)
    assert x1 - x0 == y1 - y0 == 70  # (1 + 2·0.2) × the longer side
    assert x0 <= 120 and y0 <= 30 and x1 >= 160 and y1 >= 80  # holds the face box
    assert abs((x0 + x1) / 2 - 140) <= 1 and abs((y0 + y1) / 2 - 55) <= 1  # centred on it
    crop = crop_face(frame, box, margin=0.2)
    assert crop.shape == (FACE_CROP_SIZE, FACE_CROP_SIZE, 3) and crop.dtype == np.uint8
    red = crop[..., 0] > 127
    ys, xs = np.nonzero(red)
    scale = FACE_CROP_SIZE / 70
    assert abs(ys.min() - (30 - y0) * scale) <= 2 and abs(ys.max() + 1 - (80 - y0) * scale) <= 2
    assert abs(xs.min() - (120 - x0) * scale) <= 2 and abs(xs.max() + 1 - (160 - x0) * scale) <= 2
    # Near the border the square shifts into the frame instead of padding...
    x0, y0, x1, y1 = face_crop_box((180, 0, 200, 30), h, w, margin=0.5)
    assert (x1, y0, x1 - x0, y1 - y0) == (200, 0, 60, 60)
    # ...and only a square larger than the frame reaches outside it (padded black).
    big = crop_face(np.full((40, 60, 3), 200, np.uint8), (10, 5, 50, 35), margin=0.5, size=60)
    assert big.shape == (60, 60, 3) and big[0].max() == 0 and big[30, 30, 0] == 200
    # No box: the whole frame, resized.
    whole = crop_face(frame, None, size=50)
    assert whole.shape == (50, 50, 3) and whole[..., 0].max() == 255


def test_encode_clips_face_tokens(encoders):
    frames = torch.randint(0, 256, (2, 9, 32, 32, 3), dtype=torch.uint8)
    masks = torch.zeros(2, 9, 32, 32, dtype=torch.bool)
    boxes = [(8.0, 8.0, 20.0, 24.0), None]
    out = encode_clips(encoders, frames, [np.zeros(5760, np.float32)] * 2, masks, ["a man", ""], face_boxes=boxes)
    assert out["face"].shape == out["clip"].shape == (2, 17, 48)
    crop = torch.from_numpy(crop_face(frames[0, 0].numpy(), boxes[0]))
    torch.testing.assert_close(out["face"][0], encoders.image(crop.permute(2, 0, 1)[None].float() / 127.5 - 1)[0])
    torch.testing.assert_close(out["face"][1], out["clip"][1])  # no box: the CLIP tokens (the fallback)
    assert "face" not in encode_clips(encoders, frames, [np.zeros(5760, np.float32)] * 2, masks, ["a", "b"])
    # uint8 masks are coverage /255: 255 = a fully covered cell, as True is.
    full = encode_clips(encoders, frames[:1], [np.zeros(5760, np.float32)], masks[:1] | True, ["a"])
    coverage = encode_clips(encoders, frames[:1], [np.zeros(5760, np.float32)],
                        torch.full((1, 9, 32, 32), 255, dtype=torch.uint8), ["a"])
    torch.testing.assert_close(full["lip_mask"], coverage["lip_mask"])


def test_encode_clips_face_pixels(encoders):
    """face=pixels: the crop itself at ArcFace's 112×112, uint8 (a clip without a box: the whole
    frame); face=none: no face output at all."""
    frames = torch.randint(0, 256, (2, 9, 32, 32, 3), dtype=torch.uint8)
    masks = torch.zeros(2, 9, 32, 32, dtype=torch.bool)
    boxes = [(8.0, 8.0, 20.0, 24.0), None]
    audio = [np.zeros(5760, np.float32)] * 2
    out = encode_clips(encoders, frames, audio, masks, ["a", "b"], face_boxes=boxes, face="pixels")
    assert "face" not in out and out["face_pixels"].shape == (2, 3, 112, 112) and out["face_pixels"].dtype == torch.uint8
    for i in range(2):
        expected = torch.from_numpy(crop_face(frames[i, 0].numpy(), boxes[i], size=112)).permute(2, 0, 1)
        assert torch.equal(out["face_pixels"][i], expected)
    none = encode_clips(encoders, frames, audio, masks, ["a", "b"], face_boxes=boxes, face="none")
    assert "face" not in none and "face_pixels" not in none


def test_face_setting_reads_old_booleans_and_names_the_key():
    assert [face_form(v) for v in ("clip", "pixels", "none", True, False)] == ["clip", "pixels", "none", "clip", "none"]
    with pytest.raises(ValueError, match=r"data.face='arcface' must be one of clip, pixels, none"):
        face_form("arcface", "data.face")


def test_clip_audio_window_is_frame_aligned():
    audio = np.arange(16000, dtype=np.float32)
    window = clip_audio_window(audio, start_frame=5, num_frames=9, fps=25.0)
    assert window.shape == (5760,) and window[0] == 5 * 640  # 640 samples per frame at 25 fps
    assert clip_audio_window(audio[: 5 * 640 + 5759], 5, 9, 25.0)[-1] == 0  # one sample short: padded
    with pytest.raises(ValueError, match="need"):
        clip_audio_window(audio[:8000], 5, 9, 25.0)


@pytest.mark.parametrize("mode", ["trilinear", "area"])
def test_lip_mask_to_latent(mode):
    masks = torch.zeros(1, 17, 64, 64)
    masks[:, :, 40:56, 16:32] = 1  # latent rows 5-6, cols 2-3
    lat = lip_mask_to_latent(masks, (5, 8, 8), mode)
    assert lat.shape == (1, 5, 8, 8) and 0 <= lat.min() and lat.max() <= 1
    assert torch.equal(lat[0, :, 5:7, 2:4], torch.ones(5, 2, 2))
    lat[0, :, 5:7, 2:4] = 0
    assert lat.abs().sum() == 0
    # area = exact coverage: a mask on frame 0 only lands in latent frame 0 only.
    first = torch.zeros(1, 17, 64, 64)
    first[:, 0] = 1
    assert lip_mask_to_latent(first, (5, 8, 8), "area")[0, :, 0, 0].tolist() == [1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="lip_mask_resize"):
        lip_mask_to_latent(masks, (5, 8, 8), "nearest")


def test_missing_or_broken_folders_name_the_key(folders, tmp_path):
    wan, wav2vec = folders
    with pytest.raises(EncoderWeightsError, match=r"^encoders\.wan: no folder .*nope"):
        load_encoders(tmp_path / "nope", wav2vec)
    with pytest.raises(EncoderWeightsError, match=r"^encoders\.wav2vec: no wav2vec2 model"):
        load_encoders(wan, tmp_path / "nope")
    with pytest.raises(EncoderWeightsError, match=r"^encoders\.wan: not set"):
        load_encoders(None, wav2vec, encoders=("vae",))
    # Only the encoders asked for need their folders.
    assert load_encoders(None, wav2vec, encoders=("audio",)).vae is None

    partial = tmp_path / "partial"
    shutil.copytree(wan, partial, ignore=shutil.ignore_patterns("text_encoder"))
    with pytest.raises(EncoderWeightsError, match=r"^encoders\.wan: no text_encoder/ at .*partial"):
        load_encoders(partial, wav2vec)

    broken = tmp_path / "broken"
    shutil.copytree(wan, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(EncoderWeightsError, match=r"^encoders\.wan: cannot load AutoencoderKLWan from .*broken"):
        load_encoders(broken, wav2vec, encoders=("vae",))
    assert "\n" not in str(pytest.raises(EncoderWeightsError, load_encoders, broken, wav2vec).value)


def test_other_speech_encoders_of_the_wav2vec2_family_load_and_others_are_refused(folders, tmp_path):
    """A HuBERT folder (e.g. for Chinese speech) loads through the same loader and gives its own
    ``last_hidden_state`` of the normalised waveform; a model whose convolutions do not give
    wav2vec2's 50 tokens/s, or no speech model at all, is refused naming the key."""
    from transformers import BertConfig, BertModel, HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model

    from ft_train.models.encoders import load_audio_encoder

    _, wav2vec = folders
    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                 conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    hubert = HubertModel(HubertConfig(**small)).eval()
    hubert.save_pretrained(tmp_path / "hubert")
    shutil.copy(wav2vec / "preprocessor_config.json", tmp_path / "hubert")  # zero mean, unit variance
    encoder = load_audio_encoder(tmp_path / "hubert")
    assert type(encoder.model).__name__ == "HubertModel" and encoder.width == 16
    wave = np.sin(np.arange(16000, dtype=np.float32) * 0.03) * 0.4 + 0.1
    [got] = encoder([wave])
    x = torch.from_numpy((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7))[None]
    with torch.no_grad():
        expected = hubert(x).last_hidden_state[0]
    assert got.shape == (wav2vec_num_tokens(16000), 16)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)

    Wav2Vec2Model(Wav2Vec2Config(**small, conv_stride=(5, 2, 2, 2, 2, 2, 4))).save_pretrained(tmp_path / "hop640")
    with pytest.raises(EncoderWeightsError, match=r"^encoders\.wav2vec: .*hop640 holds a wav2vec2 model without wav2vec2's feature convolutions"):
        load_audio_encoder(tmp_path / "hop640")
    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(EncoderWeightsError, match=r"^encoders\.wav2vec: .*bert holds a bert model"):
        load_audio_encoder(tmp_path / "bert")
