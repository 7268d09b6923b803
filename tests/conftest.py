"""Shared fixtures: offline environment, a tiny Wan I2V config, and its saved weights."""

import os

# Never reach a hub; run DeepSpeed on its CPU accelerator.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def tiny_transformer_config() -> dict:
    """The transformer section of conf/model/tiny.yaml (so tests and the demo share one size)."""
    return dict(yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())["transformer"])


@pytest.fixture(scope="session")
def tiny_pretrained(tmp_path_factory, tiny_transformer_config) -> Path:
    """A random tiny Wan I2V transformer saved in diffusers layout (<dir>/transformer/)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**tiny_transformer_config)
    root = tmp_path_factory.mktemp("wan_tiny")
    model.save_pretrained(root / "transformer")
    return root


def tensorboard_events(folder: Path, purge: bool = True) -> list[tuple[int, str, object]]:
    """``(step, tag, value)`` of every scalar (a float) and image (PNG bytes) in the TensorBoard
    event files of ``folder``, as TensorBoard reads them: files in name order, and with ``purge``
    a session start at step s hides what the earlier files hold at steps >= s. The record framing
    (8-byte length, 4-byte CRC, payload, 4-byte CRC) is parsed here; only the Event message comes
    from tensorboardX's protobuf module."""
    import struct

    from tensorboardX.proto.event_pb2 import Event, SessionLog

    out: list[tuple[int, str, object]] = []
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if purge and event.HasField("session_log") and event.session_log.status == SessionLog.START:
                out = [e for e in out if e[0] < event.step]
            for v in event.summary.value:
                out.append((event.step, v.tag, v.image.encoded_image_string if v.HasField("image") else v.simple_value))
    return out
