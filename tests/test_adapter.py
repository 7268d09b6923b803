"""The audio adapter: exact identity when off, and attention equal to independent references."""

import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from ft_train.models import audio_attention, build_model, load_transformer
from ft_train.models.audio import audio_window_index


def random_inputs(batch=2, frames=5, hw=(4, 6), audio_len=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_video = 4 * (frames - 1) + 1
    audio_len = audio_len or int(num_video / 23 * 50)
    return {
        "hidden_states": torch.randn(batch, 36, frames, *hw, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "text": torch.randn(batch, 512, 4096, generator=g),
        "image": torch.randn(batch, 257, 1280, generator=g),
        "audio": torch.randn(batch, audio_len, 768, generator=g),
    }


def plain_forward(plain, x):
    return plain(
        hidden_states=x["hidden_states"],
        timestep=x["timestep"],
        encoder_hidden_states=x["text"],
        encoder_hidden_states_image=x["image"],
        return_dict=False,
    )[0]


def randomise_adapter(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.audio_kv.parameters()) + list(model.audio_proj.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("mode", ["clip", "frame"])
def test_zero_initialised_adapter_is_exactly_the_plain_transformer(tiny_pretrained, mode):
    plain = WanTransformer3DModel.from_pretrained(tiny_pretrained, subfolder="transformer")
    model = build_model(pretrained=str(tiny_pretrained), audio_mode=mode)
    x = random_inputs()
    with torch.no_grad():
        expected = plain_forward(plain, x)
        got = model(x["hidden_states"], x["timestep"], x["text"], x["image"], x["audio"])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("mode", ["clip", "frame"])
def test_audio_scale_zero_is_exactly_the_plain_transformer(tiny_pretrained, mode):
    plain = WanTransformer3DModel.from_pretrained(tiny_pretrained, subfolder="transformer")
    model = build_model(pretrained=str(tiny_pretrained), audio_mode=mode)
    randomise_adapter(model)
    x = random_inputs()
    with torch.no_grad():
        expected = plain_forward(plain, x)
        off = model(x["hidden_states"], x["timestep"], x["text"], x["image"], x["audio"], audio_scale=0.0)
        on = model(x["hidden_states"], x["timestep"], x["text"], x["image"], x["audio"], audio_scale=1.0)
        # per-sample scale: sample 0 off, sample 1 on
        mixed = model(x["hidden_states"], x["timestep"], x["text"], x["image"], x["audio"],
                      audio_scale=torch.tensor([0.0, 1.0]))
    assert torch.equal(off, expected)
    assert not torch.allclose(on, expected, atol=1e-4)  # the branch really is active
    assert torch.equal(mixed[0], expected[0])
    torch.testing.assert_close(mixed[1], on[1])


def reference_attention(q, k, v, mask=None):
    """Softmax attention written out: q (B,S,H,D), k/v (B,L,H,D), mask (S,L) bool or None."""
    scores = torch.einsum("bshd,blhd->bhsl", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhsl,blhd->bshd", scores.softmax(-1), v)


def test_clip_mode_is_full_attention_over_audio_tokens():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 30, 3, 8, generator=g), torch.randn(2, 11, 3, 8, generator=g), torch.randn(2, 11, 3, 8, generator=g))
    torch.testing.assert_close(audio_attention(q, k, v), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def release_windows(num_tokens: int, num_frames: int, expand: int = 4):
    """The tokens of every latent frame's audio window, written out from the released rule (not
    with ft_train's window code): tpf = tokens per video frame, half width int(2·tpf); latent
    frame i ≥ 1 covers video frames 4(i−1)+1 … 4i and is centred at
    int((tpf·(4(i−1)+1) + tpf·(4i+1)) / 2) − 1; frame 0's window ends where frame 1's starts;
    each widened by ``expand`` tokens per side and clipped to the clip."""
    tpf = num_tokens / num_frames
    half = int(tpf * 2)
    out = []
    for i in range((num_frames - 1) // 4 + 1):
        if i == 0:
            first_video, last_video = 1, 4  # frame 1's centre anchors frame 0's end
            centre = int((tpf * first_video + tpf * (last_video + 1)) / 2) - 1
            lo, hi = centre - half - 2 * half, centre - half
        else:
            first_video, last_video = 4 * (i - 1) + 1, 4 * i
            centre = int((tpf * first_video + tpf * (last_video + 1)) / 2) - 1
            lo, hi = centre - half, centre + half
        out.append([t for t in range(lo - expand, hi + expand + 1) if 0 <= t < num_tokens])
    return out


def test_release_windows_reproduce_the_pinned_table():
    """The hand-written rule above gives the released table (tests/test_audio_windows.py)."""
    windows = release_windows(175, 81)
    assert len(windows) == 21
    assert windows[0] == list(range(0, 6)) and windows[1] == list(range(0, 14))
    assert windows[2] == list(range(6, 23)) and windows[20] == list(range(161, 175))
    assert [len(w) for w in windows] == [6, 14] + [17] * 18 + [14]


def test_frame_mode_equals_dense_block_diagonal_reference_with_padding_masked():
    g = torch.Generator().manual_seed(0)
    bsz, frames, per_frame, heads, dim = 2, 21, 6, 2, 8
    num_tokens = 175
    index, lengths = audio_window_index(num_tokens, 81)  # windows 6, 14, 17..., 14 valid of 17
    width = index.shape[1]
    q = torch.randn(bsz, frames * per_frame, heads, dim, generator=g)
    keys = torch.randn(bsz, num_tokens, heads, dim, generator=g)
    values = torch.randn(bsz, num_tokens, heads, dim, generator=g)
    k_win, v_win = keys[:, index], values[:, index]  # (B, F, W, H, D); padded slots hold token 0
    got = audio_attention(q, k_win, v_win, lengths)

    # Dense reference: one attention over all F·W window slots with an explicit S × (F·W) mask
    # that lets a query see only its own frame's valid slots.
    query_frame = torch.arange(frames).repeat_interleave(per_frame)  # (S,)
    slot_frame = torch.arange(frames).repeat_interleave(width)  # (F·W,)
    slot_valid = (torch.arange(width)[None, :] < lengths[:, None]).reshape(-1)
    mask = (query_frame[:, None] == slot_frame[None, :]) & slot_valid[None, :]
    expected = reference_attention(q, k_win.reshape(bsz, -1, heads, dim), v_win.reshape(bsz, -1, heads, dim), mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # And against the most literal reference: per frame, attention over only its real tokens, the
    # windows written out from the released rule (an off-by-one in ft_train's window code shows here).
    for f, tokens in enumerate(release_windows(num_tokens, 81)):
        rows = slice(f * per_frame, (f + 1) * per_frame)
        literal = reference_attention(q[:, rows], keys[:, tokens], values[:, tokens])
        torch.testing.assert_close(got[:, rows], literal, atol=1e-5, rtol=1e-5, msg=f"latent frame {f}")


def test_padded_slots_do_not_leak_into_the_output():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4 * 5, 2, 8, generator=g)
    k = torch.randn(1, 4, 7, 2, 8, generator=g)
    v = torch.randn(1, 4, 7, 2, 8, generator=g)
    lengths = torch.tensor([3, 7, 0, 5])  # frame 2 has no audio at all
    out = audio_attention(q, k, v, lengths)
    k2, v2 = k.clone(), v.clone()
    for f, n in enumerate(lengths.tolist()):
        k2[:, f, n:] += 100.0
        v2[:, f, n:] -= 50.0
    torch.testing.assert_close(audio_attention(q, k2, v2, lengths), out)
    assert torch.isfinite(out).all()
    assert out[:, 10:15].abs().max() == 0  # the empty window contributes nothing


def test_frame_and_clip_modes_differ_once_trained(tiny_pretrained):
    model = build_model(pretrained=str(tiny_pretrained))
    randomise_adapter(model)
    x = random_inputs()
    with torch.no_grad():
        model.audio_mode = "clip"
        clip = model(x["hidden_states"], x["timestep"], x["text"], x["image"], x["audio"])
        model.audio_mode = "frame"
        frame = model(x["hidden_states"], x["timestep"], x["text"], x["image"], x["audio"])
    assert not torch.allclose(clip, frame, atol=1e-4)


def test_only_adapter_trains_by_default_and_backbone_switch(tiny_pretrained):
    model = build_model(pretrained=str(tiny_pretrained))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.adapter_state_dict())
    assert "audio_kv.0.k_proj.weight" in trainable and "audio_proj.proj.weight" in trainable
    full = build_model(pretrained=str(tiny_pretrained), train_backbone=True)
    assert all(p.requires_grad for p in full.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pretrained):
    grads = []
    for checkpointing in (False, True):
        model = build_model(pretrained=str(tiny_pretrained), audio_mode="frame", gradient_checkpointing=checkpointing)
        randomise_adapter(model)
        model.train()
        x = random_inputs()
        out = model(x["hidden_states"], x["timestep"], x["text"], x["image"], x["audio"])
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)
    assert grads[0]["audio_proj.proj.weight"].abs().sum() > 0


def test_loader_errors_name_the_path(tmp_path, tiny_transformer_config):
    with pytest.raises(FileNotFoundError, match="model.pretrained: no diffusers Wan transformer"):
        load_transformer(str(tmp_path / "missing"))
    t2v = dict(tiny_transformer_config, in_channels=16, image_dim=None, added_kv_proj_dim=None)
    WanTransformer3DModel(**t2v).save_pretrained(tmp_path / "t2v")
    with pytest.raises(ValueError, match="not a Wan2.1 image-to-video DiT"):
        load_transformer(str(tmp_path / "t2v"))
