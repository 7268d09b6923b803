"""Analytic FLOPs of the DiT: what MFU is measured against, in ``bench/train_step.py`` and in
training runs (``perf/mfu``, from the LightningModule's ``flops_per_batch``).

Only matmuls and attention products are counted (2 FLOPs per multiply-add); norms, softmax, RoPE
and elementwise work are not. The identity and motion modules are not counted either (a few
percent of a step when on), so an MFU with them is slightly low.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TEXT_TOKENS = 512  # umT5 context, padded
IMAGE_TOKENS = 257  # CLIP ViT-H/14 tokens of the first frame

FLOP_FORMULA = (
    "fwd = B·N·[12·S·d² + 4·S²·d + 4·(T+I)·d² + 4·S·(T+I)·d + 4·S·d·f] "
    "+ 2·B·S·d·(C_in·p + C_out·p) + 2·B·T·(C_t·d + d²) + 2·B·I·(C_i² + C_i·d); "
    "ours adds B·N·[4·L·C_a·d + 4·S·W·d] + 2·B·L·768·C_a "
    "(S video tokens, d = heads·head_dim, f ffn width, N blocks, T = 512 text / I = 257 image tokens, "
    "p = patch volume, L audio tokens, W frame-window width (L at clip level), C_a = 2048; "
    "every matmul and attention product counted as 2 FLOPs per multiply-add; norms, softmax, RoPE not counted). "
    "Model FLOPs per step: full fine-tune 3·fwd; frozen backbone 2·fwd + 2·n·|trainable weights| "
    "(n = tokens each trainable weight sees: 512 text tokens for attn2.to_v, L for the audio adapter); "
    "sampling 3 passes·fwd. HFU also counts the blocks' forward that activation checkpointing recomputes. "
    "MFU = model FLOPs / step time / peak."
)

# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name;
# first match wins, so the more specific names come first. H200 has the H100 SXM's compute.
# (Lightning's own table gives the H200 its sparse figure, or nothing, depending on the name.)
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("GH200", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
]


def dense_bf16_peak(card: str) -> tuple[float | None, str | None]:
    """(dense bf16 TFLOP/s, the table key that matched) of a card named ``card``; (None, None)
    when the table does not know it."""
    for key, value in PEAK_TFLOPS:
        if key in card:
            return value, key
    return None, None


def forward_flops(
    tcfg: Mapping[str, Any],
    latent_fhw: tuple[int, int, int],
    batch: int = 1,
    adapter: Mapping[str, int] | None = None,
    text_tokens: int = TEXT_TOKENS,
    image_tokens: int = IMAGE_TOKENS,
) -> dict[str, float]:
    """FLOPs of one DiT forward (:data:`FLOP_FORMULA`) on latents of ``(F, H, W)``.

    ``tcfg`` is the transformer's config (``WanTransformer3DModel.config``); ``adapter`` the
    audio adapter's sizes (:func:`adapter_sizes`). Returns ``blocks`` (what checkpointing
    recomputes), ``embed`` (patch/text/image embedders and head), ``adapter`` (audio projector,
    per-block audio k/v and audio attention), ``attention`` (the part of ``blocks`` + ``adapter``
    spent in QKᵀ and PV) and ``tokens`` (the video tokens S).
    """
    f, h, w = latent_fhw
    pt, ph, pw = tcfg["patch_size"]
    s = (f // pt) * (h // ph) * (w // pw)
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    ffn, n = tcfg["ffn_dim"], tcfg["num_layers"]
    t, i = text_tokens, image_tokens
    ct, ci = tcfg["text_dim"], tcfg["image_dim"]
    p = pt * ph * pw
    per_block = 12 * s * d * d + 4 * s * s * d + 4 * (t + i) * d * d + 4 * s * (t + i) * d + 4 * s * d * ffn
    embed = 2 * s * d * (tcfg["in_channels"] * p + tcfg["out_channels"] * p) + 2 * t * (ct * d + d * d) + 2 * i * (ci * ci + ci * d)
    attention = batch * n * (4 * s * s * d + 4 * s * (t + i) * d)
    out = {"tokens": s, "blocks": batch * n * per_block, "embed": batch * embed, "adapter": 0.0, "attention": attention}
    if adapter:
        ell, ca, win = adapter["audio_tokens"], adapter["audio_proj_dim"], adapter["window"]
        out["adapter"] = batch * (n * (4 * ell * ca * d + 4 * s * win * d) + 2 * ell * adapter["audio_in_dim"] * ca)
        out["attention"] += batch * n * 4 * s * win * d
    return out


def train_flops(fwd: Mapping[str, float], full: bool, trainable_weight_grad: float, checkpointing: bool) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one training step, see :data:`FLOP_FORMULA`.
    ``trainable_weight_grad``: the weight-gradient FLOPs of the trainable set when the backbone is
    frozen (2 · tokens seen · weights)."""
    total = fwd["blocks"] + fwd["embed"] + fwd["adapter"]
    model = 3 * total if full else 2 * total + trainable_weight_grad
    recompute = fwd["blocks"] + fwd["adapter"] if checkpointing else 0.0
    return model, model + recompute


