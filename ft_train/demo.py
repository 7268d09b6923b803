"""``ft-demo``: the whole pipeline on the shipped sample clip, on CPU, in a few minutes.

Steps (each runs the code of the command it names, and prints that command so a user can run the
same thing on their own data):

1. ``ft-prep``: the sample talking clip → raw shards (face mesh, lip masks, ω_l / ω_b).
2. weights: the user's local folders, or tiny random stand-ins in the real layouts (a tiny Wan
   I2V DiT + VAE + CLIP + umT5 folder and a tiny wav2vec2 folder, written with
   ``save_pretrained`` by :mod:`ft_train.tiny` and loaded back like real weights).
3. ``ft-prep task=encode``: raw shards → latent shards.
4. ``ft-train`` stage 1 (clip-level audio) then stage 2 (frame-level windows, lip-weighted loss,
   started from stage 1), the adapter only, with the validation callback sampling clips and
   scoring FID / FVD / Sync-C / Sync-D at the end of each stage.
5. ``ft-export`` in both forms: the official ``fantasytalking_model.ckpt`` and an adapter bundle
   (with ``lora_rank`` > 0 the stages also train a LoRA on the DiT, ``model.lora.rank``, and it is
   exported as well, ``format=lora``: the ``.safetensors`` diffusers' Wan pipelines load).
6. ``ft-infer``: the bundle + the base weights turn the sample's first frame and speech into an mp4.

It ends with a summary of where everything is and the numbers of each stage. With random
stand-ins the numbers show that every part runs end to end, not quality: the loss falls, the
metrics are finite, the video has the speech's length.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cli import Tool
from .config import CONF_DIR

REPO = CONF_DIR.parent
SAMPLE = REPO / "tests" / "assets" / "sample_talking.mp4"
PROMPT = "a person is talking"


def run_tool(module: str, argv: list[str]) -> int:
    """Run the command-line tool ``module`` (``data_tools.prep`` is what ``ft-prep`` runs) as a
    child of this Python, with this checkout first on its path, and return its exit code. The demo
    runs the data tools as a user would, while the library never imports their package (they
    import it); no installed console script is needed, and the tool is this checkout's own."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.run([sys.executable, "-m", module, *argv], env=env).returncode


@dataclass
class Step:
    """One pipeline step, for the progress lines and the summary."""

    name: str
    command: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)


