"""ft-demo end to end: every artifact it announces exists and is what it claims to be."""

import csv
import json
import math
from pathlib import Path

import pytest

from ft_train.demo import main
from ft_train.media import read_video

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_pipeline_and_writes_what_it_announces(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main([f"out={out}", "side=96", "clip_steps=12", "frame_steps=12", "sample_steps=2",
                 "infer_seconds=1.0", "progress=false", "lora_rank=4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = [s["name"] for s in summary["steps"]]
    assert len(names) == 7 and names[0].startswith("data tools") and names[-1].startswith("inference")

    for step in summary["steps"]:
        for key, path in step["outputs"].items():
            assert Path(path).exists(), (step["name"], key, path)
        for key, value in step["numbers"].items():
            assert math.isfinite(value), (step["name"], key, value)
        assert step["command"].split()[0] in ("ft-prep", "ft-train", "ft-export", "ft-infer", "(no")

    stages = {s["name"]: s for s in summary["steps"]}
    prep = next(s for n, s in stages.items() if n.startswith("data tools"))
    assert prep["numbers"]["clips"] == 5  # 100 frames of 25 fps sample → 5 clips of 17 frames
    for name, stage in stages.items():
        if name.startswith("stage"):
            assert {"val/fid", "val/sync_c", "val/sync_d"} <= set(stage["numbers"]), stage["numbers"]
            with open(stage["outputs"]["metrics"], newline="") as fh:
                assert any(r.get("train/loss") for r in csv.DictReader(fh))
            assert list(Path(stage["outputs"]["samples"]).rglob("*.mp4"))
    exported = next(s for n, s in stages.items() if n.startswith("export"))["outputs"]
    assert Path(exported["official"]).stat().st_size > 0 and (Path(exported["bundle"]) / "adapter.json").exists()
    from ft_train.models.lora import read_lora_file  # lora_rank=4: a LoRA trained in both stages, in diffusers' form

    lora = read_lora_file(exported["lora"], "lora")
    assert lora.rank == 4 and any(v.abs().sum() > 0 for k, v in lora.tensors.items() if ".lora_B." in k)
    assert json.loads((Path(exported["bundle"]) / "adapter.json").read_text())["spec"]["lora"]["rank"] == 4

    frames, fps, audio = read_video(summary["video"])
    assert fps == pytest.approx(25.0)
    assert frames.shape[0] % 4 == 1 and abs(frames.shape[0] / fps - 1.0) <= 1 / fps + 0.16  # 4k+1 frames for 1 s
    assert audio is not None and len(audio) / 16000 == pytest.approx(1.0, abs=0.1)
    printed = capsys.readouterr().out
    assert summary["video"] in printed.replace("\n", "")
