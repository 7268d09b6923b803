"""Every command the README shows runs here, as written, in the README's order.

The only substitutions are those a CPU needs: tiny random weights and a tiny talking clip for the
real paths (in the real folder layouts), 2 training steps, and the test clip's 160 pixels as the
size raw mode trains at and ft-infer samples at (both would scale it to 512). Each command keeps its own settings — the experiments' trainer, precision (bf16-mixed),
strategy and loader workers — and runs through its console entry point in this process, in one
working folder, so later commands read what earlier ones wrote (stage 2 starts from stage 1's
checkpoint, ft-export reads stage 2's, ft-infer the export). `sbatch slurm/train.sh ARGS` runs the
`ft-train ARGS` its tasks run (with the run folder SLURM would name). A README command that is
neither run here nor named in ``ELSEWHERE`` fails the suite.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .test_config_reference import readme_commands

pytestmark = pytest.mark.slow

COMMANDS = readme_commands()
# Commands run by other parts of CI, with where.
ELSEWHERE = {
    "python3": ".ci/run (the README's install command)",
    ".": ".ci/run (the README's install command)",
    "pip": ".ci/run (the README's install command)",
    "pytest": ".ci/run (the README's test command)",
    "ft-demo": "tests/test_demo.py (ft-demo, which runs the commands it prints)",
}
# Commands no test runs yet, with why (each one is a gap to close, listed rather than hidden).
NOT_RUN = {
    "bash": "slurm/prep.sh submits an array of 32 tasks of 16 CPUs each; the CI cluster has one 2-CPU node",
}
# Real paths in the README → what stands in for them (keys of World.paths).
STAND_INS = {
    "/weights/Wan2.1-I2V-14B-720P-Diffusers": "wan",
    "/weights/wav2vec2-base-960h": "wav2vec",
    "/weights/pt_inception-2015-12-05-6726825d.pth": "fid",
    "/weights/i3d_torchscript.pt": "fvd",
    "/weights/syncnet_v2.model": "sync",
    "/data/hdtf/videos": "videos",
    "/data/hdtf/raw": "raw",
    "/data/hdtf/latents": "latents",
    # The test set: one short clip (validation samples and scores every test clip at its length).
    "/data/hdtf_test/videos": "test_videos",
    "/data/hdtf_test/raw": "test_raw",
    "/data/hdtf_test/latents": "test_latents",
}
STEPS = 2
SIDE = 160  # the test clip's size; raw mode trains at it instead of 512


def make_clip(src: Path, dst: Path, seconds: float | None = None, start: float = 0.0) -> None:
    """The shipped talking clip (4 s) cut around the face to SIDE pixels (the face stays wider than
    ft-prep's default min_face_px), ``seconds`` of it from ``start``, with its speech as AAC."""
    import imageio_ffmpeg

    cut = ["-ss", str(start), "-t", str(seconds)] if seconds else []
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(src), *cut,
                    "-vf", f"crop=192:192:129:28,scale={SIDE}:{SIDE}", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-c:a", "aac", str(dst)], check=True)


class World:
    """The working folder, the stand-in weights and data, and what each command left behind."""

    def __init__(self, root: Path):
        from data_tools.prep import main as prep

        from ft_train.demo import write_inference_inputs
        from ft_train.tiny import write_random_state, write_tiny_base

        from .test_metrics_fvd import StandInI3D

        self.root, self.work = root, root / "work"
        weights, data = root / "weights", root / "data"
        self.paths = {"wan": weights / "wan", "wav2vec": weights / "wav2vec", "fid": weights / "inception.pth",
                      "fvd": weights / "i3d_torchscript.pt", "sync": weights / "syncnet.model",
                      "videos": data / "videos", "raw": data / "raw", "latents": data / "latents",
                      "test_videos": data / "test" / "videos", "test_raw": data / "test" / "raw",
                      "test_latents": data / "test" / "latents"}
        write_tiny_base(self.paths["wan"], self.paths["wav2vec"])
        write_random_state(self.paths["fid"], "fid")
        write_random_state(self.paths["sync"], "sync")
        import torch

        torch.jit.script(StandInI3D()).save(str(self.paths["fvd"]))
        self.paths["videos"].mkdir(parents=True)
        make_clip(REPO / "tests" / "assets" / "sample_talking.mp4", self.paths["videos"] / "talk.mp4")
        (self.paths["videos"] / "talk.txt").write_text("a person is talking")
        # The test set: two 0.8 s pieces of the clip, one 17-frame clip each (FVD needs 16 frames and
        # two videos), prepared as the README prepares data.
        self.paths["test_videos"].mkdir(parents=True)
        for name, start in (("talk_a.mp4", 0.0), ("talk_b.mp4", 1.6)):
            make_clip(REPO / "tests" / "assets" / "sample_talking.mp4", self.paths["test_videos"] / name, 0.8, start)
        assert prep([f"input={self.paths['test_videos']}", f"output={self.paths['test_raw']}", "fps=25",
                     "num_frames=17", "progress=false"]) == 0
        assert prep(["task=encode", f"input={self.paths['test_raw']}", f"output={self.paths['test_latents']}",
                     f"encoders.wan={self.paths['wan']}", f"encoders.wav2vec={self.paths['wav2vec']}",
                     "progress=false"]) == 0
        self.work.mkdir()
        # ft-infer's inputs, named as in the README: the clip's first frame and 1 s of its speech ...
        image, speech = write_inference_inputs(self.paths["videos"] / "talk.mp4", root, 1.0)
        shutil.copy(image, self.work / "portrait.png")
        shutil.copy(speech, self.work / "speech.wav")
        # ... and 4 s of it for the long-speech command (101 frames at 25 fps: two 81-frame segments).
        (root / "long").mkdir()
        shutil.copy(write_inference_inputs(self.paths["videos"] / "talk.mp4", root / "long", 4.0)[1],
                    self.work / "long_speech.wav")
        # ft-eval's `generated=results/ours`: the user's generated videos, named like their references.
        (self.work / "results" / "ours").mkdir(parents=True)
        for video in self.paths["test_videos"].glob("*.mp4"):
            shutil.copy(video, self.work / "results" / "ours" / video.name)
        self.jobs = iter(range(12345, 12400))

    def substitute(self, arg: str) -> str:
        for real, key in STAND_INS.items():
            arg = arg.replace(real, str(self.paths[key]))
        # A README step number (step-00080000) → the newest step the 2-step run wrote there.
        m = re.match(r"^(.*=)?(.*/checkpoints)/step-\d{8}$", arg)
        if m and not (self.work / m.group(2)).is_dir():
            pytest.fail(f"{arg}: no earlier README command wrote {m.group(2)}")
        if m:
            newest = sorted((self.work / m.group(2)).glob("step-*"))[-1].name
            arg = f"{m.group(1) or ''}{m.group(2)}/{newest}"
        return arg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("readme"))


