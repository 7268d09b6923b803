"""``SpeedOptions``: every speed setting of the model in one typed object, and every rule about
which of them go together, stated once.

The settings are the ``model.*`` keys users type (``model.gradient_checkpointing``,
``model.checkpoint_keep``, ``model.frozen_fp8``, ...; the ``speed=`` presets set them), so each
error names the key to change. ``ft-train`` checks them before anything is built
(:meth:`SpeedOptions.validate` with the trainer's accelerator), and :func:`ft_train.speed.apply`
checks them again against the built network (its block count, whether its backbone trains).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

# torch's SDPA kernels by the names ``model.self_attention_kernel`` takes (values: SDPBackend names).
SDPA_KERNELS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
GPU_KERNELS = ("cudnn", "efficient")  # no CPU implementation


@dataclass(frozen=True)
class SpeedOptions:
    """How the network runs, never what it computes (fp8 aside: approximate by design).

    Args:
        gradient_checkpointing: recompute each DiT block in backward.
        checkpoint_keep: with checkpointing, the last N blocks keep their activations instead
            (fewer recomputed blocks, more memory), or ``"auto"``: as many as fit in
            ``checkpoint_memory_gib``, measured in the first training step.
        checkpoint_memory_gib: with ``checkpoint_keep="auto"``, the device memory (GiB) the step
            may fill; None = 90 % of the card.
        checkpoint_offload: with checkpointing, the recomputed blocks keep their input in pinned
            host memory instead of on the device.
        checkpoint_save_attention: with checkpointing, the recomputed blocks keep their
            self-attention outputs (S × d each), so backward skips the attention forward.
        attention_backend: a diffusers attention backend for every attention (``_native_cudnn``,
            ``_native_flash``, ``flash``, ...); None = torch SDPA's own choice.
        self_attention_kernel: the torch SDPA kernel of the video self-attention (``cudnn``,
            ``flash``, ``efficient``, ``math``; ``auto`` = time them at the first forward on a
            GPU and keep the fastest); None = torch's choice.
        compile_blocks: ``torch.compile`` each DiT block (the blocks share one compiled graph).
        frozen_fp8: the frozen blocks' linear weights in float8, their forward matmuls in fp8.
        frozen_fp8_backward: with ``frozen_fp8``, their input-gradient matmuls in fp8 too.
    """

    gradient_checkpointing: bool = False
    checkpoint_keep: int | str = 0
    checkpoint_memory_gib: float | None = None
    checkpoint_offload: bool = False
    checkpoint_save_attention: bool = False
    attention_backend: str | None = None
    self_attention_kernel: str | None = None
    compile_blocks: bool = False
    frozen_fp8: bool = False
    frozen_fp8_backward: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The option names: the ``model.*`` keys they come from."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def split(cls, model_keys: Mapping[str, Any]) -> tuple[dict[str, Any], "SpeedOptions"]:
        """``model.*`` keys → (the network's own keys, the speed options among them)."""
        speed = {k: v for k, v in model_keys.items() if k in cls.keys()}
        rest = {k: v for k, v in model_keys.items() if k not in speed}
        return rest, cls(**speed)

    def validate(self, train_backbone: bool | None = None, accelerator: str | None = None,
                 num_blocks: int | None = None) -> None:
        """Raise a ``ValueError`` naming the key to change for an impossible combination. The
        arguments are what the options are checked against when known: whether the backbone
        trains (``model.train_backbone``), the device type (``trainer.accelerator``: ``cpu``,
        ``gpu``, ``cuda``, ...; the model's device at forward) and the network's block count."""
        keep = self.checkpoint_keep
        if isinstance(keep, str) and keep != "auto" or isinstance(keep, bool) or not isinstance(keep, (int, str)):
            raise ValueError(f"model.checkpoint_keep must be a number of blocks or auto, got {keep!r}")
        if not self.gradient_checkpointing:
            if keep == "auto" or keep:
                raise ValueError(f"model.checkpoint_keep={keep} needs model.gradient_checkpointing=true (it picks blocks NOT to recompute)")
            if self.checkpoint_offload:
                raise ValueError("model.checkpoint_offload=true needs model.gradient_checkpointing=true (it offloads the recomputed blocks' inputs)")
            if self.checkpoint_save_attention:
                raise ValueError("model.checkpoint_save_attention=true needs model.gradient_checkpointing=true (it changes what recomputed blocks keep)")
        if keep != "auto" and (keep < 0 or num_blocks is not None and keep > num_blocks):
            upper = num_blocks if num_blocks is not None else "the number of blocks"
            raise ValueError(f"model.checkpoint_keep must be between 0 and {upper} (the blocks), got {keep}")
        if self.checkpoint_offload and self.checkpoint_save_attention:
            raise ValueError("model.checkpoint_offload and model.checkpoint_save_attention cannot be combined; pick one")
        if self.frozen_fp8_backward and not self.frozen_fp8:
            raise ValueError("model.frozen_fp8_backward=true needs model.frozen_fp8=true (it changes the float8 layers' backward)")
        if self.frozen_fp8 and train_backbone:
            raise ValueError("model.frozen_fp8=true stores the frozen backbone in float8; it cannot train it (model.train_backbone=true)"
                             " (speed=fp8 and speed=offload set it; speed=compiled is their exact form): set model.train_backbone=false")
        kernel = self.self_attention_kernel
        if kernel is not None and kernel not in SDPA_KERNELS and kernel != "auto":
            raise ValueError(f"model.self_attention_kernel must be one of {', '.join(SDPA_KERNELS)}, auto or null, got {kernel!r}")
        if kernel in GPU_KERNELS and accelerator == "cpu":
            raise ValueError(f"model.self_attention_kernel={kernel} needs a CUDA GPU but trainer.accelerator=cpu; "
                             "set model.self_attention_kernel=null or flash")


def check_kernel_device(kernel: str | None, device_type: str) -> None:
    """The GPU-only kernels where the model actually runs (its input's device at forward)."""
    if kernel in GPU_KERNELS and device_type != "cuda":
        raise ValueError(f"model.self_attention_kernel={kernel} needs a CUDA GPU (the model runs on "
                         f"{device_type}); set model.self_attention_kernel=null or flash")
