"""Facial identity branch (paper §3.3, never released): face input → face encoder → Q-Former → ID
tokens, read by a zero-initialised face cross-attention in every block (:class:`FaceKV`, weight λ2).

The paper gives no sizes, encoder variant or token count; the choices are in
:class:`IdentityConfig`, each with its reason. Face encoders plug in by name
(:func:`register_face_encoder`), and one batch key ``face`` carries features or pixel crops, as the
encoder's :attr:`FaceEncoder.input_kind` says. docs/training.md ("The identity branch") has the
input forms, the condition dropout and the fallback to the reference image's CLIP tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from .adapter import AudioKV
from .arcface import ARCFACE_INPUT, ARCHS, load_iresnet


@dataclass
class IdentityConfig:
    """``model.identity`` (defaults sized for the 14B backbone).

    Attributes:
        enabled: build the branch at all (disabled = no parameters, no compute).
        scale: λ2, weight of the face attention in every block (paper §4.1: 0.5).
        encoder: registered :class:`FaceEncoder` name; ``precomputed`` takes ``(B, N, face_dim)``
            features from the batch (``face``, else the CLIP image tokens); ``arcface`` runs the
            ArcFace network of ``arcface_path`` on ``(B, 3, H, W)`` face crops.
        face_dim: width of the face features: 1280 = CLIP ViT-H penultimate tokens, the default
            encoder and the fallback; 512 for ArcFace embeddings.
        arcface_path: ``encoder=arcface``: a local insightface arcface_torch backbone
            (``backbone.pth``, or ``.safetensors``); required then, unused otherwise.
        arcface_arch: ``auto`` reads the IResNet depth and widths from the file; naming the
            variant (``iresnet50``, ``iresnet100``, ...) rejects a file of another one.
        num_queries: ID tokens per sample. 16, as in the IP-Adapter-Plus / InstantID face
            resamplers: enough for an identity (ArcFace is a single 512-d vector) while each
            block's face attention stays negligible (16 keys vs. 257 image and 512 text keys).
        dim: Q-Former width. 1024, close to the face feature width so the input projection
            loses little, and small next to the DiT.
        depth: Q-Former layers (self-attn + cross-attn + FFN each). 4, as the IP-Adapter-Plus
            resampler; BLIP-2's 12 layers serve open-vocabulary language, not one identity.
        heads: attention heads of the Q-Former (64-d heads at dim 1024).
        ffn_mult: FFN hidden width = ``ffn_mult · dim``.
        out_dim: ID-token width, the input of every block's face k/v. 1024 (half the audio
            context's 2048): per-block k/v cost 2·out_dim·5120·40 ≈ 419M parameters on 14B, and an
            identity needs fewer dimensions than speech.
    """

    enabled: bool = False
    scale: float = 0.5
    encoder: str = "precomputed"
    face_dim: int = 1280
    num_queries: int = 16
    dim: int = 1024
    depth: int = 4
    heads: int = 16
    ffn_mult: int = 4
    out_dim: int = 1024
    arcface_path: str | None = None
    arcface_arch: str = "auto"

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> "IdentityConfig":
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"model.identity: unknown keys {unknown}; known: {sorted(known)}")
        out = cls(**cfg)
        if out.dim % out.heads:
            raise ValueError(f"model.identity.dim={out.dim} must be divisible by model.identity.heads={out.heads}")
        for name in ("face_dim", "num_queries", "dim", "depth", "heads", "ffn_mult", "out_dim"):
            if getattr(out, name) < 1:
                raise ValueError(f"model.identity.{name} must be >= 1, got {getattr(out, name)}")
        if out.arcface_arch not in ARCHS:
            raise ValueError(f"model.identity.arcface_arch: unknown {out.arcface_arch!r}; use one of {list(ARCHS)}")
        if out.encoder == "arcface" and not out.arcface_path:
            raise ValueError(
                "model.identity.arcface_path: required with model.identity.encoder=arcface "
                "(a local insightface arcface_torch backbone.pth)"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaceEncoder(nn.Module):
    """Interface of a face encoder: ``forward(face) → (B, N_face, out_dim)`` features.

    Implementations set ``out_dim`` and ``input_kind``: ``"features"`` (``face`` is ``(B, N, D)``
    / ``(B, D)``) or ``"pixels"`` (``face`` is ``(B, 3, H, W)`` crops in [-1, 1]).
    Frozen encoders (ArcFace, CLIP vision) should keep their parameters ``requires_grad=False``:
    they are loaded from a user path, not trained, and are not part of
    :meth:`FantasyTalkingDiT.adapter_modules` (so not in checkpoints or exports either).
    """

    out_dim: int
    input_kind: str = "features"

    def forward(self, face: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class PrecomputedFaceFeatures(FaceEncoder):
    """Features computed offline: checks the shape and passes them through.

    Accepts ``(B, N, D)`` tokens or ``(B, D)`` single embeddings (ArcFace), returned as
    ``(B, 1, D)``.
    """

    def __init__(self, face_dim: int):
        super().__init__()
        self.out_dim = face_dim

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        if face.ndim == 2:
            face = face[:, None]
        if face.ndim != 3 or face.shape[-1] != self.out_dim:
            raise ValueError(
                f"face features must be (B, N, {self.out_dim}) (model.identity.face_dim), got {tuple(face.shape)}"
                + (" (pixel crops need an image encoder, e.g. model.identity.encoder=arcface)" if face.ndim == 4 else "")
            )
        return face


class ArcFaceEncoder(FaceEncoder):
    """ArcFace on face-crop pixels: ``(B, 3, H, W)`` → ``(B, 1, 512)`` L2-normalised embeddings.

    The network (:class:`~.arcface.IResNet`) comes from ``model.identity.arcface_path`` and is
    frozen. It stays in eval mode even when the model is put in training mode: its BatchNorm
    layers must use the statistics it was trained with (batch statistics of a few crops would
    change the embedding with the batch and overwrite the running averages), and its dropout
    belongs to face-recognition training, not ours. Runs without autograd (nothing before it
    is trained), in the dtype its weights have.

    Input: RGB crops, float in [-1, 1] (insightface's ``(x/255 − 0.5)/0.5``) or ``uint8``;
    resized to 112×112 (bilinear, antialiased) when they are another size. Crops aligned like
    insightface's (eyes, nose, mouth at fixed points) give the best embeddings; a loose box crop
    still works, with a weaker identity signal.
    """

    input_kind = "pixels"

    def __init__(self, path: str, arch: str = "auto"):
        super().__init__()
        self.net = load_iresnet(path, arch)
        self.out_dim = self.net.num_features

    def train(self, mode: bool = True) -> "ArcFaceEncoder":
        return super().train(False)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        if face.ndim != 4 or face.shape[1] != 3:
            raise ValueError(f"model.identity.encoder=arcface takes face crops (B, 3, H, W), got {tuple(face.shape)}")
        x = face.float() / 127.5 - 1.0 if face.dtype == torch.uint8 else face.float()
        if tuple(x.shape[-2:]) != (ARCFACE_INPUT, ARCFACE_INPUT):
            x = F.interpolate(x, size=(ARCFACE_INPUT, ARCFACE_INPUT), mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            emb = self.net(x.to(self.net.conv1.weight.dtype))
        return F.normalize(emb.float(), dim=-1)[:, None]


FACE_ENCODERS: dict[str, Callable[[IdentityConfig], FaceEncoder]] = {
    "precomputed": lambda cfg: PrecomputedFaceFeatures(cfg.face_dim),
}


def register_face_encoder(name: str, factory: Callable[[IdentityConfig], FaceEncoder]) -> None:
    """Make ``model.identity.encoder=<name>`` build ``factory(config)`` (e.g. an ArcFace model
    loaded from a local path)."""
    FACE_ENCODERS[name] = factory


def build_face_encoder(cfg: IdentityConfig) -> FaceEncoder:
    if cfg.encoder not in FACE_ENCODERS:
        raise ValueError(f"model.identity.encoder: unknown face encoder {cfg.encoder!r}; available: {sorted(FACE_ENCODERS)}")
    encoder = FACE_ENCODERS[cfg.encoder](cfg)
    if encoder.out_dim != cfg.face_dim:
        raise ValueError(
            f"model.identity.face_dim={cfg.face_dim} but encoder {cfg.encoder!r} gives {encoder.out_dim}-d features; "
            f"set model.identity.face_dim={encoder.out_dim}"
        )
    return encoder


register_face_encoder("arcface", lambda cfg: ArcFaceEncoder(cfg.arcface_path, cfg.arcface_arch))


class QFormerLayer(nn.Module):
    """Pre-norm BLIP-2 layer: queries self-attend, cross-attend to the features, then an FFN."""

    def __init__(self, dim: int, heads: int, ffn_mult: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(queries)
        queries = queries + self.self_attn(x, x, x, need_weights=False)[0]
        x, ctx = self.norm_cross(queries), self.norm_context(context)
        queries = queries + self.cross_attn(x, ctx, ctx, need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class QFormer(nn.Module):
    """Learned queries that read the face features: ``(B, N_face, face_dim) → (B, num_queries, out_dim)``.

    The output ends in a LayerNorm (like the audio projector), so the ID tokens are non-zero
    from the start and the zero-initialised per-block k/v receive gradients at the first step.
    """

    def __init__(self, face_dim: int, num_queries: int = 16, dim: int = 1024, depth: int = 4,
                 heads: int = 16, ffn_mult: int = 4, out_dim: int = 1024):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.proj_in = nn.Linear(face_dim, dim)
        self.layers = nn.ModuleList(QFormerLayer(dim, heads, ffn_mult) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        context = self.proj_in(features.to(self.proj_in.weight.dtype))
        queries = self.queries[None].expand(features.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, context)
        return self.norm(self.proj_out(self.norm_out(queries)))


class IdentityModel(nn.Module):
    """Face input → face encoder → Q-Former → ID tokens ``(B, num_queries, out_dim)``.

    Only the Q-Former is an adapter module (trained, checkpointed, exported); the encoder is held
    here but frozen, since real encoders come from user weight paths.
    """

    def __init__(self, cfg: IdentityConfig):
        super().__init__()
        self.config = cfg
        self.encoder = build_face_encoder(cfg)
        self.encoder.requires_grad_(False)
        self.qformer = QFormer(cfg.face_dim, cfg.num_queries, cfg.dim, cfg.depth, cfg.heads, cfg.ffn_mult, cfg.out_dim)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        """``face`` in the encoder's form (:attr:`FaceEncoder.input_kind`) → ``(B, num_queries, out_dim)``."""
        if self.encoder.input_kind == "pixels" and face.ndim != 4:
            raise ValueError(
                f"model.identity.encoder={self.config.encoder} needs face crops (B, 3, H, W) in the batch's `face`, "
                f"got {tuple(face.shape)} (without `face` the CLIP image tokens stand in, which only "
                "model.identity.encoder=precomputed can read): write face crops into the data"
            )
        return self.qformer(self.encoder(face))


class FaceKV(AudioKV):
    """Per-block face key/value projections ``Linear(out_dim → inner_dim, bias=False)``,
    zero-initialised (same maths as :class:`~.adapter.AudioKV`): a fresh branch adds exactly 0."""


__all__ = [
    "FACE_ENCODERS",
    "ArcFaceEncoder",
    "FaceEncoder",
    "FaceKV",
    "IdentityConfig",
    "IdentityModel",
    "PrecomputedFaceFeatures",
    "QFormer",
    "build_face_encoder",
    "register_face_encoder",
]
