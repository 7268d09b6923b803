"""Flow-matching training objective with FantasyTalking's condition dropout and lip weighting.

The loss owns every random draw of a training step — σ, noise, the three condition-dropout coins
and the lip-weighting coin — and takes them from one explicit ``torch.Generator``. Seed that
generator from ``(seed, global step, rank, micro-step)`` (:func:`step_generator`) and a resumed
run draws exactly the numbers the uninterrupted run would have, with no RNG state to save.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..models.adapter import TEXT_TOKENS

LATENT_CHANNELS = 16


def step_generator(seed: int, step: int, rank: int = 0, micro_step: int = 0) -> torch.Generator:
    """A CPU generator seeded from a hash of ``(seed, step, rank, micro_step)``.

    Hashing (rather than e.g. ``seed + step``) keeps the streams of neighbouring steps and ranks
    unrelated. CPU generators make the draws identical on every device type.
    """
    digest = hashlib.sha256(f"ft_train:{seed}:{step}:{rank}:{micro_step}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift ``σ' = s·u / (1 + (s − 1)·u)``; s > 1 moves mass to high noise."""
    return shift * u / (1 + (shift - 1) * u)


def first_frame_mask(num_latent_frames: int, height: int, width: int, *, batch: int = 1, device=None, dtype=None):
    """Wan I2V conditioning mask ``(B, 4, F_lat, H, W)``: ones on latent frame 0, zeros elsewhere.

    Wan builds it per pixel frame (first frame repeated 4×) and folds groups of 4 frames into the
    4 channels, so every channel of latent frame 0 is 1 and all later frames are 0.
    """
    mask = torch.zeros(batch, 4, num_latent_frames, height, width, device=device, dtype=dtype)
    mask[:, :, 0] = 1
    return mask


