"""Euler flow-matching sampler: schedule, exact integration, the three-pass guidance, batching.

Analytic stand-ins make the expected results exact; the tiny Wan model checks the same paths on
the real network (with random audio weights, since zero-initialised ones would make the audio
passes trivially equal).
"""

import pytest
import torch

from ft_train.diffusion.sampler import FlowMatchSampler, guidance_passes, sampling_sigmas
from ft_train.models import build_model

F_LAT, H, W = 3, 4, 4  # 9 video frames, 32×32 pixels
TEXT_DIM, IMAGE_DIM, AUDIO_DIM = 4096, 1280, 768


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: on a shared, loaded CPU, intra-op threads cost more than they
    save (a tiny-DiT forward went from 0.03 s to 0.8 s with 2 threads under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


GUIDANCE = [(5.0, 4.5), (1.0, 0.0), (1.0, 1.0), (1.0, 4.5), (5.0, 0.0), (3.0, 1.0), (2.5, None)]


def conditions(bsz=2, seed=0, text_dim=TEXT_DIM, image_dim=IMAGE_DIM, audio_dim=AUDIO_DIM, audio_tokens=20):
    g = torch.Generator().manual_seed(seed)
    return {
        "image_latents": torch.randn(bsz, 16, F_LAT, H, W, generator=g),
        "image": torch.randn(bsz, 257, image_dim, generator=g),
        "text": torch.randn(bsz, 512, text_dim, generator=g),
        "negative_text": torch.randn(bsz, 512, text_dim, generator=g),
        "audio": torch.randn(bsz, audio_tokens, audio_dim, generator=g),
    }


def as_scale(audio_scale, bsz):
    scale = torch.as_tensor(audio_scale, dtype=torch.float32)
    return scale.expand(bsz) if scale.ndim == 0 else scale


class PassTable(torch.nn.Module):
    """Returns a fixed tensor per (prompt, audio on/off) pass, whatever the latents; records calls.

    The prompt is recognised by its first entry (+1 positive, −1 negative); audio is "on" for a
    sample when it is given and its audio_scale is non-zero.
    """

    def __init__(self, bsz, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = {key: torch.randn(bsz, 16, F_LAT, H, W, generator=g) for key in ("neg", "pos", "neg+a", "pos+a")}
        self.calls = []

    def forward(self, hidden, timestep, text, image, audio, audio_scale=1.0):
        bsz = hidden.shape[0]
        scale = as_scale(audio_scale, bsz)
        self.calls.append({"batch": bsz, "audio": audio is not None, "scale": scale.clone(), "t": timestep.clone()})
        per = self.table["pos"].shape[0]
        out = []
        for i in range(bsz):
            key = "pos" if text[i, 0, 0] > 0 else "neg"
            if audio is not None and scale[i] != 0:
                key += "+a"
            out.append(self.table[key][i % per])
        return torch.stack(out)

    def formula(self, cfg, audio_cfg):
        t = self.table
        if audio_cfg is None:
            return t["neg+a"] + cfg * (t["pos+a"] - t["neg+a"])
        return t["neg"] + cfg * (t["pos"] - t["neg"]) + audio_cfg * (t["pos+a"] - t["pos"])


def signed_prompts(cond):
    """Mark the prompts so a stand-in can tell them apart: +1 positive, −1 negative."""
    cond = dict(cond)
    cond["text"] = cond["text"].clone()
    cond["negative_text"] = cond["negative_text"].clone()
    cond["text"][:, 0, 0] = 1.0
    cond["negative_text"][:, 0, 0] = -1.0
    return cond


# --------------------------------------------------------------------------------------------
# Schedule


@pytest.mark.parametrize("steps,shift", [(30, 5.0), (7, 3.0), (1, 5.0), (10, 1.0)])
def test_schedule_endpoints_monotone_and_shift_formula(steps, shift):
    sig = sampling_sigmas(steps, shift)
    assert sig.shape == (steps + 1,) and sig.dtype == torch.float64
    assert sig[0].item() == 1.0 and sig[-1].item() == 0.0
    assert bool((sig[1:] < sig[:-1]).all())
    for i, s in enumerate(sig.tolist()):
        u = 1 - i / steps
        assert s == pytest.approx(shift * u / (1 + (shift - 1) * u), abs=1e-12)
    if shift > 1:  # the shift spends more of the steps at high noise
        assert bool((sig[1:-1] > torch.linspace(1, 0, steps + 1, dtype=torch.float64)[1:-1]).all())


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="steps"):
        sampling_sigmas(0)
    with pytest.raises(ValueError, match="shift"):
        sampling_sigmas(30, 0.0)
    with pytest.raises(ValueError, match="cfg"):
        FlowMatchSampler(cfg=float("nan"))


# --------------------------------------------------------------------------------------------
# Exact integration with analytic velocity fields


@pytest.mark.parametrize("batch_passes", [True, False])
def test_constant_velocity_is_integrated_exactly(batch_passes):
    """v ≡ c in every pass: guidance weights sum to 1, and Euler over σ 1→0 gives x0 = x1 − c."""
    c = torch.randn(2, 16, F_LAT, H, W, generator=torch.Generator().manual_seed(3))

    def model(hidden, timestep, text, image, audio, audio_scale=1.0):
        return c.repeat(hidden.shape[0] // 2, 1, 1, 1, 1)  # batched passes stack P copies

    noise = torch.randn(2, 16, F_LAT, H, W)
    sampler = FlowMatchSampler(steps=13, batch_passes=batch_passes)  # cfg 5, audio_cfg 4.5
    out = sampler(model, **narrow(), noise=noise)
    torch.testing.assert_close(out, noise - c, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg,audio_cfg", GUIDANCE)
@pytest.mark.parametrize("batch_passes", [True, False])
def test_straight_line_field_lands_on_the_guided_target(cfg, audio_cfg, batch_passes):
    """Each pass predicts the exact flow to its own clean point, v = (x − x0_pass)/σ; Euler on
    that field is exact, so sampling must end at the guidance formula applied to the x0's."""
    targets = PassTable(bsz=2, seed=5)

    def model(hidden, timestep, text, image, audio, audio_scale=1.0):
        x = hidden[:, :16]
        sigma = (timestep / 1000).view(-1, 1, 1, 1, 1)
        return (x - targets(hidden, timestep, text, image, audio, audio_scale)) / sigma

    sampler = FlowMatchSampler(steps=6, cfg=cfg, audio_cfg=audio_cfg, batch_passes=batch_passes)
    out = sampler(model, **signed_prompts(narrow()), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, targets.formula(cfg, audio_cfg), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The guidance combination and which passes run


@pytest.mark.parametrize("cfg,audio_cfg", GUIDANCE)
@pytest.mark.parametrize("batch_passes", [True, False])
def test_one_step_equals_the_guidance_formula(cfg, audio_cfg, batch_passes):
    """One Euler step (σ 1 → 0): x0 = x1 − v_guided, with v_guided from the official formula."""
    model = PassTable(bsz=2)
    noise = torch.randn(2, 16, F_LAT, H, W)
    sampler = FlowMatchSampler(steps=1, cfg=cfg, audio_cfg=audio_cfg, audio_scale=0.5, batch_passes=batch_passes)
    out = sampler(model, **signed_prompts(narrow()), noise=noise)
    torch.testing.assert_close(out, noise - model.formula(cfg, audio_cfg), rtol=1e-5, atol=1e-5)

    n_passes = len(guidance_passes(cfg, audio_cfg))
    expected_calls = 1 if batch_passes else n_passes
    assert len(model.calls) == expected_calls
    assert sum(c["batch"] for c in model.calls) == 2 * n_passes
    assert all(torch.equal(c["t"], torch.full_like(c["t"], 1000.0)) for c in model.calls)
    scales = torch.cat([c["scale"] for c in model.calls])
    assert set(scales.tolist()) <= {0.0, 0.5}  # audio passes use audio_scale, the others switch it off


@pytest.mark.parametrize(
    "cfg,audio_cfg,expected",
    [
        ((5.0), 4.5, [("neg", False), ("pos", False), ("pos", True)]),
        (1.0, 4.5, [("pos", False), ("pos", True)]),  # cfg 1: no negative pass
        (5.0, 0.0, [("neg", False), ("pos", False)]),  # no audio guidance: audio off throughout
        (1.0, 0.0, [("pos", False)]),  # the formula's plain conditional: audio branch off
        (1.0, 1.0, [("pos", True)]),  # fully conditional single pass
        (5.0, 5.0, [("neg", False), ("pos", True)]),  # v(pos, ∅a) has weight 0
        (5.0, None, [("neg", True), ("pos", True)]),  # the release's non-audio-CFG path
    ],
)
def test_passes_that_are_not_needed_are_skipped(cfg, audio_cfg, expected):
    passes = guidance_passes(cfg, audio_cfg)
    assert [(p.text, p.audio) for p in passes] == expected
    assert sum(p.weight for p in passes) == pytest.approx(1.0)


def test_without_audio_there_is_no_audio_pass():
    assert [(p.text, p.audio) for p in guidance_passes(5.0, 4.5, has_audio=False)] == [("neg", False), ("pos", False)]
    model = PassTable(bsz=2)
    cond = signed_prompts(narrow())
    cond["audio"] = None
    noise = torch.randn(2, 16, F_LAT, H, W)
    out = FlowMatchSampler(steps=1)(model, **cond, noise=noise)
    t = model.table
    torch.testing.assert_close(out, noise - (t["neg"] + 5.0 * (t["pos"] - t["neg"])))
    assert all(not c["audio"] for c in model.calls)


# --------------------------------------------------------------------------------------------
# The tiny Wan model


NARROW = {"text_dim": 64, "image_dim": 48}  # encoder widths for the fast model (see tiny_model)
AUDIO_NARROW = 32


def randomise_audio(model):
    """A "trained" adapter: zero-initialised k/v would make every audio pass a no-op."""
    torch.manual_seed(0)
    with torch.no_grad():
        for kv in model.audio_kv:
            torch.nn.init.normal_(kv.k_proj.weight, std=0.05)
            torch.nn.init.normal_(kv.v_proj.weight, std=0.05)
    return model.eval()


@pytest.fixture(scope="module", params=["clip", "frame"])
def tiny_model(request, tiny_transformer_config):
    """The tiny DiT with narrow encoder widths. At the real widths (text 4096, CLIP 1280) one CPU
    forward costs ~0.3 s, almost all in the text/image embedders, which the sampler never sees;
    the real-width, loaded-from-disk model is covered by test_real_width_model_from_disk."""
    torch.manual_seed(0)
    model = build_model(
        transformer=dict(tiny_transformer_config, **NARROW),
        audio_mode=request.param,
        audio_in_dim=AUDIO_NARROW,
        audio_proj_dim=64,
    )
    return randomise_audio(model)


def narrow(bsz=2, seed=0):
    return conditions(bsz, seed, text_dim=NARROW["text_dim"], image_dim=NARROW["image_dim"], audio_dim=AUDIO_NARROW)


def plain_euler(model, cond, noise, steps, shift, audio_on):
    """Independent reference: conditional Euler sampling, one forward per step, no guidance."""
    x = noise.clone()
    y = cond["image_latents"]
    bsz = x.shape[0]
    mask = torch.zeros(bsz, 4, F_LAT, H, W)
    mask[:, :, 0] = 1
    sigmas = [shift * (1 - i / steps) / (1 + (shift - 1) * (1 - i / steps)) for i in range(steps + 1)]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            v = model(
                torch.cat([x, mask, y], dim=1),
                torch.full((bsz,), s * 1000),
                cond["text"],
                cond["image"],
                cond["audio"] if audio_on else None,
                audio_scale=1.0 if audio_on else 0.0,
            )
        x = x + (s_next - s) * v
    return x


class CountCalls(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.transformer = model.transformer
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("audio_cfg,audio_on", [(0.0, False), (1.0, True)])
def test_cfg_one_reduces_to_plain_conditional_euler(tiny_model, audio_cfg, audio_on):
    """cfg 1 and audio_cfg 0 is one plain conditional pass per step (the formula leaves the audio
    branch off then); cfg 1 and audio_cfg 1 is the same with audio on."""
    cond = narrow()
    noise = torch.randn(2, 16, F_LAT, H, W, generator=torch.Generator().manual_seed(11))
    counted = CountCalls(tiny_model)
    sampler = FlowMatchSampler(steps=5, shift=5.0, cfg=1.0, audio_cfg=audio_cfg)
    out = sampler(counted, **cond, noise=noise)
    assert counted.calls == 5  # one forward per step, no guidance passes
    expected = plain_euler(tiny_model, cond, noise, steps=5, shift=5.0, audio_on=audio_on)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # and the two reductions really differ (the audio branch is live)
    other = plain_euler(tiny_model, cond, noise, steps=5, shift=5.0, audio_on=not audio_on)
    assert (out - other).abs().max() > 1e-3


@pytest.mark.parametrize("cfg,audio_cfg", [(5.0, 4.5), (1.0, 4.5), (2.0, None)])
def test_batched_and_sequential_passes_agree(tiny_model, cfg, audio_cfg):
    cond = narrow()
    batched, sequential = (
        FlowMatchSampler(steps=4, cfg=cfg, audio_cfg=audio_cfg, batch_passes=b)(
            tiny_model, **cond, generator=torch.Generator().manual_seed(4)
        )
        for b in (True, False)
    )
    torch.testing.assert_close(batched, sequential, rtol=1e-5, atol=1e-5)
    assert batched.shape == (2, 16, F_LAT, H, W) and batched.dtype == torch.float32
    assert torch.isfinite(batched).all()
    # guidance matters: without it the result differs
    plain = FlowMatchSampler(steps=4, cfg=1.0, audio_cfg=0.0)
    unguided = plain(tiny_model, **cond, generator=torch.Generator().manual_seed(4))
    assert (batched - unguided).abs().max() > 1e-3


def test_seeded_noise_is_reproducible_and_per_sample(tiny_model):
    cond = narrow()
    sampler = FlowMatchSampler(steps=3)
    a = sampler(tiny_model, **cond, generator=torch.Generator().manual_seed(1))
    b = sampler(tiny_model, **cond, generator=torch.Generator().manual_seed(1))
    c = sampler(tiny_model, **cond, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    # one generator per sample: a clip's result does not depend on its batch neighbours
    pair = sampler(tiny_model, **cond, generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    first = {k: v[:1] for k, v in cond.items()}
    alone = sampler(tiny_model, **first, generator=[torch.Generator().manual_seed(7)])
    torch.testing.assert_close(pair[:1], alone, rtol=1e-5, atol=1e-5)


def test_broadcasts_shared_prompt_and_shows_progress(tiny_model, capsys):
    cond = narrow()
    shared = dict(cond, text=cond["text"][:1], negative_text=cond["negative_text"][:1])
    full = dict(cond, text=shared["text"].expand(2, -1, -1), negative_text=shared["negative_text"].expand(2, -1, -1))
    sampler = FlowMatchSampler(steps=2)
    a = sampler(tiny_model, **shared, generator=torch.Generator().manual_seed(0), progress=True)
    b = sampler(tiny_model, **full, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert "sampling" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Input validation


def test_input_errors_say_what_to_change(tiny_model):
    sampler = FlowMatchSampler(steps=1)
    cond = narrow()
    with pytest.raises(ValueError, match="512 tokens"):
        sampler(tiny_model, **dict(cond, text=cond["text"][:, :77]))
    with pytest.raises(ValueError, match="negative_text must have 512"):
        sampler(tiny_model, **dict(cond, negative_text=cond["negative_text"][:, :77]))
    with pytest.raises(ValueError, match=r"\(B, 16, F, H, W\)"):
        sampler(tiny_model, **dict(cond, image_latents=cond["image_latents"][:, :8]))
    with pytest.raises(ValueError, match="4k\\+1"):
        sampler(tiny_model, **cond, num_frames=10)
    with pytest.raises(ValueError, match="latent frames"):
        sampler(tiny_model, **cond, num_frames=13)  # 4 latent frames, the latents have 3
    sampler(tiny_model, **cond, num_frames=9)  # consistent: fine
    with pytest.raises(ValueError, match="batch 3"):
        sampler(tiny_model, **dict(cond, audio=torch.randn(3, 20, AUDIO_NARROW)))
    with pytest.raises(ValueError, match="patch"):
        sampler(tiny_model, **dict(cond, image_latents=torch.randn(2, 16, F_LAT, 5, 4)))
    with pytest.raises(ValueError, match="noise has shape"):
        sampler(tiny_model, **cond, noise=torch.randn(2, 16, F_LAT, H, H + 2))
    with pytest.raises(ValueError, match="one per sample"):
        sampler(tiny_model, **cond, generator=[torch.Generator()])


def test_real_width_model_from_disk(tiny_pretrained):
    """The tiny Wan saved in diffusers layout and loaded back, real encoder widths, defaults
    (30-step schedule shortened to 2): batched and sequential guidance agree."""
    model = randomise_audio(build_model(pretrained=str(tiny_pretrained)))
    cond = conditions(bsz=1)
    outs = [
        FlowMatchSampler(steps=2, batch_passes=b)(
            model, **cond, generator=torch.Generator().manual_seed(0), num_frames=9
        )
        for b in (True, False)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert outs[0].shape == (1, 16, F_LAT, H, W) and torch.isfinite(outs[0]).all()
