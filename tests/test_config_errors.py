"""Configuration mistakes end `ft-train` at once with one line naming the key, its value and what
is allowed: before torch, Lightning or DeepSpeed start, without a traceback (unless
HYDRA_FULL_ERROR=1). Each case runs the real command line in a subprocess."""

import os
import re
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_dir

from ft_train.config import ConfigError, check_added_keys

from .conftest import CONF, REPO

TIMES: dict[str, float] = {}


def ft_train(tmp_path, *args, full_error=False):
    """Run ``python -m ft_train.train *args`` (this checkout) in ``tmp_path``; the process and its seconds."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = str(REPO)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ft_train.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start


CASES = {
    "max_steps_not_a_number": (["stage.max_steps=abc"], "stage.max_steps=abc: must be an integer >= 1"),
    "negative_lr": (["optim.optimizer.lr=-1"], "optim.optimizer.lr=-1: must be a number > 0"),
    "negative_workers": (["data.num_workers=-1"], "data.num_workers=-1: must be an integer >= 0"),
    "no_accumulation": (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0: must be an integer >= 1"),
    "negative_checkpoint_period": (["callbacks.checkpoint.every_n_steps=-5"],
                                   "callbacks.checkpoint.every_n_steps=-5: must be an integer >= 0"),
    "zero_nonfinite_steps": (["faults.max_nonfinite_steps=0"], "faults.max_nonfinite_steps=0: must be an integer >= 1"),
    "added_key_nothing_reads": (["+stage.max_step=5"],
                                "+stage.max_step=5: no such setting, nothing would read it; did you mean stage.max_steps?"),
    "ema_under_zero3": (["strategy=deepspeed_zero3", "callbacks.ema.decay=0.999"],
                        "callbacks.ema.decay=0.999 with a ZeRO-3 strategy (strategy.stage=3)"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_value_fails_at_once_naming_the_key(tmp_path, name):
    overrides, message = CASES[name]
    proc, seconds = ft_train(tmp_path, "experiment=tiny_cpu", f"paths.output_dir={tmp_path / 'out'}", *overrides)
    TIMES[name] = seconds
    assert proc.returncode != 0
    assert proc.stderr.startswith(f"ft-train: {message}"), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) <= 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "tiny_cpu" / "clip").exists()  # no stage was started


def test_unwritable_output_dir_is_named(tmp_path):
    (tmp_path / "a_file").write_text("in the way")  # unwritable for root too: a file where a folder must go
    proc, TIMES["unwritable_output_dir"] = ft_train(tmp_path, "experiment=tiny_cpu", f"paths.output_dir={tmp_path / 'a_file' / 'runs'}")
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"ft-train: paths.output_dir={tmp_path / 'a_file' / 'runs'}: cannot create the run folder "
                                   f"{tmp_path / 'a_file' / 'runs' / 'tiny_cpu'} (Not a directory); give a folder you can "
                                   "write to (paths.output_dir=... or FT_OUTPUT_DIR)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir_is_named(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    proc, _ = ft_train(tmp_path, "experiment=tiny_cpu", f"paths.output_dir={tmp_path / 'ro'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"paths.output_dir={tmp_path / 'ro'}: cannot create the run folder" in proc.stderr


def test_required_weights_folder_is_asked_for(tmp_path):
    proc, TIMES["stage2_14b_without_pretrained"] = ft_train(tmp_path, "experiment=stage2_14b", "data.shards=/data/shards",
                                                            f"paths.output_dir={tmp_path / 'out'}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("ft-train: model.pretrained is not set (???) in experiment stage2_14b: add "
                                   "model.pretrained=... (a local Wan2.1-I2V diffusers folder with transformer/, vae/, "
                                   "text_encoder/ and image_encoder/)")


def test_full_error_shows_the_traceback(tmp_path):
    proc, _ = ft_train(tmp_path, "experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "optim.optimizer.lr=-1",
                       full_error=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError: optim.optimizer.lr=-1: must be a number > 0" in proc.stderr


def test_hydra_override_error_is_short(tmp_path):
    proc, _ = ft_train(tmp_path, "experiment=tiny_cpu", f"paths.output_dir={tmp_path}", "stage.max_step=5")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not override 'stage.max_step'" in proc.stderr and "+stage.max_step=5" in proc.stderr


def compose_train(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("added", [
    ["+loss.nan_calls=[2]", "loss._target_=tests.faults.NaNLoss"],  # an argument the new target takes
    ["+callbacks.signal._target_=tests.faults.SignalAt", "+callbacks.signal.step=3"],  # a new object and its argument
    ["+logger.tb={_target_:ft_train.lit.loggers.ResumableTensorBoardLogger,save_dir:/tmp}"],  # docs/training.md's form
    ["+optim.optimizer.amsgrad=true"],  # AdamW takes it
    ["+model.audio_mode=frame"],  # one of the keys build_model passes on to the network
])
def test_added_keys_that_something_reads_are_accepted(added):
    check_added_keys(compose_train(["experiment=tiny_cpu", *added]), added)


@pytest.mark.parametrize("added, message", [
    (["+optim.optimizer.betaz=[0.9,0.99]"], "+optim.optimizer.betaz=[0.9,0.99]: torch.optim.AdamW takes no argument 'betaz'"),
    (["+callbacks.signal._target_=tests.faults.SignalAt", "+callbacks.signal.stepp=3"],
     "+callbacks.signal.stepp=3: tests.faults.SignalAt takes no argument 'stepp' (did you mean step?)"),
    (["+trainer.precison=bf16-mixed"], "+trainer.precison=bf16-mixed: lightning.Trainer takes no argument 'precison' "
     "(did you mean precision?)"),
    # the synthetic data module passes **kwargs on to the latent one, whose arguments are known
    (["+data.batchsize=2"], "+data.batchsize=2: ft_train.data.SyntheticLatentDataModule takes no argument 'batchsize' "
     "(did you mean batch_size?)"),
    (["+faults.max_nonfinite=3"], "+faults.max_nonfinite=3: no such setting, nothing would read it; did you mean "
     "faults.max_nonfinite_steps?"),
    (["+paths.tmp=/x"], "+paths.tmp=/x: no such setting, nothing would read it; paths has output_dir, run_dir, stage_dir"),
    # build_model passes **options on; it lists the keys it reads (its own, the speed options, the network's)
    (["+model.gradient_checkpointng=true"], "+model.gradient_checkpointng=true: ft_train.models.build_model takes no "
     "argument 'gradient_checkpointng' (did you mean gradient_checkpointing?)"),
])
def test_added_keys_that_nothing_reads_are_refused(added, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        check_added_keys(compose_train(["experiment=tiny_cpu", *added]), added)


def test_report_times(capsys):
    # Not asserted (speed goals live in bench/): shown with `pytest -s` and recorded in docs/training.md.
    with capsys.disabled():
        for name, seconds in TIMES.items():
            print(f"\n  ft-train config error {name}: {seconds:.1f} s", end="")


def test_output_dir_is_checked_in_process_too(tmp_path):
    # train(cfg) without the command line (tests, notebooks): the same check, nothing created
    from ft_train.train import validate_config

    (tmp_path / "a_file").write_text("in the way")
    cfg = compose_train(["experiment=tiny_cpu", f"paths.output_dir={tmp_path / 'a_file' / 'runs'}"])
    with pytest.raises(ConfigError, match=re.escape(f"paths.output_dir={tmp_path / 'a_file' / 'runs'}: cannot write the "
                                                    f"stage folder {tmp_path / 'a_file' / 'runs' / 'tiny_cpu' / 'clip'} "
                                                    f"({tmp_path / 'a_file'} is a file, not a folder)")):
        validate_config(cfg)