@dataclass
class LossOutput:
    """Scalar loss plus detached per-step statistics for logging."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class FlowMatchingLoss:
    """Rectified-flow loss: ``x_t = (1−σ)·x0 + σ·ε``, target ``ε − x0``, MSE.

    Args:
        shift: Wan timestep shift for sampling σ (paper/official inference: 5).
        num_train_timesteps: the DiT sees ``timestep = σ · num_train_timesteps``.
        lip_weighting: stage 2 lip-tracing loss (paper Eq. 2–3).
        eta: with probability ``1 − eta`` a sample's loss is the lip-masked loss, else the plain
            loss (paper: η = 0.2, so 80% masked).
        drop_image, drop_audio, drop_text: independent per-sample dropout probabilities
            (paper: 0.1 each).

    Choices the paper leaves open, made here:

    * **Lip-loss normalisation**: the masked loss is the mean squared error *over the mask*,
      ``Σ M·(pred−target)² / (C·Σ M)``, not ``mean(M ⊙ L)``. A mouth covers a few percent of the
      frame, so the un-normalised form would shrink the loss (and the effective learning rate) on
      80% of steps by that factor; normalising keeps both branches on the same scale. A sample
      whose mask is empty (no face found) falls back to the plain loss.
    * **The coin is per sample**, drawn from the step's generator: with batch 1 this is the
      paper's per-step coin; with larger batches it mixes both losses in every step, which has the
      same expectation and less variance between steps.
    * **Image dropout** zeroes the CLIP tokens and the 16 first-frame condition channels but keeps
      the 4 mask channels, which only say *which* frame is given. **Audio dropout** switches the
      audio branch off for that sample (``audio_scale = 0``), exactly the unconditional pass of
      audio CFG at inference. **Text dropout** replaces the prompt with the empty-prompt embedding
      (``null_text``; zeros when unknown, which is what umT5 padding looks like).
    """

    def __init__(
        self,
        shift: float = 5.0,
        num_train_timesteps: int = 1000,
        lip_weighting: bool = False,
        eta: float = 0.2,
        drop_image: float = 0.1,
        drop_audio: float = 0.1,
        drop_text: float = 0.1,
    ):
        for name, p in (("eta", eta), ("drop_image", drop_image), ("drop_audio", drop_audio), ("drop_text", drop_text)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"loss.{name} must be a probability in [0, 1], got {p}")
        if shift <= 0:
            raise ValueError(f"loss.shift must be > 0, got {shift}")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        self.lip_weighting = lip_weighting
        self.eta = eta
        self.drop_image = drop_image
        self.drop_audio = drop_audio
        self.drop_text = drop_text
        self.null_text: torch.Tensor | None = None  # (L, text_dim) empty-prompt embedding

    def draw(self, batch_size: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """All random numbers of one step, in a fixed order, on CPU."""
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        noise = torch.randn((batch_size, *latent_shape), generator=generator)
        coins = torch.rand(batch_size, 4, generator=generator)
        return {
            "sigma": shift_sigma(u, self.shift).float(),
            "noise": noise,
            "keep_image": coins[:, 0] >= self.drop_image,
            "keep_audio": coins[:, 1] >= self.drop_audio,
            "keep_text": coins[:, 2] >= self.drop_text,
            # p > η → masked loss (paper Eq. 3)
            "use_lip": (coins[:, 3] > self.eta) & self.lip_weighting,
        }

    def _text(self, text: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if bool(keep.all()):
            return text
        null = torch.zeros_like(text[0])
        if self.null_text is not None:
            n = min(self.null_text.shape[0], TEXT_TOKENS)
            null[:n] = self.null_text[:n].to(null)
        return torch.where(keep.view(-1, 1, 1), text, null)

    def __call__(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossOutput:
        """One training loss.

        ``batch`` keys (see ``ft_train/data/schema.py``): ``latents (B,16,F,H,W)``,
        ``image_latents (B,16,F,H,W)``, ``clip (B,257,Di)``, ``text (B,512,Dt)``,
        ``audio (B,L,768)``, and for lip weighting ``lip_mask (B,F,H,W)`` in [0, 1]; optional
        ``motion (B,2)`` = (ω_l, ω_b) and ``face (B,N_face,D_face)`` for the identity/motion modules.
        """
        x0 = batch["latents"]
        device = x0.device
        bsz = x0.shape[0]
        r = self.draw(bsz, tuple(x0.shape[1:]), generator)
        sigma = r["sigma"].to(device)
        noise = r["noise"].to(device=device, dtype=x0.dtype)
        s = sigma.view(-1, 1, 1, 1, 1).to(x0.dtype)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0

        keep_image = r["keep_image"].to(device)
        y = batch["image_latents"] * keep_image.view(-1, 1, 1, 1, 1).to(x0.dtype)
        clip = batch["clip"] * keep_image.view(-1, 1, 1).to(batch["clip"].dtype)
        text = self._text(batch["text"], r["keep_text"].to(device))
        mask = first_frame_mask(x0.shape[2], x0.shape[3], x0.shape[4], batch=bsz, device=device, dtype=x0.dtype)
        hidden = torch.cat([x_t, mask, y], dim=1)

        # Identity / motion inputs go to the model only when the batch has them (models without
        # those modules ignore them). The face features belong to the reference image and are
        # dropped with it; without `face` the model falls back to the (dropped) CLIP tokens.
        extra = {}
        if "motion" in batch:
            extra["motion"] = batch["motion"]
        if "face" in batch:
            face = batch["face"]
            extra["face"] = face * keep_image.view(-1, *([1] * (face.ndim - 1))).to(face.dtype)
        pred = model(
            hidden,
            sigma * self.num_train_timesteps,
            text,
            clip,
            batch.get("audio"),
            audio_scale=r["keep_audio"].to(device=device, dtype=torch.float32),
            **extra,
        )
        err = (pred.float() - target.float()).square()  # (B, C, F, H, W)
        per_sample = err.mean(dim=(1, 2, 3, 4))
        use_lip = r["use_lip"].to(device)
        if bool(use_lip.any()):
            if "lip_mask" not in batch:
                raise KeyError("lip weighting is on (stage.lip_weighting) but the batch has no 'lip_mask'")
            weight = batch["lip_mask"].float().unsqueeze(1)  # (B, 1, F, H, W)
            area = weight.sum(dim=(1, 2, 3, 4)) * err.shape[1]
            lip = (err * weight).sum(dim=(1, 2, 3, 4)) / area.clamp_min(1e-6)
            use_lip = use_lip & (area > 0)
            per_sample = torch.where(use_lip, lip, per_sample)
        loss = per_sample.mean()
        logs = {
            "sigma": sigma.mean().detach(),
            "lip_fraction": use_lip.float().mean().detach(),
        }
        return LossOutput(loss=loss, logs=logs)
