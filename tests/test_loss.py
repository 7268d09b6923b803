"""Flow-matching loss: interpolation, target, dropout, lip weighting, and determinism."""

import pytest
import torch

from ft_train.diffusion import FlowMatchingLoss, shift_sigma, step_generator


class Recorder(torch.nn.Module):
    """Stands in for the DiT: records its inputs and returns a learnable prediction."""

    def __init__(self, shape):
        super().__init__()
        self.pred = torch.nn.Parameter(torch.zeros(shape))
        self.calls = []

    def forward(self, hidden, timestep, text, image, audio, audio_scale=1.0):
        self.calls.append(dict(hidden=hidden, timestep=timestep, text=text, image=image, audio=audio, audio_scale=audio_scale))
        return self.pred


def make_batch(bsz=4, frames=3, hw=(4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    lip = torch.zeros(bsz, frames, *hw)
    lip[:, :, 2:, 1:3] = 1
    return {
        "latents": torch.randn(bsz, 16, frames, *hw, generator=g),
        "image_latents": torch.randn(bsz, 16, frames, *hw, generator=g),
        "clip": torch.randn(bsz, 257, 8, generator=g),
        "text": torch.randn(bsz, 512, 8, generator=g),
        "audio": torch.randn(bsz, 20, 768, generator=g),
        "lip_mask": lip,
    }


def test_shift_matches_wan_formula():
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = shift_sigma(u, 5.0)
    torch.testing.assert_close(s, 5 * u / (1 + 4 * u))
    assert s[0] == 0 and s[-1] == 1 and bool((s[1:] > s[:-1]).all())
    assert shift_sigma(torch.tensor(0.5), 5.0) == pytest.approx(5 / 6)


def test_interpolation_target_and_condition_layout():
    batch = make_batch()
    loss = FlowMatchingLoss(drop_image=0, drop_audio=0, drop_text=0)
    model = Recorder(batch["latents"].shape)
    out = loss(model, batch, step_generator(7, 3))
    draws = loss.draw(4, tuple(batch["latents"].shape[1:]), step_generator(7, 3))  # same seed, same numbers
    sigma, noise = draws["sigma"], draws["noise"]
    call = model.calls[0]
    s = sigma.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(call["hidden"][:, :16], (1 - s) * batch["latents"] + s * noise)
    assert torch.equal(call["hidden"][:, 16:20, 0], torch.ones_like(call["hidden"][:, 16:20, 0]))
    assert call["hidden"][:, 16:20, 1:].abs().sum() == 0
    torch.testing.assert_close(call["hidden"][:, 20:], batch["image_latents"])
    torch.testing.assert_close(call["timestep"], sigma * 1000)
    # prediction 0 -> loss = mean((ε − x0)²)
    torch.testing.assert_close(out.loss, (noise - batch["latents"]).square().mean())


def test_condition_dropout_image_audio_text():
    batch = make_batch(bsz=6)
    loss = FlowMatchingLoss(drop_image=1.0, drop_audio=1.0, drop_text=1.0)
    loss.null_text = torch.full((3, 8), 2.0)
    model = Recorder(batch["latents"].shape)
    loss(model, batch, step_generator(0, 0))
    call = model.calls[0]
    assert call["image"].abs().sum() == 0
    assert call["hidden"][:, 20:].abs().sum() == 0  # first-frame latents dropped ...
    assert call["hidden"][:, 16:20, 0].min() == 1  # ... the mask channels kept
    assert torch.equal(call["audio_scale"], torch.zeros(6))
    assert torch.equal(call["text"][:, :3], torch.full((6, 3, 8), 2.0))
    assert call["text"][:, 3:].abs().sum() == 0

    keep = FlowMatchingLoss(drop_image=0, drop_audio=0, drop_text=0)
    model = Recorder(batch["latents"].shape)
    keep(model, batch, step_generator(0, 0))
    assert torch.equal(model.calls[0]["audio_scale"], torch.ones(6))
    assert torch.equal(model.calls[0]["text"], batch["text"])


def test_dropout_rate_is_about_p():
    loss = FlowMatchingLoss(drop_image=0.1, drop_audio=0.1, drop_text=0.1, lip_weighting=True, eta=0.2)
    d = loss.draw(20000, (1,), step_generator(1, 1))
    for key in ("keep_image", "keep_audio", "keep_text"):
        assert d[key].float().mean().item() == pytest.approx(0.9, abs=0.01)
    assert d["use_lip"].float().mean().item() == pytest.approx(0.8, abs=0.01)


def test_masked_branch_has_zero_gradient_outside_the_lip_mask():
    batch = make_batch()
    loss = FlowMatchingLoss(lip_weighting=True, eta=0.0, drop_image=0, drop_audio=0, drop_text=0)  # always masked
    model = Recorder(batch["latents"].shape)
    out = loss(model, batch, step_generator(0, 0))
    out.loss.backward()
    grad = model.pred.grad
    outside = (batch["lip_mask"] == 0).unsqueeze(1).expand_as(grad)
    assert grad[outside].abs().max() == 0
    assert grad[~outside].abs().min() > 0
    assert out.logs["lip_fraction"] == 1
    # The masked loss is the mean squared error over the mask.
    draws = loss.draw(4, tuple(batch["latents"].shape[1:]), step_generator(0, 0))
    target = draws["noise"] - batch["latents"]
    m = batch["lip_mask"].unsqueeze(1).expand_as(target).bool()
    torch.testing.assert_close(out.loss, target[m].square().mean())


def test_plain_branch_and_empty_mask_use_the_whole_frame():
    batch = make_batch()
    never = FlowMatchingLoss(lip_weighting=True, eta=1.0)
    model = Recorder(batch["latents"].shape)
    never(model, batch, step_generator(0, 0)).loss.backward()
    assert model.pred.grad.abs().min() > 0
    batch["lip_mask"][1] = 0  # no face found in sample 1: falls back to the plain loss
    always = FlowMatchingLoss(lip_weighting=True, eta=0.0)
    model = Recorder(batch["latents"].shape)
    out = always(model, batch, step_generator(0, 0))
    out.loss.backward()
    assert model.pred.grad[1].abs().min() > 0
    assert out.logs["lip_fraction"] == 0.75


def test_draws_depend_only_on_seed_step_rank_microstep():
    shape = (16, 3, 4, 4)
    loss = FlowMatchingLoss()
    a = loss.draw(2, shape, step_generator(5, 10, rank=1))
    b = loss.draw(2, shape, step_generator(5, 10, rank=1))
    c = loss.draw(2, shape, step_generator(5, 11, rank=1))
    d = loss.draw(2, shape, step_generator(5, 10, rank=0))
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["sigma"], b["sigma"])
    assert not torch.equal(a["noise"], c["noise"]) and not torch.equal(a["noise"], d["noise"])


def test_bad_probabilities_are_rejected():
    with pytest.raises(ValueError, match="loss.eta"):
        FlowMatchingLoss(eta=1.5)
