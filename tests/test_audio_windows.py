"""Audio windows reproduce the released inference code's derivation."""

import pytest
import torch

from ft_train.models.audio import (
    audio_window_index,
    audio_window_ranges,
    clip_audio_tokens,
    latent_frame_to_video_frames,
    split_audio_windows,
    wav2vec_num_tokens,
)


def test_wav2vec_token_count_matches_conv_arithmetic():
    # 81 frames at 23 fps = 3.5217 s = 56,347 samples -> 175 tokens (50 tokens/s, 20 ms hop).
    assert clip_audio_tokens(81, 23) == 175
    assert wav2vec_num_tokens(16000) == 49  # 1 s: receptive field 400 samples, hop 320
    assert clip_audio_tokens(81, 25) == 161
    assert clip_audio_tokens(81, 16) == 252


def test_window_table_23fps_81_frames():
    ranges = audio_window_ranges(175, 81, expand=4)
    assert len(ranges) == 21
    assert {e - s + 1 for s, e in ranges} == {17}
    assert ranges[0] == (-11, 5)
    assert ranges[1] == (-3, 13)
    assert ranges[2] == (6, 22)
    assert ranges[-1] == (161, 177)
    index, lengths = audio_window_index(175, 81)
    assert index.shape == (21, 17)
    assert lengths.tolist() == [6, 14] + [17] * 18 + [14]


def test_windows_hold_the_right_tokens_packed_at_the_start():
    audio = torch.arange(175, dtype=torch.float32).view(1, 175, 1).repeat(2, 1, 3) + 1  # token t -> t+1
    windows, lengths = split_audio_windows(audio, 81)
    assert windows.shape == (2, 21, 17, 3)
    # window 0: tokens 0..5 then zero padding
    assert windows[0, 0, :6, 0].tolist() == [1, 2, 3, 4, 5, 6]
    assert windows[0, 0, 6:].abs().sum() == 0
    # window 2: tokens 6..22, no padding
    assert windows[1, 2, :, 0].tolist() == [float(t + 1) for t in range(6, 23)]
    # last window: tokens 161..174 then padding
    assert windows[0, 20, :14, 2].tolist() == [float(t + 1) for t in range(161, 175)]
    assert windows[0, 20, 14:].abs().sum() == 0


def test_latent_frame_covers_four_video_frames():
    assert list(latent_frame_to_video_frames(0)) == [0]
    assert list(latent_frame_to_video_frames(1)) == [1, 2, 3, 4]
    assert list(latent_frame_to_video_frames(20)) == [77, 78, 79, 80]
    covered = [f for i in range(21) for f in latent_frame_to_video_frames(i)]
    assert covered == list(range(81))


def test_frame_count_must_be_4k_plus_1():
    with pytest.raises(ValueError, match="4k\\+1"):
        audio_window_ranges(175, 80)
