"""Made tests/assets/golden/sync_syncnet_python.json (and sync_input.mp4) once, from syncnet_python's own code.

Run: python tests/assets/golden/make_sync_golden.py SYNCNET_PYTHON_CHECKOUT (a checkout of
joonson/syncnet_python, with python_speech_features 0.6 importable; not needed by the tests).
It writes the fixed input (224×224 frames, so whole frames are the face crops; 25 fps; 48 kHz
stereo AAC whose channels differ) if it is missing, loads the test's seeded SyncNet weights into
the reference's ``S`` via ``SyncNetInstance.loadParameters``, and runs
``SyncNetInstance.evaluate`` (its own ffmpeg calls: JPEG frames, ``-async 1 -ac 1 -ar 16000``
wav) on CPU (its ``.cuda()`` calls made no-ops), with ``vshift=15, batch_size=20`` as
``run_syncnet.py``.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from ft_train.metrics.audio import ffmpeg_exe  # noqa: E402
from tests.test_metrics_golden import SYNC_INPUT, seeded_syncnet_state  # noqa: E402


def make_input(path: Path) -> None:
    n = 40
    g = np.random.default_rng(5)
    level = g.uniform(0.2, 1.0, n)
    yy, xx = np.mgrid[:224, :224]
    frames = []
    for t in range(n):
        f = np.full((224, 224, 3), 90, np.uint8)
        mouth = ((xx - 112) / 50) ** 2 + ((yy - 150) / (8 + 25 * level[t])) ** 2 < 1
        f[mouth] = (200 * level[t], 60, 60)
        f[((xx - 112) / 80) ** 2 + ((yy - 100) / 100) ** 2 > 1] = (30, 120, 30)
        frames.append(f)
    tmp = Path(tempfile.mkdtemp())
    for t, f in enumerate(frames):
        import PIL.Image

        PIL.Image.fromarray(f).save(tmp / f"{t:04d}.png")
    s = np.arange(int(n / 25 * 48000)) / 48000
    env = np.repeat(level, 48000 // 25)[: len(s)]
    speech = 0.4 * env * np.sin(2 * np.pi * 220 * s)
    sf.write(tmp / "a.wav", np.stack([speech, 0.3 * speech + 0.05 * g.standard_normal(len(s))], 1), 48000,
             subtype="FLOAT")
    subprocess.run([ffmpeg_exe(), "-y", "-v", "error", "-framerate", "25", "-i", str(tmp / "%04d.png"), "-i",
                    str(tmp / "a.wav"), "-c:v", "libx264", "-threads", "1", "-pix_fmt", "yuv420p", "-crf", "18",
                    "-c:a", "aac", "-ac", "2", "-ar", "48000", "-shortest", str(path)], check=True)


def main(checkout: str) -> None:
    if not SYNC_INPUT.exists():
        make_input(SYNC_INPUT)
    bindir = Path(tempfile.mkdtemp())
    (bindir / "ffmpeg").symlink_to(ffmpeg_exe())
    os.environ["PATH"] = f"{bindir}:{os.environ['PATH']}"
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self
    sys.path.insert(0, checkout)
    os.chdir(tempfile.mkdtemp())
    from SyncNetInstance import SyncNetInstance

    weights = Path("syncnet_seeded.model")
    torch.save(seeded_syncnet_state(), weights)
    s = SyncNetInstance()
    s.loadParameters(str(weights))
    opt = SimpleNamespace(tmp_dir="tmp", reference="golden", batch_size=20, vshift=15)
    offset, conf, dists = s.evaluate(opt, videofile=str(SYNC_INPUT))
    mdist = dists.mean(0) if dists.ndim == 2 else np.stack(dists).mean(0)
    out = {"offset": int(offset), "confidence": float(conf), "min_dist": float(mdist.min()),
           "made_with": "joonson/syncnet_python SyncNetInstance.evaluate, vshift 15, batch 20, seeded weights "
                        "(tests/test_metrics_golden.py seeded_syncnet_state)"}
    path = Path(__file__).with_name("sync_syncnet_python.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path, out)


if __name__ == "__main__":
    main(sys.argv[1])
