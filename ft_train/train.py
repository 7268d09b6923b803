"""``ft-train``: compose the Hydra config, build everything at the top, train one or more stages.

Everything below this file receives objects, never the config, so each part is
testable without Hydra. ``train(cfg)`` runs one stage and returns its metrics and objects;
``run(cfg, overrides)`` runs ``cfg.stages`` in sequence, each later stage starting from the
previous stage's final checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from .config import CONF_DIR, ConfigError, check_added_keys, check_required, check_values

log = logging.getLogger("ft_train")


def validate_config(cfg) -> None:
    """Reject impossible settings before any weights or devices are touched (and before torch or
    Lightning is imported for the cheap checks, so a typo fails within seconds)."""
    from omegaconf import OmegaConf

    check_required(cfg)
    check_values(cfg)
    stage_names = ("clip", "frame")
    if cfg.stage.name not in stage_names:
        raise ConfigError(f"stage.name={cfg.stage.name}: must be one of {', '.join(stage_names)}")
    check_strategy_callbacks(cfg)
    check_output_dir(cfg)
    frames = OmegaConf.select(cfg, "data.num_frames")
    if frames is not None and (int(frames) - 1) % 4:
        raise ValueError(f"data.num_frames = {frames}: must be 4k+1 (e.g. 81) for the Wan VAE's temporal stride 4")
    pretrained = OmegaConf.select(cfg, "model.pretrained", throw_on_missing=False)
    if pretrained and not Path(str(pretrained)).expanduser().exists():
        raise FileNotFoundError(f"model.pretrained: {pretrained} does not exist; point it at a local Wan2.1-I2V diffusers folder")
    check_slurm(cfg)
    check_model_options(cfg)
    check_lora(cfg)
    check_precision(cfg)
    init_from = cfg.stage.init_from
    if init_from and not Path(str(init_from)).expanduser().exists():
        raise FileNotFoundError(f"stage.init_from: nothing at {init_from}; give a checkpoint, step folder or bundle")
    check_resume(cfg.resume)


def check_strategy_callbacks(cfg) -> None:
    """Callbacks that need whole weights on every rank cannot run under ZeRO-3."""
    from omegaconf import OmegaConf

    deepspeed = "deepspeed" in str(OmegaConf.select(cfg, "strategy._target_", default="")).lower()
    decay = OmegaConf.select(cfg, "callbacks.ema.decay", default=0) if OmegaConf.select(cfg, "callbacks.ema") else 0
    if deepspeed and OmegaConf.select(cfg, "strategy.stage", default=None) == 3 and decay:
        raise ConfigError(f"callbacks.ema.decay={decay} with a ZeRO-3 strategy (strategy.stage=3): ZeRO-3 splits every "
                          "weight over the ranks, so none holds a whole tensor to average; use strategy=deepspeed_zero2 "
                          "or strategy=ddp, or callbacks.ema.decay=0")


def check_output_dir(cfg) -> None:
    """The stage folder can be created and written (checked on the nearest folder that exists,
    so nothing is created here)."""
    stage_dir = Path(str(cfg.paths.stage_dir)).expanduser().absolute()
    output_dir = cfg.paths.output_dir
    existing = stage_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise ConfigError(f"paths.output_dir={output_dir}: cannot write the stage folder {stage_dir} ({problem}); "
                          "give a folder you can write to (paths.output_dir=... or FT_OUTPUT_DIR)")


RESUME_MODES = ("auto", "auto_or_fresh", "never")


def check_resume(resume) -> None:
    """``resume`` is one of :data:`RESUME_MODES` or the path of an existing step folder."""
    if resume in RESUME_MODES or resume is False or resume is None:
        return
    if not isinstance(resume, str) or not Path(resume).expanduser().is_dir():
        raise ValueError(f"resume={resume!r}: must be auto, auto_or_fresh, never or the path of a step folder "
                         "(checkpoints/step-XXXXXXXX)")


def check_model_options(cfg) -> None:
    """Settings that only make sense together: the speed options' rules (one place:
    :meth:`ft_train.speed.SpeedOptions.validate`), and raw-mode data must give the identity branch
    the face input its encoder reads."""
    from omegaconf import OmegaConf

    from .speed import SpeedOptions

    def get(key, default=None):
        value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
        return default if value is None else value

    speed = SpeedOptions(**{k: get(f"model.{k}") for k in SpeedOptions.keys() if get(f"model.{k}") is not None})
    speed.validate(train_backbone=bool(get("model.train_backbone", False)), accelerator=get("trainer.accelerator"))
    if not get("model.identity.enabled", False):
        return
    encoder, face = get("model.identity.encoder", "precomputed"), get("data.face")
    if face is None:  # latent shards: what the encode pass stored is checked when a batch is read
        return
    wants = {"arcface": "pixels", "precomputed": "clip"}.get(str(encoder))
    if wants and face != wants:
        raise ValueError(
            f"model.identity.encoder={encoder} reads {'face-crop pixels' if wants == 'pixels' else 'CLIP face tokens'} "
            f"but data.face={face}; set data.face={wants}"
        )


def check_lora(cfg) -> None:
    """``model.lora`` (each key named in its error), what it cannot go with, and ``model.init_from``:
    every path there, and a LoRA file only with a LoRA to start (``model.lora.rank`` > 0)."""
    from omegaconf import OmegaConf

    from .models.lora import LoraSettings, is_lora_file

    section = OmegaConf.select(cfg, "model.lora", default=None, throw_on_missing=False)
    lora = LoraSettings.from_dict(OmegaConf.to_container(section, resolve=True) if section is not None else None)
    if lora.enabled and OmegaConf.select(cfg, "model.train_backbone", default=False):
        raise ValueError(f"model.lora.rank={lora.rank} with model.train_backbone=true: the full fine-tune trains "
                         "every weight the LoRA would adapt; set model.lora.rank=0 or model.train_backbone=false")
    if lora.enabled and lora.dropout and OmegaConf.select(cfg, "model.checkpoint_offload", default=False):
        raise ValueError(f"model.lora.dropout={lora.dropout} with model.checkpoint_offload=true: the offloaded blocks' "
                         "recompute would draw other dropout masks; set model.lora.dropout=0 or model.checkpoint_offload=false")
    init_from = OmegaConf.select(cfg, "model.init_from", default=None, throw_on_missing=False)
    sources = [] if init_from is None else [init_from] if isinstance(init_from, str) else list(init_from)
    for source in sources:
        path = Path(str(source)).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model.init_from: nothing at {path}; give the released fantasytalking_model.ckpt, "
                                    "a bundle, an ft-train checkpoint or a diffusers-format Wan LoRA (.safetensors)")
        if not lora.enabled and is_lora_file(path):
            raise ValueError(f"model.init_from: {path} is a LoRA file, and this run trains no LoRA; set "
                             "model.lora.rank to its rank")


def check_precision(cfg) -> None:
    """fp16 mixed precision scales the loss; a fused optimizer unscales inside its step, so the
    gradients cannot be clipped before it (bf16-mixed has no scaler: the module clips there)."""
    from omegaconf import OmegaConf

    precision = str(OmegaConf.select(cfg, "trainer.precision", default=""))
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None)
    fused = OmegaConf.select(cfg, "optim.optimizer.fused", default=False)
    deepspeed = "deepspeed" in str(OmegaConf.select(cfg, "strategy._target_", default="")).lower()
    if precision.startswith("16") and fused and clip and not deepspeed:
        raise ValueError(f"trainer.precision={precision} with optim.optimizer.fused=true cannot clip gradients "
                         f"(trainer.gradient_clip_val={clip}): use trainer.precision=bf16-mixed, "
                         "optim.optimizer.fused=false or trainer.gradient_clip_val=null")


def check_slurm(cfg) -> None:
    """Under SLURM, tasks per node and nodes must equal trainer.devices and trainer.num_nodes
    (Lightning needs `--ntasks-per-node`; it rejects `--ntasks` alone)."""
    if "SLURM_JOB_ID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    if per_node is None:
        raise ValueError("SLURM job without --ntasks-per-node: set it to the GPUs per node (Lightning rejects --ntasks alone)")
    per_node = int(per_node.split("(")[0])
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))
    devices, num_nodes = cfg.trainer.devices, int(cfg.trainer.num_nodes)
    if devices not in ("auto", -1) and int(devices) != per_node:
        raise ValueError(f"trainer.devices={devices} but SLURM runs {per_node} tasks per node; make them equal")
    if num_nodes != nodes:
        raise ValueError(f"trainer.num_nodes={num_nodes} but the SLURM job has {nodes} nodes; make them equal")


def resume_path(resume, dirpath) -> str | None:
    """``resume``: ``auto`` (the newest usable step folder in this stage's checkpoints; none there:
    start fresh; some there but none usable: stop), ``auto_or_fresh`` (the same, but start fresh
    when none is usable), ``never``, or the path of a step folder."""
    from .lit.checkpointing import committed_steps, find_resume_checkpoint, lightning_path, usable

    if resume in (None, "never", False):
        return None
    if resume in ("auto", "auto_or_fresh"):
        found = find_resume_checkpoint(dirpath)
        if found:
            return str(lightning_path(found))
        folders = committed_steps(dirpath)
        if folders and resume == "auto":
            raise RuntimeError(
                f"resume=auto: none of the {len(folders)} step folders in {dirpath} is usable (warnings above say why); "
                f"move them away to keep them, or set resume=never to start over (resume=auto_or_fresh does that by itself)")
        if folders:
            log.warning("resume=auto_or_fresh: none of the %d step folders in %s is usable; starting from step 0",
                        len(folders), dirpath)
        return None
    folder = Path(str(resume)).expanduser()
    problem = usable(folder)
    if problem:
        raise FileNotFoundError(f"resume: {folder} is not a usable checkpoint folder ({problem}); give another step "
                                "folder, or resume=auto")
    return str(lightning_path(folder))


def read_previous_config(config_file: Path):
    """The config a stage last started with, or None (absent, or unreadable: warned)."""
    from omegaconf import DictConfig, OmegaConf

    if not config_file.is_file():
        return None
    try:
        previous = OmegaConf.load(config_file)
    except Exception as exc:  # noqa: BLE001 - a half-written or hand-broken file must not stop the run
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    else:
        if isinstance(previous, DictConfig):
            return previous
        why = "not a mapping of settings"
    log.warning("%s is unreadable (%s); the settings changed since the last start are neither listed nor checked; "
                "it is rewritten now", config_file, why)
    return None


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so the file is
    always either the old or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Keys a resumed run may change without a word: how far to train, and how to resume.
RESUME_FREE_KEYS = frozenset({"resume", "stages", "stage.max_steps", "trainer.max_steps"})


# Keys that make a run another run: resume=auto stops rather than continue a checkpoint trained on
# other data or another backbone (two README commands once shared a run folder and the second
# silently resumed the first).
RUN_IDENTITY_KEYS = frozenset({"data._target_", "data.shards", "data.root", "model.pretrained", "stage.name"})


def config_changes(before, after) -> list[str]:
    """``"key: old → new"`` for each setting that differs between two configs (resolved; lists
    compared whole; a key on one side only shows ``(absent)`` on the other), except
    :data:`RESUME_FREE_KEYS`."""
    from omegaconf import OmegaConf

    def flat(node, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out

    old, new = (flat(OmegaConf.to_container(c, resolve=True)) for c in (before, after))
    absent = "(absent)"
    return [f"{k}: {old.get(k, absent)} → {new.get(k, absent)}" for k in sorted(old.keys() | new.keys())
            if k not in RESUME_FREE_KEYS and old.get(k, absent) != new.get(k, absent)]


USER_ERROR = "_ft_user_error"  # set on an exception that is the user's to fix: printed as one line


@contextlib.contextmanager
def user_errors():
    """Mark the errors raised inside (the checks of a config before anything is built) as the
    user's to fix: :func:`main` prints them as one line, without a traceback."""
    try:
        yield
    except (ValueError, OSError, RuntimeError) as exc:
        setattr(exc, USER_ERROR, True)
        raise