def _id(argv: list[str]) -> str:
    return " ".join(argv)[:90]


def test_every_readme_command_is_run_somewhere():
    for argv in COMMANDS:
        tool = argv[0]
        assert tool in ELSEWHERE or tool in RUNNERS or tool in NOT_RUN, (
            f"README command `{' '.join(argv)}` is run by no test: add it to tests/test_readme_commands.py")
    for where in ELSEWHERE.values():
        path = where.split(" ", 1)[0]
        file, _, name = path.partition("::")
        assert (REPO / file).exists(), where
        if name:
            assert f"def {name}(" in (REPO / file).read_text(), where


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[_id(c) for c in COMMANDS])
def test_readme_command_runs(index, world, monkeypatch, capsys):
    argv = COMMANDS[index]
    if argv[0] in ELSEWHERE:
        pytest.skip(f"run by {ELSEWHERE[argv[0]]}")
    if argv[0] in NOT_RUN:
        pytest.skip(f"not run: {NOT_RUN[argv[0]]}")
    monkeypatch.chdir(world.work)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # a failure shows its traceback here
    args = [world.substitute(a) for a in argv[1:]]
    RUNNERS[argv[0]](world, args, monkeypatch, capsys)


# -- the runners: run the command's entry point, then check what it claims to have written --------

def run_mkdir(world, args, monkeypatch, capsys):
    subprocess.run(["mkdir", *args], check=True)
    assert all(Path(a).is_dir() for a in args if not a.startswith("-"))


def run_ft_prep(world, args, monkeypatch, capsys):
    from data_tools.prep import main

    assert main(args) == 0
    out = Path(dict(a.split("=", 1) for a in args)["output"])
    report = json.loads((out / "report.json").read_text())
    assert report.get("samples", report.get("written", 0)) >= 1, report


