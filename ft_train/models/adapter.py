"""The FantasyTalking audio branch inside every Wan cross-attention.

Released maths (FantasyTalking ``model.py`` ``WanCrossAttentionProcessor``; paper §3.2–3.3): each
block's cross-attention keeps its text and image branches and gains an audio branch that reuses
the text query (after ``norm_q``) and the output projection, with its own bias-free, zero-
initialised key/value projections and no key norm::

    out = to_out(text_attn + image_attn + audio_scale * audio_attn)

diffusers attention processors are plain callables, not modules, so the trainable key/value
projections live in :class:`AudioKV` modules owned by the model (registered, so optimisers,
DeepSpeed and checkpoints see them) and the processor only holds references to them. The
per-forward audio tensors reach the processors through a shared :class:`AdapterContext` that the
model fills at the start of each forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from torch import nn

# diffusers' Wan I2V processor splits image from text tokens assuming exactly this many text
# tokens; text embeddings must be padded to it.
TEXT_TOKENS = 512


class AudioKV(nn.Module):
    """Per-block audio key/value projections ``Linear(context_dim → inner_dim, bias=False)``.

    Zero-initialised so a fresh adapter leaves the backbone's output unchanged (the audio
    attention output is a weighted sum of zero values).
    """

    def __init__(self, context_dim: int, inner_dim: int):
        super().__init__()
        self.k_proj = nn.Linear(context_dim, inner_dim, bias=False)
        self.v_proj = nn.Linear(context_dim, inner_dim, bias=False)
        nn.init.zeros_(self.k_proj.weight)
        nn.init.zeros_(self.v_proj.weight)


@dataclass
class AdapterContext:
    """Conditioning for the current forward pass, shared by all processors of one model.

    It is deliberately left in place after the forward pass: activation checkpointing re-runs the
    blocks during backward and must see the same tensors.

    Attributes:
        audio: ``(B, L, C)`` projected audio tokens of the clip, or None (branch off).
        window_index: ``(F_lat, W)`` frame level: token indices of each latent frame's window
            (:func:`~ft_train.models.audio.audio_window_index`); None = clip level.
        window_lengths: ``(F_lat,)`` valid leading positions of each window (frame level).
        window_valid, window_empty: the key mask and empty-window flags of :func:`window_masks`.
        audio_scale: ``(B,)`` weight of the audio branch per sample (0 = branch off).
        identity: ``(B, Q, C_id)`` ID tokens from the Q-Former (:mod:`.identity`), or None.
        identity_scale: λ2, weight of the face branch (paper: 0.5).
        motion_emb: ``(B, dim)`` motion embedding added to the time embedding
            (:class:`~.motion.MotionHook`), or None.
    """

    audio: torch.Tensor | None = None
    window_index: torch.Tensor | None = None
    window_lengths: torch.Tensor | None = None
    audio_scale: torch.Tensor | None = None
    identity: torch.Tensor | None = None
    identity_scale: float = 0.0
    motion_emb: torch.Tensor | None = None
    window_valid: torch.Tensor | None = None
    window_empty: torch.Tensor | None = None
    last_offload: object = None  # the forward's latest host-offloaded block input (ft_train.speed.checkpointing.HostCopy)

    def set_windows(self, index: torch.Tensor, lengths: torch.Tensor, device: torch.device | str | None = None) -> None:
        """Frame-level windows and their key masks, decided once per forward pass from the host's
        ``index``/``lengths`` (no read-back from the device: the blocks never sync, a compiled block's
        graph never breaks, and meta tensors trace), then moved to ``device``."""
        valid, empty = window_masks(lengths, index.shape[1])
        move = (lambda t: t if t is None else t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
        self.window_index, self.window_lengths = move(index), move(lengths)
        self.window_valid, self.window_empty = move(valid), move(empty)

    def clear(self) -> None:
        self.audio = self.window_index = self.window_lengths = self.audio_scale = None
        self.window_valid = self.window_empty = None
        self.identity = self.motion_emb = None
        self.identity_scale = 0.0
        self.last_offload = None


def window_masks(lengths: torch.Tensor | None, width: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(valid, empty)`` for frame windows of ``width`` slots with ``lengths`` valid ones each:
    ``valid`` ``(F, W)`` bool key mask, None when every window is full; ``empty`` ``(F,)`` bool,
    None when no window is empty. An empty window keeps its first (zero) slot valid so softmax has
    something to attend to; its output is zeroed afterwards (:func:`audio_attention`)."""
    if lengths is None or not bool((lengths < width).any()):
        return None, None
    valid = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
    empty = ~valid.any(dim=1)
    if not bool(empty.any()):
        return valid, None
    valid = valid.clone()
    valid[empty, 0] = True
    return valid, empty


def audio_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: torch.Tensor | None = None,
    backend=None,
    masks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Attention of video queries over audio tokens, clip level or frame level.

    Clip level (``key`` is ``(B, L, H, D)``): every query attends to all audio tokens.
    Frame level (``key`` is ``(B, F, W, H, D)``): the frame-major query sequence is reshaped to
    ``(B·F, S/F, H, D)`` so each latent frame's tokens attend only to that frame's window; padded
    window positions (index ≥ ``lengths[f]``) are masked out with a ``(B·F, 1, 1, W)`` key mask,
    never a dense ``S × F·W`` mask.

    Args:
        query: ``(B, S, H, D)`` with ``S = F·h·w`` tokens in frame-major order.
        key, value: ``(B, L, H, D)`` or ``(B, F, W, H, D)``.
        lengths: ``(F,)`` valid tokens per window (frame level).
        masks: :func:`window_masks` of ``lengths``, when already computed (the model does it once
            per forward pass); then ``lengths`` is not read.
    Returns:
        ``(B, S, H, D)``.
    """
    if key.ndim == 4:
        return dispatch_attention_fn(query, key, value, attn_mask=None, backend=backend)
    bsz, seq, heads, dim = query.shape
    frames, width = key.shape[1], key.shape[2]
    if seq % frames:
        raise ValueError(f"{seq} video tokens do not split into {frames} latent frames")
    q = query.reshape(bsz * frames, seq // frames, heads, dim)
    k = key.reshape(bsz * frames, width, heads, dim)
    v = value.reshape(bsz * frames, width, heads, dim)
    valid, empty = masks if masks is not None else window_masks(lengths, width)
    mask = None
    if valid is not None:
        mask = valid[None].expand(bsz, frames, width).reshape(bsz * frames, 1, 1, width)
    # A key mask rules out the flash and cuDNN kernels a chosen backend may force: masked windows
    # go through torch's SDPA dispatch (memory-efficient kernel), unmasked ones keep the backend.
    out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend="native" if mask is not None else backend)
    out = out.reshape(bsz, frames, seq // frames, heads, dim)
    if empty is not None:
        out = out.masked_fill(empty[None, :, None, None, None], 0.0)
    return out.reshape(bsz, seq, heads, dim)


class FantasyTalkingAttnProcessor:
    """Processor for a Wan I2V cross-attention (``attn2``) with the FantasyTalking audio branch.

    The text and image branches follow diffusers' ``WanAttnProcessor`` step for step, so with the
    audio branch off (or zero-initialised) the output is bit-identical to the plain model.

    With ``face_kv`` (the identity branch, paper Eq. 4) the same query also attends to the ID
    tokens through the block's own zero-initialised face k/v, added with weight λ2:
    ``out = to_out(text + image + audio_scale·audio + λ2·face)``. Every video token sees all ID
    tokens (one identity for the whole clip), and a zero-initialised branch adds exactly 0.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, audio_kv: AudioKV, context: AdapterContext, face_kv: nn.Module | None = None):
        self.audio_kv = audio_kv
        self.context = context
        self.face_kv = face_kv

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb=None,
    ) -> torch.Tensor:
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - TEXT_TOKENS
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(
                query, key_img, value_img, attn_mask=None, backend=self._attention_backend
            )
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img

        ctx = self.context
        if ctx.audio is not None and ctx.audio_scale is not None:
            audio = ctx.audio.to(self.audio_kv.k_proj.weight.dtype)
            # Project the L clip tokens once, then gather the frame windows from the keys/values:
            # the projections are per-token and bias-free, so this equals projecting the
            # (zero-padded) windows, at L instead of F·W tokens and with no padded copies.
            a_key = self.audio_kv.k_proj(audio)
            a_value = self.audio_kv.v_proj(audio)
            if ctx.window_index is not None:
                a_key, a_value = a_key[:, ctx.window_index], a_value[:, ctx.window_index]
            a_key = a_key.to(query.dtype).unflatten(-1, (attn.heads, -1))
            a_value = a_value.to(query.dtype).unflatten(-1, (attn.heads, -1))
            masks = (ctx.window_valid, ctx.window_empty) if ctx.window_index is not None else None
            audio_out = audio_attention(query, a_key, a_value, ctx.window_lengths, self._attention_backend, masks)
            audio_out = audio_out.flatten(2, 3).type_as(query)
            scale = ctx.audio_scale.to(audio_out.dtype).view(-1, 1, 1)
            hidden_states = hidden_states + audio_out * scale

        if self.face_kv is not None and ctx.identity is not None:
            ids = ctx.identity.to(self.face_kv.k_proj.weight.dtype)
            f_key = self.face_kv.k_proj(ids).to(query.dtype).unflatten(-1, (attn.heads, -1))
            f_value = self.face_kv.v_proj(ids).to(query.dtype).unflatten(-1, (attn.heads, -1))
            face_out = dispatch_attention_fn(query, f_key, f_value, attn_mask=None, backend=self._attention_backend)
            hidden_states = hidden_states + face_out.flatten(2, 3).type_as(query) * ctx.identity_scale

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