def _strategy(cfg):
    from hydra.utils import instantiate

    if cfg.strategy.get("_target_"):
        return instantiate(cfg.strategy)
    return cfg.strategy.get("name", "auto")


def train(cfg) -> dict[str, Any]:
    """Train one stage as configured (resuming per ``cfg.resume``). Returns ``metrics``,
    ``checkpoint`` (the final Lightning checkpoint), ``checkpoint_dir`` (its step folder),
    ``stage_dir``, ``trainer``, ``module`` and ``datamodule``."""
    from omegaconf import OmegaConf

    with user_errors():  # the checks before anything is built: one line each from ft-train
        validate_config(cfg)  # first, before torch and Lightning are imported
        stage_dir = Path(cfg.paths.stage_dir)
        try:
            stage_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"paths.output_dir={cfg.paths.output_dir}: cannot create {stage_dir} ({exc.strerror}); "
                              "give a folder you can write to (paths.output_dir=... or FT_OUTPUT_DIR)") from exc
        config_file = stage_dir / "config.yaml"
        previous = read_previous_config(config_file)
        dirpath = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath")
        if not dirpath:
            raise ConfigError("callbacks.checkpoint is not set: a StepCheckpoint is required; it saves and finds resume points")
        ckpt_path = resume_path(cfg.resume, dirpath)  # before any weights are built
        if previous is not None and cfg.resume in ("auto", "auto_or_fresh") and ckpt_path:
            other_run = [c for c in config_changes(previous, cfg) if c.split(":", 1)[0] in RUN_IDENTITY_KEYS]
            if other_run:  # before any weights are loaded
                raise ValueError(
                    f"run_id={cfg.run_id}: {stage_dir} holds a run of other data or another model ({'; '.join(other_run)}); "
                    f"give this run its own run_id=NAME, or resume=never to start {stage_dir} over")
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import rank_zero_only

    from .lit.checkpointing import StepCheckpoint, find_resume_checkpoint, lightning_path

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    net = instantiate(cfg.model)
    loss = instantiate(cfg.loss)
    optimizer = instantiate(cfg.optim.optimizer)
    scheduler = instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None
    module = instantiate(cfg.stage.module)(
        net=net, loss=loss, optimizer=optimizer, scheduler=scheduler, seed=int(cfg.seed),
        init_from=cfg.stage.init_from, max_nonfinite_steps=int(cfg.faults.max_nonfinite_steps),
        max_skipped_fraction=float(cfg.faults.max_skipped_fraction), skip_check_after=int(cfg.faults.skip_check_after),
    )
    datamodule = instantiate(cfg.data)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    # The callbacks that save run last in each hook, so a checkpoint written at the end of a step
    # holds what the other callbacks did in that step (the EMA's update, for one).
    from .lit.preemption import Preemption

    callbacks.sort(key=lambda c: isinstance(c, (StepCheckpoint, Preemption)))
    loggers = [instantiate(c) for c in cfg.logger.values() if c]
    plugins = []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        # Preemption is handled by callbacks.preemption (flag, agree, save together, requeue);
        # Lightning's own requeue saves inside the signal handler and can deadlock (#21406).
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, strategy=_strategy(cfg), plugins=plugins)

    checkpointer = next((c for c in callbacks if isinstance(c, StepCheckpoint)), None)
    if checkpointer is None:
        raise ValueError("callbacks: a StepCheckpoint (callbacks.checkpoint) is required; it saves and finds resume points")
    from .spec import ModelSpec, read_data_stats

    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        data_stats = read_data_stats(resolved)
    except (FileNotFoundError, ValueError):
        data_stats = None  # the datamodule reports a missing or broken stats file itself
    checkpointer.spec = ModelSpec.from_run_config(resolved, audio_mode=net.audio_mode, data_stats=data_stats)
    changes = config_changes(previous, cfg) if ckpt_path and previous is not None else []
    if rank_zero_only.rank == 0:  # one writer; the others would race it to the file
        write_atomically(config_file, OmegaConf.to_yaml(cfg, resolve=True))
    if changes:
        log.warning("resuming from %s with settings changed since this stage last started (its config.yaml): %s; "
                    "the losses follow an uninterrupted run's only with the same seed, data, batch size and ranks",
                    ckpt_path, "; ".join(changes))
    log.info("stage %s → %s%s", cfg.stage.name, stage_dir, f" (resuming from {ckpt_path})" if ckpt_path else "")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    final = checkpointer.last_path or find_resume_checkpoint(checkpointer.dirpath, check=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return {
        "metrics": metrics,
        "checkpoint": str(lightning_path(final)),
        "checkpoint_dir": str(final),
        "stage_dir": str(stage_dir),
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
    }


def _compose(overrides: list[str]):
    """``conf/train.yaml`` with ``overrides``, inside ft-train's Hydra app or on its own."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def run(cfg, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Run ``cfg.stages`` in order (or just ``cfg.stage``), chaining checkpoints between stages.

    Later stages are composed afresh from the same command-line ``overrides`` plus
    ``stage=<name>`` and ``stage.init_from=<previous final checkpoint>``. A ``stage=NAME`` among the
    ``overrides`` runs that stage alone, even where the experiment sets ``stages``.
    """
    stages = list(cfg.get("stages") or [])
    overrides = list(overrides or [])
    with user_errors():
        check_added_keys(cfg, overrides)
    given = {o.split("=")[0].lstrip("+~") for o in overrides}
    if "stage" in given and "stages" in given and stages:
        raise ValueError("set either `stages` (a sequence) or `stage` (one stage), not both")
    if not stages or "stage" in given:  # `stage=NAME` on the command line runs that stage alone
        if stages:
            log.info("stage=%s given: running that stage alone (the experiment's stages=%s are not run)",
                     cfg.stage.name, stages)
        return [train(cfg)]
    results: list[dict[str, Any]] = []
    for i, name in enumerate(stages):
        extra = [f"stage={name}"]
        if results:
            extra.append(f"stage.init_from='{results[-1]['checkpoint']}'")
        stage_cfg = cfg if (i == 0 and cfg.stage.name == name) else _compose(overrides + extra)
        results.append(train(stage_cfg))
        log.info("stage %s done: %s", name, results[-1]["checkpoint"])
    return results


def main() -> None:
    """Console entry point ``ft-train`` (Hydra CLI: ``ft-train experiment=tiny_cpu key=value``).

    A configuration error (a value out of range, an unknown added key, an unset required key, an
    unwritable output folder, Hydra's own override errors) ends the command with one line naming
    the key, before torch or Lightning is imported; ``HYDRA_FULL_ERROR=1`` shows the traceback."""
    # Weights only ever come from local paths: make any accidental hub access fail fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import hydra
    from hydra.core.hydra_config import HydraConfig

    user_setting = os.environ.get("HYDRA_FULL_ERROR")
    full_error = user_setting == "1"
    started = False

    def restore_setting() -> None:
        if user_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_setting

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
    def _main(cfg) -> None:
        nonlocal started
        started = True
        restore_setting()  # from here on Hydra reports errors as it would (and ranks it starts inherit this)
        try:
            results = run(cfg, list(HydraConfig.get().overrides.task))
        except Exception as exc:
            if getattr(exc, USER_ERROR, False) and not full_error:
                raise SystemExit(f"ft-train: {exc}") from None  # passes Hydra's handler: no traceback
            raise
        for r in results:
            loss = r["metrics"].get("train/loss")
            print(f"[ft-train] {r['stage_dir']}: final checkpoint {r['checkpoint']}"
                  + (f", last train/loss {loss:.4f}" if loss is not None else ""))

    # Until the task starts (composing, creating the run folder), Hydra's errors come here instead
    # of being printed with a stack, so they can be told as one line.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except Exception as exc:
        if full_error or started:
            raise
        raise SystemExit(_startup_error(exc, HydraConfig)) from None
    finally:
        restore_setting()


def _startup_error(exc: Exception, hydra_config) -> str:
    """One line for an error raised while Hydra composes the config or creates the run folder."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, OSError):  # the run folder (hydra.run.dir = paths.run_dir = <output_dir>/<run_id>)
        try:
            run_dir = str(hydra_config.get().runtime.output_dir)
        except Exception:  # noqa: BLE001 - Hydra failed before it knew the folder
            run_dir = exc.filename
        output_dir = Path(run_dir).parent if run_dir else "?"
        return (f"ft-train: paths.output_dir={output_dir}: cannot create the run folder {run_dir or exc.filename} "
                f"({exc.strerror or exc}); give a folder you can write to (paths.output_dir=... or FT_OUTPUT_DIR)")
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        lines = [str(exc).strip()]
        if isinstance(exc.__cause__, OmegaConfBaseException) and str(exc.__cause__).strip() not in lines[0]:
            lines.append(str(exc.__cause__).strip().splitlines()[0])
        return "ft-train: " + "\n".join(lines) + "\n(the full stack with HYDRA_FULL_ERROR=1)"
    raise exc


if __name__ == "__main__":
    main()
