"""Audio side of the FantasyTalking adapter: the projector and the per-latent-frame windows.

Audio features are wav2vec2-base-960h ``last_hidden_state`` tokens (768-d, one token per 20 ms
at 16 kHz, i.e. 50 tokens/s). The projector maps them to 2048-d; every DiT block then attends to
them through its own zero-initialised key/value projections (see ``adapter.py``).

The window derivation reproduces the released inference code (FantasyTalking ``model.py``,
``split_audio_sequence`` + ``split_tensor_with_padding``), so a
model trained here sees exactly the windows the official inference code builds.
"""

from __future__ import annotations

import torch
from torch import nn

from ..media import AUDIO_RATE

# wav2vec2-base feature-extractor convolutions (kernel, stride); hop = 5*2^6 = 320 samples.
WAV2VEC2_CONV = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


def wav2vec_num_tokens(num_samples: int) -> int:
    """Number of wav2vec2 output tokens for ``num_samples`` 16 kHz samples (conv arithmetic)."""
    length = int(num_samples)
    for kernel, stride in WAV2VEC2_CONV:
        length = (length - kernel) // stride + 1
    return max(length, 0)


def clip_audio_tokens(num_frames: int, fps: float, sample_rate: int = AUDIO_RATE) -> int:
    """wav2vec2 tokens for the audio of a clip of ``num_frames`` video frames at ``fps``.

    The official code cuts the waveform to ``num_frames / fps`` seconds before encoding
    (23 fps, 81 frames → 56,347 samples → 175 tokens).
    """
    return wav2vec_num_tokens(int(num_frames / fps * sample_rate))


def latent_frame_to_video_frames(latent_index: int) -> range:
    """Pixel frames covered by a latent frame of the Wan VAE (temporal stride 4, causal).

    Latent frame 0 is the reference (first) frame alone; latent frame i ≥ 1 covers video frames
    4(i−1)+1 … 4i.
    """
    if latent_index == 0:
        return range(0, 1)
    return range(4 * (latent_index - 1) + 1, 4 * latent_index + 1)


def audio_window_ranges(num_audio_tokens: int, num_frames: int, expand: int = 4) -> list[tuple[int, int]]:
    """Inclusive token ranges ``[start, end]`` of the audio window of every latent frame.

    Follows the official derivation: tokens per video frame ``tpf = L / num_frames``, half width
    ``int(2·tpf)``; latent frame i ≥ 1 is centred at ``int(tpf·(4(i−1)+1) + tpf·(4i+1)) / 2) − 1``,
    latent frame 0's range is re-anchored to end where frame 1's range starts, and every range is
    widened by ``expand`` tokens per side. Ranges may reach outside ``[0, L)``; the caller pads.

    Args:
        num_audio_tokens: L, wav2vec tokens for the clip.
        num_frames: video frames of the clip (4k+1).
        expand: tokens added on each side (the release uses 4).
    Returns:
        ``(num_frames − 1)//4 + 1`` ranges, all of length ``2·half + 1 + 2·expand``.
    """
    if num_frames < 1 or (num_frames - 1) % 4 != 0:
        raise ValueError(f"num_frames must be 4k+1 (got {num_frames}); the Wan VAE has temporal stride 4")
    num_latent = (num_frames - 1) // 4 + 1
    tpf = num_audio_tokens / num_frames
    half = int(tpf * 4 / 2)
    centres = [0]
    for i in range(1, num_latent):
        start = tpf * ((i - 1) * 4 + 1)
        end = tpf * (i * 4 + 1)
        centres.append(int((start + end) / 2) - 1)
    ranges = [[c - half, c + half] for c in centres]
    if num_latent > 1:
        ranges[0] = [-(half * 2 - ranges[1][0]), ranges[1][0]]
    return [(s - expand, e + expand) for s, e in ranges]


def audio_window_index(
    num_audio_tokens: int, num_frames: int, expand: int = 4, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices of every latent frame's audio window.

    The valid tokens of each window are packed at its start, as the release does (its padding is
    zeros at the end of the window); ``lengths`` says how many leading positions are real. Padded
    positions point at token 0 and must be masked by the consumer.

    Returns:
        index ``(F_lat, W)`` int64 into the clip's tokens and lengths ``(F_lat,)`` int64.
    """
    ranges = audio_window_ranges(num_audio_tokens, num_frames, expand)
    width = ranges[0][1] - ranges[0][0] + 1
    index = torch.zeros(len(ranges), width, dtype=torch.long)
    lengths = torch.zeros(len(ranges), dtype=torch.long)
    for i, (start, end) in enumerate(ranges):
        lo, hi = max(start, 0), min(end, num_audio_tokens - 1)
        n = max(hi - lo + 1, 0)
        index[i, :n] = torch.arange(lo, lo + n)
        lengths[i] = n
    return index.to(device), lengths.to(device)


def split_audio_windows(
    audio: torch.Tensor, num_frames: int, expand: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut audio tokens into one zero-padded window per latent frame (the release's layout).

    Args:
        audio: ``(B, L, C)`` audio tokens of the whole clip.
        num_frames: video frames of the clip (4k+1).
        expand: window widening per side, in tokens.
    Returns:
        windows ``(B, F_lat, W, C)`` and lengths ``(F_lat,)`` (the same for every batch item).
    """
    index, lengths = audio_window_index(audio.shape[1], num_frames, expand, audio.device)
    valid = torch.arange(index.shape[1], device=audio.device)[None, :] < lengths[:, None]
    windows = audio[:, index] * valid[None, :, :, None].to(audio.dtype)
    return windows, lengths


class AudioProjModel(nn.Module):
    """wav2vec2 features → adapter context: ``Linear(768→2048, no bias)`` then ``LayerNorm``.

    Matches the released ``proj_model`` (keys ``proj.weight`` [2048, 768], ``norm.weight``,
    ``norm.bias``). Input ``(B, L, in_dim)``, output ``(B, L, out_dim)``.
    """

    def __init__(self, in_dim: int = 768, out_dim: int = 2048):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, audio_features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(audio_features))


def num_latent_frames(num_frames: int) -> int:
    """Latent frames of the Wan VAE for ``num_frames`` (4k+1) video frames."""
    return (num_frames - 1) // 4 + 1


def num_video_frames(num_latent: int) -> int:
    """Video frames (4k+1) that produce ``num_latent`` latent frames."""
    return 4 * (num_latent - 1) + 1


__all__ = [
    "AudioProjModel",
    "audio_window_index",
    "audio_window_ranges",
    "clip_audio_tokens",
    "latent_frame_to_video_frames",
    "num_latent_frames",
    "num_video_frames",
    "split_audio_windows",
    "wav2vec_num_tokens",
]
