"""IDC, Aes and SD/BD with tiny random transformers models saved and loaded through the real loaders,
faces from scikit-image's astronaut photo, and flow on a pattern that moves only inside the mask."""

import numpy as np
import pytest
import skimage.data
import torch

from ft_train.metrics.portrait import (
    AestheticScore,
    IdentityConsistency,
    SubjectBackgroundDynamics,
    load_clip_vision,
    person_masks,
)
from ft_train.metrics.video import VideoMetrics, build_metric


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dino")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, projection_dim=8)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    head = path / "sa_0_4_vit_l_14_linear.pth"
    torch.save({"weight": torch.randn(1, 8), "bias": torch.tensor([5.0])}, head)
    return path, head


def _faces(n=6, mirror=False):
    img = skimage.data.astronaut()[:360, 60:420]
    img = img[:, ::-1] if mirror else img
    return np.stack([np.roll(img, t, axis=1) for t in range(n)])


def test_idc_is_one_for_the_reference_face_and_lower_for_another(tiny_dino):
    video = _faces()
    m = IdentityConsistency(weights=str(tiny_dino), frames=None)
    m.update(video[:1].repeat(4, 0), video[0])  # the reference face itself
    assert float(m.compute()["idc"]) == pytest.approx(1.0, abs=1e-6)

    other = _faces(mirror=True).copy()
    other = (other * 0.8).astype(np.uint8)  # another look: mirrored and darker
    m2 = IdentityConsistency(weights=str(tiny_dino), frames=None)
    m2.update(other, video[0])
    m2.update(np.full((3, 64, 64, 3), 120, np.uint8), video[0])  # no face in the generated frames: counted
    m2.update(video, np.full((64, 64, 3), 120, np.uint8))  # no face in the reference: counted
    out = m2.compute()
    assert float(out["idc"]) < 0.999 and int(out["videos"]) == 1
    assert int(out["no_face_frames"]) == 3 and int(out["no_reference_face"]) == 1


def test_aes_through_the_real_loader_equals_the_laion_recipe(tiny_clip):
    """Aes = head(normalise(CLIP image embedding)), mean over frames then videos."""
    path, head = tiny_clip
    g = np.random.default_rng(0)
    videos = [g.integers(0, 255, (5, 40, 48, 3), dtype=np.uint8) for _ in range(2)]
    m = build_metric(str(path), "aes", "aes", aes_head=str(head), frames=None)
    for v in videos:
        m.update(v)
    enc = load_clip_vision(path)
    w = torch.load(head)
    want = []
    for v in videos:
        with torch.no_grad():
            e = torch.nn.functional.normalize(enc(v), dim=-1)
        want.append(float((e @ w["weight"].T + w["bias"]).mean()))
    assert float(m.compute()["aes"]) == pytest.approx(np.mean(want), rel=1e-5)
    with pytest.raises(ValueError, match="aes: needs the LAION predictor's linear head too: set aes_head"):
        build_metric(str(path), "aes", "aes")


def test_sd_bd_split_the_flow_at_the_person_mask():
    """A textured square moving 2 px/frame inside the mask, a static textured background: SD ≈ 2 px,
    BD ≈ 0 (mask given, flow by OpenCV); then the mask from mediapipe covers the astronaut's face."""
    g = np.random.default_rng(0)
    bg = (g.integers(0, 255, (256, 256, 1)) * np.ones((1, 1, 3))).astype(np.uint8)
    patch = (g.integers(0, 255, (64, 64, 1)) * np.ones((1, 1, 3))).astype(np.uint8)
    frames = []
    for t in range(6):
        f = bg.copy()
        f[96:160, 80 + 2 * t : 144 + 2 * t] = patch
        frames.append(f)
    mask = np.zeros((6, 256, 256), bool)
    mask[:, 100:156, 90:146] = True
    m = SubjectBackgroundDynamics(masks=lambda fr: mask)
    m.update(np.stack(frames))
    m.update(np.stack(frames[:1]))  # one frame: no pair, counted
    out = m.compute()
    assert float(out["sd"]) == pytest.approx(2.0, abs=0.5)
    assert float(out["bd"]) < 0.3 and int(out["too_short"]) == 1

    face = person_masks(_faces(1))[0]
    assert face[120, 166]  # the astronaut's face (x ≈ 114…218, y ≈ 68…172 in this crop)


def test_video_metrics_runs_them_with_the_others(tiny_dino, tiny_clip):
    path, head = tiny_clip
    vm = VideoMetrics(idc=build_metric(str(tiny_dino), "idc", "idc", frames=3),
                      aes=build_metric(str(path), "aes", "aes", aes_head=str(head), frames=3),
                      dynamics=build_metric(True, "dynamics", "dynamics"))
    video = torch.from_numpy(_faces(4))
    vm.update(video, video, 25.0, None, key="a")
    vm.reference_done()
    vm.reset()
    vm.update(video, None, 25.0, None, key="a")  # later passes: IDC keeps the reference's first frame
    out = vm.compute()
    assert int(vm.metrics["idc"].compute()["videos"]) == 1 and -1.0 <= out["idc"] <= 1.0 + 1e-6  # scored: cached
    assert {"idc", "aes", "sd", "bd"} <= set(out) and all(np.isfinite(out[k]) for k in ("idc", "aes", "sd", "bd"))
    assert "DINO" in vm.protocol()["idc"] and vm.counts()["idc_no_reference_face"] == 0