def adapter_sizes(net, audio_tokens: int, frames: int, frame_level: bool = True) -> dict[str, int]:
    """The audio adapter's widths for :func:`forward_flops`: ``net`` is a
    :class:`~ft_train.models.FantasyTalkingDiT`, ``frames`` the clip's video frames. Frame level
    attends each latent frame's window; clip level all ``audio_tokens``."""
    from .models.audio import audio_window_index

    window = audio_window_index(audio_tokens, frames, net.audio_expand)[0].shape[1] if frame_level else audio_tokens
    return {"audio_tokens": audio_tokens, "audio_proj_dim": net.audio_proj.proj.out_features,
            "audio_in_dim": net.audio_proj.proj.in_features, "window": window}


def training_step_flops(net, latents_shape: tuple[int, ...], audio_tokens: int, text_tokens: int = TEXT_TOKENS,
                        image_tokens: int = IMAGE_TOKENS) -> float:
    """Model FLOPs of one training step of ``net`` (a :class:`~ft_train.models.FantasyTalkingDiT`)
    on a batch of latents ``(B, 16, F, H, W)``: 3·fwd when the backbone trains, else 2·fwd plus the
    trainable weights' gradients (each sees ``audio_tokens`` tokens)."""
    b, _, f, h, w = latents_shape
    frames = (f - 1) * 4 + 1  # the Wan VAE's 4× temporal compression, first frame kept
    sizes = adapter_sizes(net, audio_tokens, frames, frame_level=getattr(net, "audio_mode", "frame") == "frame")
    fwd = forward_flops(net.transformer.config, (f, h, w), batch=b, adapter=sizes,
                        text_tokens=text_tokens, image_tokens=image_tokens)
    from .models.lora import is_lora_key

    full = any(p.requires_grad for n, p in net.transformer.named_parameters() if not is_lora_key(n))
    trainable = sum(p.numel() for n, p in net.named_parameters() if p.requires_grad and not is_lora_key(n))
    model, _ = train_flops(fwd, full, 2 * b * audio_tokens * trainable, checkpointing=False)
    # A LoRA (model.lora): its forward, input-gradient and weight-gradient matmuls, 2 FLOPs per
    # weight per token each; a layer sees the video tokens, or the text / image tokens it projects.
    patch = net.transformer.config.patch_size
    video = f // patch[0] * (h // patch[1]) * (w // patch[2])
    for name, p in net.transformer.named_parameters():
        if is_lora_key(name):
            tokens = (text_tokens if ".attn2.to_k." in name or ".attn2.to_v." in name
                      else image_tokens if ".attn2.add_" in name else video)
            model += 3 * 2 * b * tokens * p.numel()
    return model
