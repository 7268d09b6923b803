"""Motion-intensity modulation (paper §3.4, never released).

ω_l (facial-landmark variance) and ω_b (body-joint variance), both normalised to [0, 1] by the
data tools, go through "MLP layers, a ResNet layer and an average pooling layer" and the result
"is added with the timesteps". Our reading, with the sizes in :class:`MotionConfig`:

* each ω is one token: sinusoidal features of ``ω · 1000`` (diffusers' timestep features, so ω
  gets the resolution a timestep gets; on the raw [0, 1] range most frequencies would barely
  move) → MLP, plus a learned embedding saying which of the two it is;
* one residual MLP block over the tokens (the "ResNet layer");
* average pooling over the two tokens → one ``(B, hidden_dim)`` vector;
* a zero-initialised ``Linear(hidden_dim → dim)`` onto the DiT's time embedding ``temb``, so a
  fresh module adds exactly 0 and the model starts identical to the backbone.

:class:`MotionHook` does the adding inside diffusers' ``WanTransformer3DModel`` without
re-implementing its forward; see its docstring.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

# Paper §4.2: subtle / natural / intense = 0.1 / 0.5 / 1.0; natural is the inference default.
DEFAULT_OMEGA = 0.5
OMEGA_SCALE = 1000.0


@dataclass
class MotionConfig:
    """``model.motion``.

    Attributes:
        enabled: build the module (disabled = no parameters, no hook).
        freq_dim: sinusoidal features per ω (256, the DiT's own ``freq_dim``).
        hidden_dim: MLP / residual width. 1024: two scalars need little capacity; the only wide
            layer is the zero-initialised projection to the DiT width.
        default: ω_l = ω_b used when none is given (paper: 0.5, "natural").
    """

    enabled: bool = False
    freq_dim: int = 256
    hidden_dim: int = 1024
    default: float = DEFAULT_OMEGA

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> "MotionConfig":
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"model.motion: unknown keys {unknown}; known: {sorted(known)}")
        out = cls(**cfg)
        if out.freq_dim < 2 or out.freq_dim % 2 or out.hidden_dim < 1:
            raise ValueError(f"model.motion: freq_dim must be even and >= 2 and hidden_dim >= 1, got {out.freq_dim}, {out.hidden_dim}")
        if not 0.0 <= out.default <= 1.0:
            raise ValueError(f"model.motion.default must be in [0, 1], got {out.default}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_motion(motion: torch.Tensor | Sequence[float] | float | None, batch: int, device=None,
                 default: float = DEFAULT_OMEGA) -> torch.Tensor:
    """``(B, 2)`` float32 (ω_l, ω_b) from a ``(B, 2)``/``(2,)`` tensor, a pair or one float for
    both; None = ``default`` for both. Raises a clear error for values outside [0, 1] (or NaN)."""
    if motion is None:
        motion = default
    omega = torch.as_tensor(motion, dtype=torch.float32, device=device)
    if omega.ndim == 0:
        omega = omega.expand(2)
    if omega.ndim == 1:
        if omega.shape[0] != 2:
            raise ValueError(f"motion must be (ω_l, ω_b) or (B, 2), got shape {tuple(omega.shape)}")
        omega = omega.expand(batch, 2)
    if omega.shape != (batch, 2):
        raise ValueError(f"motion must be (B, 2) = (ω_l, ω_b) per sample with B={batch}, got shape {tuple(omega.shape)}")
    bad = ~((omega >= 0) & (omega <= 1))  # also catches NaN
    if bool(bad.any()):
        raise ValueError(
            f"motion intensities (ω_l, ω_b) must be in [0, 1] (normalised by the data tools' statistics; "
            f"0.1 subtle, 0.5 natural, 1.0 intense), got {omega[bad][:4].tolist()}"
        )
    return omega


class MotionModel(nn.Module):
    """``(B, 2)`` motion intensities → ``(B, dim)`` addition to the DiT time embedding.

    Args:
        dim: the DiT width (``heads × head_dim``), the width of ``temb``.
        hidden_dim, freq_dim: see :class:`MotionConfig`.
    """

    def __init__(self, dim: int, hidden_dim: int = 1024, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.embed = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.kind = nn.Embedding(2, hidden_dim)  # which token is ω_l, which ω_b
        self.res = nn.Sequential(
            nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.act = nn.SiLU()
        self.proj_out = nn.Linear(hidden_dim, dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, omega: torch.Tensor) -> torch.Tensor:
        bsz = omega.shape[0]
        # Same features as diffusers' Wan `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`.
        feats = get_timestep_embedding(omega.reshape(-1).float() * OMEGA_SCALE, self.freq_dim,
                                       flip_sin_to_cos=True, downscale_freq_shift=0)
        dtype = self.proj_out.weight.dtype
        tokens = self.embed(feats.to(dtype).view(bsz, 2, -1)) + self.kind.weight.to(dtype)
        tokens = tokens + self.res(tokens)
        return self.proj_out(self.act(tokens.mean(dim=1)))


class MotionHook:
    """Forward hook on ``transformer.condition_embedder.time_embedder`` adding the motion embedding.

    diffusers' ``WanTimeTextImageEmbedding`` computes ``temb = time_embedder(sinusoid(t))`` and
    then ``timestep_proj = time_proj(silu(temb))``; the transformer uses ``timestep_proj`` for every
    block's modulation and ``temb`` for the output head's. Adding to the ``time_embedder`` output
    therefore reaches both exactly as "added with the timesteps" (paper §3.4) means, keeps
    diffusers' own forward untouched (no recomputation of ``timestep_proj`` in a hook on the whole
    ``condition_embedder``), and with a zero embedding ``temb + 0`` is bit-identical. The
    embedding comes from the model's :class:`~.adapter.AdapterContext`, filled per forward.
    """

    def __init__(self, context):
        self.context = context

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        emb = self.context.motion_emb
        if emb is None:
            return None
        if output.ndim == 3:  # (B, seq, dim): per-token timesteps (Wan 2.2 TI2V)
            emb = emb[:, None]
        return output + emb.to(output.dtype)


__all__ = ["DEFAULT_OMEGA", "MotionConfig", "MotionHook", "MotionModel", "check_motion"]