def run_ft_train(world, args, monkeypatch, capsys, job: int | None = None):
    from ft_train.train import main

    extra = [f"stage.max_steps={STEPS}"]
    if "data=raw" in args:
        extra += [f"data.height={SIDE}", f"data.width={SIDE}"]
    before = {p for p in world.work.rglob("step-*")}
    monkeypatch.setattr(sys, "argv", ["ft-train", *args, *extra])
    environ = dict(os.environ)
    try:
        main()
    finally:
        # A run in this process sets MASTER_PORT (and the ranks' variables), and under DeepSpeed
        # its process group keeps listening on that port for the rest of the session (DeepSpeed
        # holds on to the group): later multi-process tests that inherited the variable failed
        # to bind it. Leave the environment as the command found it.
        os.environ.clear()
        os.environ.update(environ)
    printed = capsys.readouterr().out
    finals = re.findall(r"\[ft-train\] (\S+): final checkpoint (\S+), last train/loss (\S+)", printed)
    assert finals, printed[-2000:]
    for stage_dir, checkpoint, loss in finals:
        assert Path(checkpoint).exists() and Path(checkpoint).parent not in before, (
            f"{checkpoint} was there before this command: it resumed an earlier command's run")
        assert Path(checkpoint).parent.name == f"step-{STEPS:08d}"
        assert math.isfinite(float(loss))
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(Path(stage_dir) / "config.yaml")
        experiment = next((a.split("=", 1)[1] for a in args if a.startswith("experiment=")), None)
        if experiment in ("stage1_14b", "stage2_14b"):  # the paper recipe at its own precision
            assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0
            assert cfg.optim.optimizer.fused is True


def run_sbatch(world, args, monkeypatch, capsys):
    """`sbatch [options] slurm/train.sh ARGS`: what each of its tasks runs, `srun ft-train ARGS` with
    the run folder the script names (job name ft-train, a fresh job id) and one task."""
    script = next(i for i, a in enumerate(args) if a.endswith(".sh"))
    assert args[script] == "slurm/train.sh", args
    text = (REPO / "slurm" / "train.sh").read_text()
    assert '"$FT_TRAIN"' in text and '"$@"' in text  # the script passes its arguments to ft-train
    monkeypatch.setenv("FT_RUN_ID", f"ft-train-{next(world.jobs)}")
    run_ft_train(world, ["trainer.num_nodes=1", "trainer.devices=1", *args[script + 1:]], monkeypatch, capsys)


def run_ft_export(world, args, monkeypatch, capsys):
    from ft_train.export import main

    assert main(args) == 0
    keys = dict(a.split("=", 1) for a in args)
    out = Path(keys["out"])
    assert out.exists()
    for path in [out] if out.is_file() else sorted(out.iterdir()):
        assert path.stat().st_size > 0
    if keys.get("format") == "bundle":  # the training clips' frame rate, from the shards' stats.json
        assert json.loads((out / "adapter.json").read_text())["spec"]["fps"] == 25


def run_ft_infer(world, args, monkeypatch, capsys):
    import soundfile

    from ft_train.infer import main
    from ft_train.media import read_video

    assert main([*args, f"max_side={SIDE}"]) == 0
    keys = dict(a.split("=", 1) for a in args)
    frames, fps, audio = read_video(keys["out"])
    speech = soundfile.info(keys["audio"]).duration  # 1 s, or 4 s for the long-speech command
    assert frames.shape[0] % 4 == 1 and frames.shape[0] / fps >= speech - 0.01 and audio is not None
    assert abs(len(audio) / 16000 - speech) < 0.1  # the whole speech
    # A bundle samples at its training clips' rate (ft-prep's fps=25); the released format records
    # none, so the release's 23 fps.
    assert fps == pytest.approx(25.0 if Path(keys["adapters"]).is_dir() else 23.0)


def run_ft_eval(world, args, monkeypatch, capsys):
    from ft_train.eval import main

    # The test set's clips are 0.8 s at 160 px: shorter and smaller than the reference's face-track
    # rules allow (100 frames, 100 px faces), which would leave Sync with no track to score.
    assert main([*args, "sync_track.min_track=10", "sync_track.min_face_size=40"]) == 0
    generated = Path(dict(a.split("=", 1) for a in args)["generated"])
    result = json.loads((generated / "metrics.json").read_text())
    for key in ("fid", "fvd", "sync_c", "sync_d"):
        assert math.isfinite(result["metrics"][key]), result


RUNNERS = {"mkdir": run_mkdir, "ft-prep": run_ft_prep, "ft-train": run_ft_train, "sbatch": run_sbatch,
           "ft-export": run_ft_export, "ft-infer": run_ft_infer, "ft-eval": run_ft_eval}
