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
        checkpoint_memory_gib: with ``checkpoint_keep="auto"`` or ``block_swap_resident="auto"``,
            the device memory (GiB) the step may fill; None = 90 % of the card (checkpoint_keep),
            the card's free memory at the first forward (block swap).
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
        block_swap_resident: block swap (:mod:`.block_swap`): how many DiT blocks (the last ones)
            keep their frozen weights on the device; the others wait in pinned host memory and
            are copied in for each call. ``auto`` = as many as fit (estimated at the first
            forward on CUDA; all on the CPU); None = no swap. Saves memory in training only
            with ``gradient_checkpointing`` and for blocks it recomputes: autograd holds a block
            that stores its activations' weight copies until its backward.
        block_swap_prefetch: with block swap, how many blocks ahead are copied in on a side stream.
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
    block_swap_resident: int | str | None = None
    block_swap_prefetch: int = 1

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
                             " (speed=fp8, speed=offload and speed=single_24gb set it; speed=compiled is the exact form of the first): set model.train_backbone=false")
        self._validate_block_swap(train_backbone, num_blocks)
        kernel = self.self_attention_kernel
        if kernel is not None and kernel not in SDPA_KERNELS and kernel != "auto":
            raise ValueError(f"model.self_attention_kernel must be one of {', '.join(SDPA_KERNELS)}, auto or null, got {kernel!r}")
        if kernel in GPU_KERNELS and accelerator == "cpu":
            raise ValueError(f"model.self_attention_kernel={kernel} needs a CUDA GPU but trainer.accelerator=cpu; "
                             "set model.self_attention_kernel=null or flash")

    def _validate_block_swap(self, train_backbone: bool | None, num_blocks: int | None) -> None:
        resident, prefetch = self.block_swap_resident, self.block_swap_prefetch
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
            raise ValueError(f"model.block_swap_prefetch must be a number of blocks, 1 or more (1 or 2 is usual), got {prefetch!r}")
        if resident is None:
            return
        if isinstance(resident, bool) or not isinstance(resident, (int, str)) or isinstance(resident, str) and resident != "auto":
            raise ValueError(f"model.block_swap_resident must be a number of blocks, auto or null (no swap), got {resident!r}")
        if resident != "auto" and (resident < 0 or num_blocks is not None and resident > num_blocks):
            upper = num_blocks if num_blocks is not None else "the number of blocks"
            raise ValueError(f"model.block_swap_resident must be between 0 and {upper} (the blocks), got {resident}")
        if self.checkpoint_keep == "auto":
            raise ValueError(f"model.checkpoint_keep=auto with model.block_swap_resident={resident}: both would fill the "
                             "card's memory; set model.checkpoint_keep to a number (no larger than the resident blocks)")
        if self.compile_blocks:
            raise ValueError(f"model.block_swap_resident={resident} swaps the blocks' weights between calls, which "
                             "model.compile_blocks=true does not support yet; set model.compile_blocks=false")
        if train_backbone:
            raise ValueError(f"model.block_swap_resident={resident} streams the frozen backbone; it cannot train it "
                             "(model.train_backbone=true): set model.train_backbone=false or model.block_swap_resident=null")


def check_kernel_device(kernel: str | None, device_type: str) -> None:
    """The GPU-only kernels where the model actually runs (its input's device at forward)."""
    if kernel in GPU_KERNELS and device_type != "cuda":
        raise ValueError(f"model.self_attention_kernel={kernel} needs a CUDA GPU (the model runs on "
                         f"{device_type}); set model.self_attention_kernel=null or flash")
