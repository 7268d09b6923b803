"""Parallel strategies: Lightning's DeepSpeed ZeRO made to run on CPU too.

Lightning's stock ``DeepSpeedStrategy`` refuses any accelerator but CUDA, and hands DeepSpeed the
root device's index (``None`` on CPU). DeepSpeed itself runs on its CPU accelerator with gloo
(``DS_ACCELERATOR=cpu``). With the two fixes below the very same ZeRO-2/3
code path — sharded save, resume, frozen-parameter exclusion — runs in CI on CPU as on GPUs.
"""

from __future__ import annotations

import argparse
import warnings

from lightning.pytorch.accelerators.cuda import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeed


class DeepSpeedStrategy(_LightningDeepSpeed):
    """``lightning.pytorch.strategies.DeepSpeedStrategy`` that also accepts the CPU accelerator.

    Same arguments as Lightning's (``stage``, ``offload_optimizer``, ``offload_parameters``,
    ``exclude_frozen_parameters``, …).
    """

    strategy_name = "ft_deepspeed"

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            super().setup_environment()
        else:  # skip the CUDA-only check, keep everything DDPStrategy sets up
            DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_distributed()
        # CPU devices have no index, so Lightning's GPU-index check cannot apply.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def init_deepspeed(self) -> None:
        # The stage modules override configure_gradient_clipping only for bf16-mixed with a fused
        # optimizer and defer to DeepSpeed's own clipping (trainer.gradient_clip_val) otherwise,
        # so Lightning's warning that the override "will not actually clip" does not apply.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Since DeepSpeed handles gradient clipping internally")
            super().init_deepspeed()

    def _device_rank(self) -> int:
        index = self.root_device.index
        return self.local_rank if index is None else index

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank()),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer
