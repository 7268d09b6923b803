"""Exact resume, atomic/pruned checkpoints with fallback, and non-finite loss handling (1 process)."""

import json
import logging

import pytest
from hydra import compose, initialize_config_dir

from ft_train.lit import read_metric
from ft_train.lit.checkpointing import committed_steps, find_resume_checkpoint, verify
from ft_train.train import train

from .conftest import CONF, REPO, tensorboard_events


def overrides(out, run, steps, *extra):
    return ["experiment=tiny_cpu", f"paths.output_dir={out}", f"run_id={run}", "stages=null",
            f"stage.max_steps={steps}", "trainer.log_every_n_steps=1", "callbacks.checkpoint.every_n_steps=2",
            "callbacks.checkpoint.keep_last=10", *extra]


def config(out, run, steps, *extra):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides(out, run, steps, *extra))


def losses(out, run, stage="clip"):
    return read_metric(out / run / stage / "metrics.csv", "train/loss")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    train(config(out, "full", 7, "data.num_workers=2"))
    return out, losses(out, "full")


@pytest.mark.parametrize("stop_at", [2, 3, 5])
def test_interrupted_and_resumed_run_matches_uninterrupted(uninterrupted, stop_at):
    out, expected = uninterrupted
    run = f"cut{stop_at}"
    train(config(out, run, stop_at, "data.num_workers=2"))  # "killed" right after step stop_at's checkpoint
    resumed = train(config(out, run, 7, "data.num_workers=2"))
    assert resumed["trainer"].global_step == 7
    assert losses(out, run) == expected  # same steps, bit-identical losses


def test_killed_right_after_a_commit_the_resumed_log_has_every_step_once(uninterrupted, tmp_path):
    """SIGKILL the instant step 4's folder is committed (nothing flushed or finalised after it):
    metrics.csv already holds every step before the checkpoint's, and the resumed run continues
    it with each step exactly once and the uninterrupted run's losses."""
    import os
    import subprocess
    import sys

    out, expected = uninterrupted
    command = [sys.executable, "-m", "ft_train.train",
               *overrides(out, "killed", 7, "data.num_workers=2", "+callbacks.kill._target_=tests.faults.KillAfterCommit",
                          "+callbacks.kill.step=4")]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert find_resume_checkpoint(out / "killed" / "clip" / "checkpoints").name == "step-00000004"
    assert losses(out, "killed")[0] == [0, 1, 2, 3]  # on disk before the commit: step 4's own row too
    train(config(out, "killed", 7, "data.num_workers=2"))
    steps, values = losses(out, "killed")
    assert steps == list(range(7))
    assert (steps, values) == expected


def test_damaged_latest_checkpoint_falls_back_to_previous(uninterrupted, caplog):
    out, expected = uninterrupted
    train(config(out, "dmg", 4, "data.num_workers=2"))  # folders step-2 and step-4 (final)
    ckpt_dir = out / "dmg" / "clip" / "checkpoints"
    damaged = ckpt_dir / "step-00000004" / "model.ckpt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # truncated by a crash mid-copy
    assert "model.ckpt has 1000 bytes" in verify(damaged.parent)
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(ckpt_dir).name == "step-00000002"
    assert "falling back" in caplog.text
    train(config(out, "dmg", 7, "data.num_workers=2"))
    assert losses(out, "dmg") == expected


def test_resume_with_gradient_accumulation_matches_uninterrupted(tmp_path):
    # Two batches per optimiser step: checkpoints fall on step boundaries, and the resumed loader
    # and loss seeds (which micro-batch of the step) must pick up where the cut run stopped.
    extra = ("data.num_workers=2", "trainer.accumulate_grad_batches=2")
    train(config(tmp_path, "full", 4, *extra))
    train(config(tmp_path, "cut", 3, *extra))  # cut off the checkpoint period: its final checkpoint is step 3's
    resumed = train(config(tmp_path, "cut", 4, *extra))
    assert resumed["module"].batches_seen == 8  # 4 steps of 2 batches, counted on from the checkpoint
    assert losses(tmp_path, "cut") == losses(tmp_path, "full")

def tensorboard_scalars(folder, tag, purge=True):
    events = [(step, value) for step, t, value in tensorboard_events(folder, purge) if t == tag]
    return [step for step, _ in events], [value for _, value in events]


def test_tensorboard_curves_continue_across_a_resume(uninterrupted):
    import shutil

    out, (steps, values) = uninterrupted
    train(config(out, "tb", 5, "data.num_workers=2", "logger=tensorboard"))  # checkpoints 2, 4, 5
    # Killed after step 5 was logged but before its checkpoint was committed: resume from 4.
    shutil.rmtree(out / "tb" / "clip" / "checkpoints" / "step-00000005")
    train(config(out, "tb", 7, "data.num_workers=2", "logger=tensorboard"))
    folder = out / "tb" / "clip" / "tensorboard"
    raw_steps, _ = tensorboard_scalars(folder, "train/loss", purge=False)
    assert len(raw_steps) > len(steps)  # the first run's steps after the checkpoint are in its file
    tb_steps, tb_values = tensorboard_scalars(folder, "train/loss")
    assert tb_steps == steps  # each step once, as metrics.csv of the uninterrupted run
    assert tb_values == pytest.approx(values, rel=1e-6)  # float32 in the event file
    assert losses(out, "tb") == (steps, values)  # the csv logger beside it is resumed too

def test_unfinished_folder_is_never_used_and_old_ones_are_pruned(tmp_path):
    train(config(tmp_path, "prune", 6, "data.num_workers=0", "callbacks.checkpoint.every_n_steps=1",
                 "callbacks.checkpoint.keep_last=2"))
    ckpt_dir = tmp_path / "prune" / "clip" / "checkpoints"
    assert [p.name for _, p in committed_steps(ckpt_dir)] == ["step-00000006", "step-00000005"]
    marker = json.loads((ckpt_dir / "step-00000006" / "COMMITTED.json").read_text())
    assert marker["step"] == 6 and "model.ckpt" in marker["files"]
    # A folder without the marker (a save cut short) is ignored.
    (ckpt_dir / "step-00000009").mkdir()
    assert find_resume_checkpoint(ckpt_dir).name == "step-00000006"


def test_nonfinite_loss_skips_the_step_and_training_continues(tmp_path):
    result = train(config(tmp_path, "nan", 5, "data.num_workers=0", "loss._target_=tests.faults.NaNLoss",
                          "+loss.nan_calls=[2,3]"))
    module = result["module"]
    # A skipped step still counts as a step (Lightning's global step): 5 batches, 3 weight updates.
    assert result["trainer"].global_step == 5
    assert module.nonfinite_total == 2 and module.batches_seen == 5
    steps, values = losses(tmp_path, "nan")
    assert steps == [0, 1, 2, 3, 4]
    skipped = [s for s, v in zip(steps, values) if v != v]
    assert skipped == [1, 2]  # logged as NaN, not as a repeat of the previous value


def test_too_many_nonfinite_steps_stop_the_run(tmp_path):
    with pytest.raises(RuntimeError, match="NaN/inf for 3 steps in a row"):
        train(config(tmp_path, "nan3", 6, "data.num_workers=0", "loss._target_=tests.faults.NaNLoss",
                     "+loss.nan_calls=[1,2,3,4]", "faults.max_nonfinite_steps=3"))


def test_nonfinite_batches_under_accumulation_count_and_log_per_step(tmp_path):
    # Two batches a step. Step 0: its second batch is NaN; step 1: both are. Step 2 is clean.
    result = train(config(tmp_path, "nanacc", 3, "data.num_workers=0", "loss._target_=tests.faults.NaNLoss",
                          "+loss.nan_calls=[2,3,4]", "trainer.accumulate_grad_batches=2"))
    module = result["module"]
    assert result["trainer"].global_step == 3 and module.batches_seen == 6
    assert module.nonfinite_total == 2  # steps, not batches
    steps, values = losses(tmp_path, "nanacc")
    assert steps == [0, 1, 2] and [v != v for v in values] == [True, True, False]


def test_nonfinite_steps_in_a_row_count_steps_under_accumulation(tmp_path):
    # Step 0 clean, then its batches 3-6 NaN: steps 1 and 2, the second time in a row, stop the run.
    with pytest.raises(RuntimeError, match=r"NaN/inf for 2 steps in a row \(at step 2\)"):
        train(config(tmp_path, "nanacc2", 6, "data.num_workers=0", "loss._target_=tests.faults.NaNLoss",
                     "+loss.nan_calls=[3,4,5,6]", "faults.max_nonfinite_steps=2", "trainer.accumulate_grad_batches=2"))

@pytest.mark.parametrize("extra", [
    ("+loss.nan_calls=[1,2]",),  # two steps, both non-finite
    # one step of two batches; the first is non-finite, so the second's gradient must not step alone
    ("+loss.nan_calls=[1]", "trainer.accumulate_grad_batches=2"),
], ids=["steps", "accumulated"])
def test_skipped_steps_leave_the_weights_untouched(tmp_path, extra):
    import lightning as L
    import torch
    from hydra.utils import instantiate

    steps = 1 if "trainer.accumulate_grad_batches=2" in extra else 2
    cfg = config(tmp_path, "nan2", steps, "data.num_workers=0", "loss._target_=tests.faults.NaNLoss", *extra)
    result = train(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)  # as train() does before building
    fresh = instantiate(cfg.model)
    trained = result["module"].net
    for name, value in fresh.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name  # no update, no weight decay


def test_preemption_signal_saves_requeues_and_the_resumed_run_matches(uninterrupted, tmp_path, monkeypatch):
    out, expected = uninterrupted
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    marker = tmp_path / "requeued-{job_id}"
    first = train(config(out, "preempt", 7, "data.num_workers=2", "+callbacks.signal._target_=tests.faults.SignalAt",
                         "+callbacks.signal.step=3", f"callbacks.preemption.requeue_command='touch {marker}'"))
    assert first["trainer"].global_step == 4  # the step in flight finished, then everyone stopped
    assert (tmp_path / "requeued-4242").is_file()  # rank 0 asked SLURM to requeue this job
    assert find_resume_checkpoint(out / "preempt" / "clip" / "checkpoints").name == "step-00000004"
    train(config(out, "preempt", 7, "data.num_workers=2"))  # the requeued job: same command
    assert losses(out, "preempt") == expected


def test_stop_signal_saves_and_stops_without_requeueing(tmp_path, monkeypatch, caplog):
    """SIGTERM (scancel, the time limit, node shutdown): every rank saves the step in flight and
    the run ends; the requeue command is never run, so a cancelled SLURM job stays cancelled.
    A USR1 arriving as well does not turn the stop into a requeue."""
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    marker = tmp_path / "requeued-{job_id}"
    with caplog.at_level("WARNING"):
        first = train(config(tmp_path, "cancel", 7, "data.num_workers=0", "+callbacks.signal._target_=tests.faults.SignalAt",
                             "+callbacks.signal.step=3", "+callbacks.signal.signal_name=SIGTERM",
                             "+callbacks.usr1._target_=tests.faults.SignalAt", "+callbacks.usr1.step=3",
                             f"callbacks.preemption.requeue_command='touch {marker}'"))
    assert first["trainer"].global_step == 4  # the step in flight finished, then it stopped
    assert not (tmp_path / "requeued-4243").exists()
    assert find_resume_checkpoint(tmp_path / "cancel" / "clip" / "checkpoints").name == "step-00000004"
    assert "stop signal received" in caplog.text and "requeued" not in caplog.text


@pytest.mark.parametrize("command, ok, message", [
    ("true", True, "requeued SLURM job 77; it will resume from step 5"),
    ("sh -c 'echo no such job >&2; exit 1'", False, "requeue failed (sh -c 'echo no such job >&2; exit 1'): no such job"),
    # SLURM ends the job step as it accepts the requeue, and scontrol with it.
    ("sh -c 'kill -TERM $$'", True, "requeued SLURM job 77 (SLURM stopped scontrol with signal 15"),
])
def test_requeue_outcome_is_logged_as_it_is(command, ok, message, caplog):
    from ft_train.lit.preemption import Preemption

    with caplog.at_level(logging.WARNING, logger="ft_train.lit.preemption"):
        assert Preemption(requeue_command=command).requeue("77", 5) is ok
    assert message in caplog.text


def test_tensorboard_frame_strip_holds_the_chosen_frames_side_by_side(tmp_path):
    import io

    import numpy as np
    import PIL.Image

    from ft_train.lit.loggers import ResumableTensorBoardLogger

    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(33, 8, 6, 3), dtype=np.uint8)  # every frame different
    logger = ResumableTensorBoardLogger(str(tmp_path))
    logger.log_video_frames("val_samples/000_clip", video, step=7)
    logger.finalize("success")
    [(step, tag, png)] = tensorboard_events(tmp_path / "tensorboard")
    assert (step, tag) == (7, "val_samples/000_clip")
    image = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB"))
    # frames 0, 11, 21, 32 (evenly spaced, rounded), left to right, bit-exact (PNG is lossless)
    np.testing.assert_array_equal(image, np.concatenate([video[i] for i in (0, 11, 21, 32)], axis=1))


def test_progress_bar_counts_optimiser_steps_and_resumes_where_it_stopped(tmp_path):
    from ft_train.lit.callbacks import StepProgressBar

    def bar_task(result):
        bar = next(c for c in result["trainer"].callbacks if isinstance(c, StepProgressBar))
        return bar.progress.tasks[bar.train_progress_bar_id]

    extra = ("data.num_workers=0", "trainer.accumulate_grad_batches=2")
    task = bar_task(train(config(tmp_path, "bar", 3, *extra)))  # 6 batches, 3 steps
    assert (task.description.strip(), task.completed, task.total) == ("steps", 3, 3)
    task = bar_task(train(config(tmp_path, "bar", 5, *extra)))  # resumed at step 3
    assert (task.completed, task.total) == (5, 5)


def test_resume_names_the_settings_changed_since_the_last_start(tmp_path, caplog):
    train(config(tmp_path, "chg", 2, "data.num_workers=0"))
    with caplog.at_level(logging.WARNING, logger="ft_train"):
        train(config(tmp_path, "chg", 3, "data.num_workers=0"))  # only longer: nothing to say
    assert "settings changed" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="ft_train"):
        train(config(tmp_path, "chg", 4, "data.num_workers=0", "optim.optimizer.lr=3e-4", "seed=5"))
    [line] = [r.getMessage() for r in caplog.records if "settings changed" in r.getMessage()]
    assert "step-00000003" in line
    # the two overrides, and data.seed, which follows seed (experiment tiny_cpu has lr 1e-3)
    assert line.count(" → ") == 3
    assert "optim.optimizer.lr: 0.001 → 0.0003" in line and "; seed: 0 → 5" in line and "data.seed: 0 → 5" in line
    assert "seed: 5" in (tmp_path / "chg" / "clip" / "config.yaml").read_text()  # the file says what runs now


def test_without_a_terminal_progress_is_logged_as_lines(tmp_path, caplog):
    # pytest's captured stdout is no terminal, as a SLURM job's log file is not
    import re

    with caplog.at_level(logging.INFO, logger="ft_train.lit.callbacks"):
        train(config(tmp_path, "lines", 5, "data.num_workers=0", "trainer.accumulate_grad_batches=2",
                     "callbacks.progress.text_every_n_steps=2"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" ")[1] for line in lines] == ["2/5", "4/5", "5/5"]  # every 2 steps, and the last
    number = r"[-+]?[\d.]+(?:e[-+]?\d+)?"
    assert re.fullmatch(rf"step 2/5 \(40\.0%\) · train/loss {number} · {number} s/step · 0:\d\d:\d\d left", lines[0]), lines[0]
    assert lines[-1].endswith("s/step")  # nothing left