class Demo:
    """Runs the steps in order, printing progress; ``run()`` returns the summary dict."""

    def __init__(self, cfg: dict[str, Any], console=None):
        from rich.console import Console

        self.cfg = cfg
        self.out = Path(cfg["out"]).expanduser().resolve()
        self.console = console or Console(stderr=False, highlight=False)
        self.steps: list[Step] = []
        self.total_steps = 7
        self.stand_ins: list[str] = []

    # -- helpers --------------------------------------------------------------------------------
    def _step(self, name: str, argv: list[str] | str, fn: Callable[[Step], None]) -> Step:
        command = argv if isinstance(argv, str) else " ".join(a if a == "&&" else shlex.quote(a) for a in argv)
        step = Step(name, command)
        n = len(self.steps) + 1
        self.console.rule(f"[bold]{n}/{self.total_steps} {name}")
        self.console.print(f"[dim]$ {step.command}[/dim]")
        start = time.perf_counter()
        fn(step)
        step.seconds = time.perf_counter() - start
        self.steps.append(step)
        self.console.print(f"[green]done[/green] in {step.seconds:.0f} s")
        return step

    # -- 1: data tools --------------------------------------------------------------------------
    def prep(self) -> Path:
        videos = self.cfg["videos"]
        if videos is None:
            videos = self.out / "videos"
            videos.mkdir(parents=True, exist_ok=True)
            target = videos / SAMPLE.name
            if not target.exists():
                target.write_bytes(SAMPLE.read_bytes())
                (videos / (SAMPLE.stem + ".txt")).write_text(PROMPT)  # the clip's caption
        raw = self.out / "raw"
        argv = [f"input={videos}", f"output={raw}", f"fps={self.cfg['fps']}", f"num_frames={self.cfg['num_frames']}",
                f"stride={self.cfg['num_frames']}", f"max_side={self.cfg['side']}",
                # a small demo frame: allow small faces (the defaults are set for 512 px data)
                "min_face_px=16", f"progress={str(self.cfg['progress']).lower()}"]

        def run(step: Step) -> None:
            if run_tool("data_tools.prep", argv) != 0:
                raise SystemExit("ft-demo: ft-prep failed (see above)")
            report = json.loads((raw / "report.json").read_text())
            step.outputs.update(raw_shards=str(raw), previews=str(raw / "previews"))
            step.numbers["clips"] = float(report.get("samples", 0))
            if not report.get("samples"):
                raise SystemExit(f"ft-demo: ft-prep kept no clip of {videos}; see {raw / 'report.txt'}")

        self._step("data tools: videos → raw shards", ["ft-prep", *argv], run)
        return raw

    # -- 2: weights -----------------------------------------------------------------------------
    def weights(self) -> dict[str, Path | None]:
        w = dict(self.cfg["weights"])
        folder = self.out / "weights"
        made: list[str] = []

        def run(step: Step) -> None:
            from .tiny import write_random_state, write_tiny_base

            if w["wan"] is None or w["wav2vec"] is None:
                wan, wav2vec = folder / "wan", folder / "wav2vec"
                if not (wan / "transformer" / "config.json").exists() or not (wav2vec / "config.json").exists():
                    write_tiny_base(wan, wav2vec)
                w["wan"], w["wav2vec"] = w["wan"] or wan, w["wav2vec"] or wav2vec
                made.append("Wan I2V (DiT, VAE, CLIP, umT5) and wav2vec2")
            if w["fid"] is None:
                w["fid"] = folder / "fid_inception_random.pth"
                if not w["fid"].exists():
                    write_random_state(w["fid"], "fid")
                made.append("FID Inception")
            if w["sync"] is None:
                w["sync"] = folder / "syncnet_random.model"
                if not w["sync"].exists():
                    write_random_state(w["sync"], "sync")
                made.append("SyncNet")
            for key, path in w.items():
                if path is not None:
                    step.outputs[key] = str(path)
            self.stand_ins = made
            if made:
                self.console.print("[yellow]random stand-ins[/yellow] (numbers show plumbing, not quality): " + ", ".join(made))

        self._step("weights", "(no command: the weights.* paths, or tiny random stand-ins)", run)
        return {k: (Path(v) if v is not None else None) for k, v in w.items()}

    # -- 3: latent cache --------------------------------------------------------------------------
    def encode(self, raw: Path, weights: dict[str, Path | None]) -> Path:
        latent = self.out / "latent"
        argv = ["task=encode", f"input={raw}", f"output={latent}", f"encoders.wan={weights['wan']}",
                f"encoders.wav2vec={weights['wav2vec']}", "batch_size=2",
                f"progress={str(self.cfg['progress']).lower()}"]

        def run(step: Step) -> None:
            if run_tool("data_tools.prep", argv) != 0:
                raise SystemExit("ft-demo: the encode pass failed (see above)")
            report = json.loads((latent / "report.json").read_text())
            step.outputs["latent_shards"] = str(latent)
            step.numbers["clips"] = float(report.get("samples", report.get("written", 0)))

        self._step("encode: raw shards → latent shards", ["ft-prep", *argv], run)
        return latent

    # -- 4: training ------------------------------------------------------------------------------
    def train_overrides(self, latent: Path, raw: Path, weights: dict[str, Path | None]) -> list[str]:
        runs = self.out / "runs"
        val = [
            "+callbacks@callbacks.validation=validation",
            f"callbacks.validation.shards={latent}",
            f"callbacks.validation.raw_shards={raw}",
            f"callbacks.validation.num_samples={self.cfg['val_clips']}",
            "callbacks.validation.every_n_steps=1000000",  # once, at the end of each stage
            f"callbacks.validation.sampler.steps={self.cfg['sample_steps']}",
            f"callbacks.validation.vae={weights['wan']}",
            "callbacks.validation.fid_frames=8",
        ]
        for key in ("fid", "fvd", "sync"):
            if weights.get(key) is not None:
                val.append(f"callbacks.validation.{key}={weights[key]}")
        if self.cfg["weights"]["wan"] is None:
            # A tiny random DiT generates no face for the detector to track: Sync on whole frames.
            val.append("callbacks.validation.sync_crop=none")
        else:  # the reference's track rules want 4 s and 100 px faces; the demo's clips are shorter and smaller
            val += [f"callbacks.validation.sync_track.min_track={self.cfg['num_frames'] // 2}",
                    f"callbacks.validation.sync_track.min_face_size={self.cfg['side'] // 8}"]
        return [
            f"experiment={self.cfg['experiment']}", f"model.pretrained={weights['wan']}",
            "model.train_backbone=false",  # the adapter trains on frozen base weights, as in the paper
            "data=latent", f"data.shards={latent}", "data.num_workers=0", "data.shuffle_buffer=8",
            f"paths.output_dir={runs}", "run_id=demo", "callbacks.checkpoint.every_n_steps=1000000",
            *val, *([f"model.lora.rank={self.cfg['lora_rank']}"] if self.cfg.get("lora_rank") else []),
            *self.cfg["train_overrides"],
        ]

    def train(self, latent: Path, raw: Path, weights: dict[str, Path | None]) -> str:
        from hydra import compose, initialize_config_dir

        from .train import run as run_stages

        common = self.train_overrides(latent, raw, weights)
        checkpoint: str | None = None
        for stage, steps in (("clip", self.cfg["clip_steps"]), ("frame", self.cfg["frame_steps"])):
            argv = [*common, f"stage={stage}", f"stage.max_steps={steps}"]
            if checkpoint is not None:
                argv.append(f"stage.init_from={checkpoint}")

            def run(step: Step, argv=argv, stage=stage) -> None:
                nonlocal checkpoint
                # What `ft-train ARGV` runs: compose, then run (which honours stage= over stages=).
                with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                    cfg = compose("train", overrides=argv)
                [result] = run_stages(cfg, argv)
                checkpoint = result["checkpoint"]
                stage_dir = Path(result["stage_dir"])
                step.outputs.update(
                    checkpoint=result["checkpoint_dir"], metrics=str(stage_dir / "metrics.csv"),
                    loss_curve=str(stage_dir / "loss_curve.png"), samples=str(stage_dir / "samples"),
                )
                first, last = loss_ends(stage_dir / "metrics.csv")
                if first is not None:
                    step.numbers.update({"loss first": first, "loss last": last})
                for name, value in sorted(result["metrics"].items()):
                    if name.startswith("val/"):
                        step.numbers[name] = value

            title = "stage 1: clip-level audio" if stage == "clip" else "stage 2: frame-level audio + lip loss"
            self._step(title, ["ft-train", *argv], run)
        assert checkpoint is not None
        return checkpoint

    # -- 5: export ----------------------------------------------------------------------------------
    def export(self, checkpoint: str) -> dict[str, Path]:
        from .export import main as export_main

        exports = self.out / "export"
        exports.mkdir(parents=True, exist_ok=True)
        official, bundle = exports / "fantasytalking_model.ckpt", exports / "bundle"
        step_dir = str(Path(checkpoint).parent)
        argv_official = [f"ckpt={step_dir}", f"out={official}", "overwrite=true"]
        argv_bundle = [f"ckpt={step_dir}", f"out={bundle}", "format=bundle", "overwrite=true"]

        lora = exports / "lora.safetensors"
        argv_lora = [f"ckpt={step_dir}", f"out={lora}", "format=lora", "overwrite=true"]
        exports_argv = [argv_official, argv_bundle, *([argv_lora] if self.cfg.get("lora_rank") else [])]

        def run(step: Step) -> None:
            for argv in exports_argv:
                if export_main(argv) != 0:
                    raise SystemExit("ft-demo: ft-export failed (see above)")
            step.outputs.update(official=str(official), bundle=str(bundle))
            if len(exports_argv) > 2:
                step.outputs["lora"] = str(lora)

        command = [part for argv in exports_argv for part in ("&&", "ft-export", *argv)][1:]
        self._step("export: official checkpoint + adapter bundle" + (" + LoRA" if len(exports_argv) > 2 else ""),
                   command, run)
        return {"official": official, "bundle": bundle}

    # -- 6: inference ---------------------------------------------------------------------------------
    def infer(self, bundle: Path, weights: dict[str, Path | None]) -> Path:
        from .infer import main as infer_main

        inputs = self.out / "infer"
        inputs.mkdir(parents=True, exist_ok=True)
        image, speech = write_inference_inputs(SAMPLE, inputs, float(self.cfg["infer_seconds"]))
        video = self.out / "sample.mp4"
        argv = [f"image={image}", f"audio={speech}", f"prompt={PROMPT}", f"wan={weights['wan']}",
                f"wav2vec={weights['wav2vec']}", f"adapters={bundle}", f"out={video}",
                f"max_side={self.cfg['side']}", f"fps={self.cfg['fps']}", f"sampler.steps={self.cfg['sample_steps']}",
                "device=cpu"]

        def run(step: Step) -> None:
            if infer_main(argv) != 0:
                raise SystemExit("ft-demo: ft-infer failed (see above)")
            step.outputs["video"] = str(video)

        self._step("inference: photo + speech → talking video", ["ft-infer", *argv], run)
        return video

    # -- all ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        raw = self.prep()
        weights = self.weights()
        latent = self.encode(raw, weights)
        checkpoint = self.train(latent, raw, weights)
        exported = self.export(checkpoint)
        video = self.infer(exported["bundle"], weights)
        summary = {
            "out": str(self.out),
            "seconds": time.perf_counter() - start,
            "video": str(video),
            "steps": [{"name": s.name, "command": s.command, "seconds": s.seconds, "outputs": s.outputs,
                       "numbers": s.numbers} for s in self.steps],
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.print_summary(summary)
        if not self.cfg.get("lora_rank"):
            self.console.print("LoRA on the DiT: [bold]ft-demo lora_rank=8[/bold] trains one with the adapter in both "
                               "stages and exports it for diffusers (ft-export format=lora); see docs/training.md (LoRA on the DiT)")
        return summary

    def print_summary(self, summary: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title=f"ft-demo finished in {summary['seconds']:.0f} s — everything is in {summary['out']}",
                      show_lines=True)
        table.add_column("step", overflow="fold")
        table.add_column("written (under the demo folder)", overflow="fold")
        table.add_column("numbers", overflow="fold")
        for s in summary["steps"]:
            written = "\n".join(f"{k}: {_short_path(v, self.out)}" for k, v in s["outputs"].items())
            numbers = "\n".join(f"{k}: {v:.4g}" for k, v in s["numbers"].items())
            table.add_row(s["name"], written, numbers)
        if self.stand_ins:
            table.caption = "random stand-in weights (" + ", ".join(self.stand_ins) + "): the numbers show that every part runs, not quality"
        self.console.print(table)
        self.console.print(f"[bold]Sample video:[/bold] {summary['video']}   (summary: {self.out / 'summary.json'})")


def _short_path(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def loss_ends(metrics_csv: Path) -> tuple[float | None, float | None]:
    """First and last logged ``train/loss`` of a stage's metrics.csv."""
    import csv
    import math

    values = []
    if metrics_csv.exists():
        with open(metrics_csv, newline="") as fh:
            for row in csv.DictReader(fh):
                v = row.get("train/loss")
                if v not in (None, "") and math.isfinite(float(v)):
                    values.append(float(v))
    return (values[0], values[-1]) if values else (None, None)


def write_inference_inputs(video: Path, folder: Path, seconds: float) -> tuple[Path, Path]:
    """The sample's first frame (png) and the first ``seconds`` of its speech (16 kHz wav)."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from .media import AUDIO_RATE, read_video

    frames, _, audio = read_video(video)
    image, speech = folder / "reference.png", folder / "speech.wav"
    Image.fromarray(frames[0]).save(image)
    if audio is None:
        raise SystemExit(f"ft-demo: {video} has no audio track")
    sf.write(speech, np.asarray(audio[: int(seconds * AUDIO_RATE)], dtype=np.float32), AUDIO_RATE)
    return image, speech


def _checked(cfg: dict[str, Any]) -> dict[str, Any]:
    if int(cfg["num_frames"]) % 4 != 1:
        raise ValueError(f"num_frames must be 4k+1 (got {cfg['num_frames']})")
    if int(cfg["side"]) % 16:
        raise ValueError(f"side must be a multiple of 16 (got {cfg['side']})")
    # One line per message: the tools' own basicConfig calls are no-ops once the root logger has a
    # handler, and Lightning prints through its own handler only.
    logging.getLogger("lightning.pytorch").propagate = False
    return cfg


TOOL = Tool("ft-demo", "demo", __doc__, "ft-demo out=outputs/demo", build=_checked,
            run=lambda cfg: Demo(cfg).run(), log_format="%(message)s", errors=(ValueError,))
main = TOOL.main  # console entry point: ``ft-demo key=value ...`` (keys of ``conf/demo.yaml``)


if __name__ == "__main__":
    raise SystemExit(main())
