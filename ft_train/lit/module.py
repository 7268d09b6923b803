"""LightningModules: the training step of stage 1 (clip level) and stage 2 (frame level).

They compose a network (``ft_train.models``) with a loss (``ft_train.diffusion``) and own only
the step, logging and optimiser set-up. The two stages differ by configuration; the thin
subclasses pin what defines each stage (the audio attention mode) so a mismatched config fails.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

from ..diffusion import FlowMatchingLoss, step_generator
from ..flops import training_step_flops
from ..models import FantasyTalkingDiT, model_summary
from ..models.weights import load_adapter_weights
from ..speed import auto_checkpoint_keep, fp8_buffer_names, speed_state

log = logging.getLogger(__name__)


class FantasyTalkingModule(L.LightningModule):
    """Flow-matching training of the FantasyTalking adapters.

    Args:
        net: the network (adapters installed).
        loss: the flow-matching loss (owns the step's randomness).
        optimizer: ``partial`` of a torch optimiser, given the trainable parameters.
        scheduler: optional ``partial`` of an LR scheduler, given the optimiser (stepped per step).
        seed: base seed of the per-step generators.
        init_from: optional checkpoint whose adapter (and any backbone) weights start this run,
            e.g. the stage-1 result for stage 2.
        max_nonfinite_steps: a step whose loss is NaN/inf on any rank is skipped on every rank
            (logged as NaN, no weight update); this many in a row stop the run.
        max_skipped_fraction: unreadable samples are skipped by the loader and counted
            (``data/skipped``, summed over ranks); once ``skip_check_after`` samples have been
            read, a skipped share above this stops the run (broken shards, wrong paths, a full
            disk while writing them).
        skip_check_after: samples (all ranks) read before the skipped share is judged.
    """

    audio_mode: str | None = None  # set by the stage subclasses

    def __init__(
        self,
        net: FantasyTalkingDiT,
        loss: FlowMatchingLoss,
        optimizer: Callable[..., torch.optim.Optimizer] = partial(torch.optim.AdamW, lr=1e-4),
        scheduler: Callable[..., Any] | None = None,
        seed: int = 0,
        init_from: str | None = None,
        max_nonfinite_steps: int = 5,
        max_skipped_fraction: float = 0.1,
        skip_check_after: int = 100,
    ):
        super().__init__()
        self.net = net
        # Float8 frozen weights (model.frozen_fp8) are quantised identically on every rank: DDP
        # need not broadcast them (its buffer sync would send the whole backbone every step).
        if fp8 := fp8_buffer_names(net):
            self._ddp_params_and_buffers_to_ignore = [f"net.{name}" for name in fp8]
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.seed = seed
        if self.audio_mode is not None:
            net.audio_mode = self.audio_mode
        if init_from:
            load_adapter_weights(net, init_from, key="stage.init_from")  # logs what it loaded
        # Checkpoints hold only trainable tensors (the frozen 14B backbone comes from its own
        # folder), so loading is non-strict; on_load_checkpoint checks nothing trainable is missing.
        self.strict_loading = False
        self._batch_checked = False
        self.max_nonfinite_steps = max_nonfinite_steps
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(f"faults.max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
        self.max_skipped_fraction = max_skipped_fraction
        self.skip_check_after = skip_check_after
        # Summed over ranks. Not checkpointed: a resumed loader re-reads (and re-skips) the
        # samples before its position while it fast-forwards, so the count rebuilds itself.
        self.samples_skipped = 0
        self.samples_used = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        # Batches taken from the loader, skipped steps included: the data position for resume.
        self.batches_seen = 0
        self._skip_update = False
        self._flops: tuple[tuple[int, ...], float] | None = None  # (batch shapes, FLOPs) of the last batch

    @property
    def flops_per_batch(self) -> float | None:
        """Model FLOPs of one training step on the last batch (:func:`~ft_train.flops.training_step_flops`),
        for ``callbacks.throughput``'s MFU; None before the first batch."""
        return self._flops[1] if self._flops is not None else None

    def count_flops(self, batch: dict[str, torch.Tensor]) -> None:
        shapes = (*batch["latents"].shape, batch["audio"].shape[1], batch["text"].shape[1], batch["clip"].shape[1])
        if self._flops is None or self._flops[0] != shapes:
            flops = training_step_flops(self.net, batch["latents"].shape, batch["audio"].shape[1],
                                        text_tokens=batch["text"].shape[1], image_tokens=batch["clip"].shape[1])
            self._flops = (shapes, float(flops))

    # -- steps ---------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        null_text = getattr(dm, "null_text", None)
        if null_text is not None:
            self.loss.null_text = null_text.to(self.device)
        summary = model_summary(self.net)
        log.info("params: %s", summary)

    def on_train_start(self) -> None:
        if self.global_step > 0:  # resumed: forget what the interrupted run logged after its checkpoint
            for logger in self.loggers:
                if hasattr(logger, "truncate_from"):  # ResumableCSVLogger, ResumableTensorBoardLogger
                    logger.truncate_from(self.global_step)

    def check_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Fail once, clearly, when the data's widths do not match the model config."""
        cfg = self.net.transformer.config
        checks = [
            ("clip", batch["clip"].shape[-1], cfg.image_dim, "model.transformer.image_dim"),
            ("text", batch["text"].shape[-1], cfg.text_dim, "model.transformer.text_dim"),
            ("audio", batch["audio"].shape[-1], self.net.audio_proj.proj.in_features, "model.audio_in_dim"),
        ]
        for name, got, want, key in checks:
            if got != want:
                raise ValueError(f"data gives {name} features of width {got} but {key} = {want}; use matching shards or model")
        lat = batch["latents"]
        if lat.shape[1] != 16:
            raise ValueError(f"data gives latents with {lat.shape[1]} channels; the Wan VAE has 16")
        self._batch_checked = True

    def all_finite(self, loss: torch.Tensor, skipped: int = 0, used: int = 0) -> bool:
        """True when the loss is finite on every rank (all ranks must take the same branch).

        The same all-reduce sums this step's skipped and used sample counts over the ranks (into
        ``samples_skipped`` / ``samples_used``), so counting costs no extra collective.
        """
        local = torch.tensor([float(not torch.isfinite(loss.detach()).all()), float(skipped), float(used)],
                             device=loss.device, dtype=torch.float64)
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        self.samples_skipped += int(total[1].item())
        self.samples_used += int(total[2].item())
        return bool(total[0].item() == 0)

    def check_skipped(self, bsz: int) -> None:
        """Stop when too much of the data is unreadable (the same decision on every rank)."""
        seen = self.samples_skipped + self.samples_used
        if self.samples_skipped:
            self.log("data/skipped", float(self.samples_skipped), batch_size=bsz)
            self.log("data/skipped_fraction", self.samples_skipped / max(seen, 1), batch_size=bsz)
        if seen >= self.skip_check_after and self.samples_skipped > self.max_skipped_fraction * seen:
            raise RuntimeError(
                f"{self.samples_skipped} of {seen} samples read so far were unreadable and skipped "
                f"(more than faults.max_skipped_fraction={self.max_skipped_fraction}); the warnings above name "
                "the shards — fix or remove them (or raise faults.max_skipped_fraction)"
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches_seen += 1
        skipped = batch.pop("skipped", None)
        skipped = int(skipped.sum()) if skipped is not None else 0
        if not self._batch_checked:
            self.check_batch(batch)
        self.count_flops(batch)
        accumulate = max(1, self.trainer.accumulate_grad_batches)
        if batch_idx % accumulate == 0:  # a new optimiser step begins
            if not self._skip_update:  # and the one before it was taken
                self.nonfinite_in_a_row = 0
            self._skip_update = False
        generator = step_generator(self.seed, self.global_step, self.global_rank, batch_idx % accumulate)
        if getattr(getattr(self.net, "lora_config", None), "dropout", 0):
            # LoRA dropout draws from torch's global generator: seed it from the step too, so a
            # resumed run draws the same masks (the loss keeps its own generator).
            torch.manual_seed(generator.initial_seed() ^ 0x10A4)
        out = self.loss(self.net, batch, generator)
        bsz = batch["latents"].shape[0]
        finite = self.all_finite(out.loss, skipped, bsz)
        self.check_skipped(bsz)
        if not finite and not self._skip_update:  # the step's first non-finite batch: count the step once
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
                raise RuntimeError(
                    f"loss was NaN/inf for {self.nonfinite_in_a_row} steps in a row (at step {self.global_step}); "
                    "lower optim.optimizer.lr, check the data, or resume from an earlier checkpoint"
                )
            log.warning("non-finite loss at step %d: step skipped (%d in a row, %d in total)",
                        self.global_step, self.nonfinite_in_a_row, self.nonfinite_total)
            # Lightning forbids skipping a step in distributed runs, and every rank must run the
            # same backward collectives: each batch of the step backpropagates zero through the
            # same graph, then its gradients are dropped (on_after_backward), so the optimiser
            # leaves every weight untouched. Under gradient accumulation the whole step is
            # skipped: the flag stays up until the step ends.
            self._skip_update = True
        self.log("train/nonfinite_steps", float(self.nonfinite_total), batch_size=bsz)
        if self._skip_update:
            # Logged as such (Lightning would otherwise repeat the previous step's value).
            self.log("train/loss", float("nan"), prog_bar=True, batch_size=bsz)
            return out.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=bsz)
        for name, value in out.logs.items():
            self.log(f"train/{name}", value, batch_size=bsz)
        return out.loss

    def on_after_backward(self) -> None:
        # A skipped step: no gradient at all, so AdamW neither moves the weights nor its moments
        # (the step's earlier batches' gradients go too, and its later ones' are dropped here).
        # (Under DeepSpeed the engine owns the gradients and applies a zero-gradient step.)
        if self._skip_update:
            for p in self.net.parameters():
                p.grad = None

    def on_before_optimizer_step(self, optimizer) -> None:
        # train/grad_norm: the L2 norm of all trainable gradients before clipping (synchronised
        # over ranks already). DeepSpeed keeps its gradients itself: its own norm is logged after
        # its step (on_train_batch_end).
        if self._skip_update or self._deepspeed_engine() is not None:
            return
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads).float(), batch_size=1)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales its
        # own gradients (fused AdamW), even under bf16-mixed, where no scaler exists and nothing
        # is scaled. Then clip exactly as Lightning would (its base Precision.clip_gradients: the
        # norm over the optimizer's parameters). With a scaler (16-mixed) the refusal stands:
        # ft-train stops before training with the keys to change. DeepSpeed clips in its engine.
        precision = self.trainer.precision_plugin
        if isinstance(precision, MixedPrecision) and precision.scaler is None and gradient_clip_val:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(precision, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _deepspeed_engine(self):
        return getattr(self.trainer.strategy, "deepspeed_engine", None)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        engine = self._deepspeed_engine()
        if engine is not None and not self._skip_update and (batch_idx + 1) % max(1, self.trainer.accumulate_grad_batches) == 0:
            norm = engine.get_global_grad_norm()  # computed inside the engine's step, before clipping
            if norm is not None:
                self.log("train/grad_norm", float(norm), batch_size=1)
        # model.checkpoint_keep=auto: size it once the first optimiser step (its state included)
        # has shown the peak memory.
        if speed_state(self.net).checkpoint_auto and self.trainer.global_step >= 1:
            self.size_checkpointing()
        # The last step is logged whatever trainer.log_every_n_steps says (Lightning logs only on
        # its multiples, so a short run wrote no metrics.csv at all): a stop request makes
        # Lightning log this step, and training ends here anyway.
        max_steps = self.trainer.max_steps
        if max_steps is not None and max_steps > 0 and self.trainer.global_step >= max_steps:
            self.trainer.should_stop = True

    def size_checkpointing(self) -> int:
        """``model.checkpoint_keep=auto``: keep as many blocks as ``model.checkpoint_memory_gib``
        (default 90 % of the card) allows (:func:`~ft_train.speed.auto_checkpoint_keep`).
        All ranks take the largest peak and block cost, so they keep the same blocks."""
        strategy = self.trainer.strategy

        def reduce_max(*values: int) -> list[int]:
            worst = strategy.reduce(torch.tensor(values, device=self.device, dtype=torch.float64), reduce_op="max")
            return [int(v) for v in worst.tolist()]

        keep, info = auto_checkpoint_keep(self.net, self.device, reduce_max=reduce_max,
                                          all_ranks=lambda ok: strategy.reduce_boolean_decision(ok, all=True))
        if not info["measured"]:
            log.warning("model.checkpoint_keep=auto needs CUDA memory statistics (device %s); keeping the "
                        "last %d block(s); set model.checkpoint_keep=N", self.device, keep)
        else:
            log.info("model.checkpoint_keep=auto: step peaked at %.1f GiB (%.1f GiB of it optimizer state created by "
                     "the first step) with %d kept block(s) of %.2f GiB each; keeping the last %d of %d blocks for a "
                     "%.1f GiB budget", info["peak_bytes"] / 2**30, info["state_bytes"] / 2**30, info["kept_before"],
                     info["per_block_bytes"] / 2**30, keep, self.net.num_blocks, info["budget_bytes"] / 2**30)
        return keep

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen (check model.train_backbone)")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------
    def trainable_keys(self) -> set[str]:
        names = {f"net.{n}" for n, p in self.net.named_parameters() if p.requires_grad}
        names |= {f"net.{k}" for k in self.net.adapter_state_dict()}
        return names

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["ft_train"] = {
            "stage": self.audio_mode,
            "audio_mode": self.net.audio_mode,
            "batches_seen": self.batches_seen,
            "nonfinite_total": self.nonfinite_total,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ft_train", {})
        self.batches_seen = int(state.get("batches_seen", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        if "state_dict" not in checkpoint:  # DeepSpeed restores the weights itself
            return
        missing = sorted(self.trainable_keys() - checkpoint["state_dict"].keys())
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors (first: {missing[0]})")


class ClipStageModule(FantasyTalkingModule):
    """Stage 1: clip-level audio attention, plain flow-matching loss (paper: ≈80k steps)."""

    audio_mode = "clip"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.loss.lip_weighting:
            log.warning("stage 1 (clip) with lip weighting on: the paper uses the lip loss only in stage 2")


class FrameStageModule(FantasyTalkingModule):
    """Stage 2: frame-level audio windows with the lip-tracing loss (paper: ≈20k steps).

    Normally started from the stage-1 checkpoint (``stage.init_from``); without it this is the
    paper's "frame-level only" ablation.
    """

    audio_mode = "frame"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not kwargs.get("init_from") and not getattr(self.net, "initialised_from", None):
            log.warning("stage 2 (frame) with neither stage.init_from nor model.init_from: training frame-level "
                        "from scratch (the paper starts it from stage 1)")
