"""Identity (face cross-attention) and motion-intensity modules: exact no-ops when fresh,
trainable end to end, switchable, and ω validated."""

import pytest
import torch
from diffusers import WanTransformer3DModel
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ft_train.diffusion import FlowMatchingLoss, step_generator
from ft_train.lit import ClipStageModule
from ft_train.models import ArcFaceEncoder, IResNet, build_model, load_iresnet
from ft_train.models.identity import IdentityConfig, IdentityModel, build_face_encoder
from ft_train.models.motion import check_motion
from ft_train.models.weights import load_adapter_weights

from .conftest import CONF
from .test_adapter import plain_forward, random_inputs

TINY_ID = {"enabled": True, "num_queries": 4, "dim": 32, "depth": 1, "heads": 2, "ffn_mult": 2, "out_dim": 32}
TINY_MOTION = {"enabled": True, "hidden_dim": 32}
NEW_PREFIXES = ("identity.", "face_kv.", "motion.")


def both(tiny_pretrained, **kw):
    return build_model(pretrained=str(tiny_pretrained), identity=TINY_ID, motion=TINY_MOTION, **kw)


def call(model, x, **kw):
    return model(x["hidden_states"], x["timestep"], x["text"], x["image"], x["audio"], **kw)


def make_batch(bsz=2, frames=3, hw=(4, 4), seed=0, face=True):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "latents": torch.randn(bsz, 16, frames, *hw, generator=g),
        "image_latents": torch.randn(bsz, 16, frames, *hw, generator=g),
        "clip": torch.randn(bsz, 257, 1280, generator=g),
        "text": torch.randn(bsz, 512, 4096, generator=g),
        "audio": torch.randn(bsz, 20, 768, generator=g),
        "motion": torch.rand(bsz, 2, generator=g),
    }
    if face:
        batch["face"] = torch.randn(bsz, 6, 1280, generator=g)
    return batch


@pytest.mark.parametrize("mode", ["clip", "frame"])
def test_enabled_zero_initialised_modules_are_exactly_the_plain_transformer(tiny_pretrained, mode):
    plain = WanTransformer3DModel.from_pretrained(tiny_pretrained, subfolder="transformer")
    model = both(tiny_pretrained, audio_mode=mode)
    x = random_inputs()
    face = torch.randn(2, 6, 1280)
    with torch.no_grad():
        expected = plain_forward(plain, x)
        fallback = call(model, x)  # no face → CLIP tokens; no motion → default 0.5
        given = call(model, x, motion=torch.tensor([[0.0, 1.0], [0.3, 0.9]]), face=face)
    assert torch.equal(fallback, expected)
    assert torch.equal(given, expected)


def test_disabled_modules_add_no_parameters(tiny_pretrained):
    default = build_model(pretrained=str(tiny_pretrained))
    off = build_model(pretrained=str(tiny_pretrained), identity={"enabled": False}, motion={"enabled": False})
    on = both(tiny_pretrained)
    names = lambda m: {n for n, _ in m.named_parameters()}  # noqa: E731
    assert names(default) == names(off)
    assert not any(n.startswith(NEW_PREFIXES) for n in names(off))
    assert set(off.adapter_modules()) == {"audio_proj", "audio_kv"}
    assert set(on.adapter_modules()) == {"audio_proj", "audio_kv", "identity.qformer", "face_kv", "motion"}
    assert not off.transformer.condition_embedder.time_embedder._forward_hooks
    # Every new trainable tensor is an adapter tensor (checkpointed and exported), and only those.
    new = {n for n, p in on.named_parameters() if p.requires_grad} - names(off)
    assert new and new == set(on.adapter_state_dict()) - set(off.adapter_state_dict())
    assert {f"face_kv.{i}.{kv}_proj.weight" for i in range(2) for kv in "kv"} <= new


@pytest.mark.parametrize("num_queries,out_dim,depth", [(4, 32, 1), (7, 24, 3)])
def test_qformer_output_follows_config(num_queries, out_dim, depth):
    cfg = IdentityConfig.from_dict(dict(TINY_ID, num_queries=num_queries, out_dim=out_dim, depth=depth))
    ident = IdentityModel(cfg)
    assert len(ident.qformer.layers) == depth and ident.qformer.num_queries == num_queries
    assert ident(torch.randn(3, 257, 1280)).shape == (3, num_queries, out_dim)
    assert ident(torch.randn(3, 1280)).shape == (3, num_queries, out_dim)  # one embedding (ArcFace-like)
    with pytest.raises(ValueError, match="model.identity.face_dim"):
        ident(torch.randn(3, 5, 512))


def test_bad_identity_configs_name_the_key():
    with pytest.raises(ValueError, match="model.identity: unknown keys"):
        IdentityConfig.from_dict({"queries": 3})
    with pytest.raises(ValueError, match="divisible"):
        IdentityConfig.from_dict({"dim": 30, "heads": 4})
    with pytest.raises(ValueError, match="model.identity.encoder: unknown face encoder 'facenet'"):
        IdentityModel(IdentityConfig.from_dict({"encoder": "facenet"}))
    with pytest.raises(ValueError, match="model.identity.arcface_path: required with model.identity.encoder=arcface"):
        IdentityConfig.from_dict({"encoder": "arcface"})
    with pytest.raises(ValueError, match="model.identity.arcface_arch: unknown 'resnet50'"):
        IdentityConfig.from_dict({"encoder": "arcface", "arcface_path": "x.pth", "arcface_arch": "resnet50"})


def test_omega_outside_unit_interval_is_rejected(tiny_pretrained):
    model = both(tiny_pretrained)
    x = random_inputs()
    for bad in ([[1.2, 0.5], [0.5, 0.5]], [[0.5, -0.1], [0.5, 0.5]], [[float("nan"), 0.5], [0.5, 0.5]]):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            call(model, x, motion=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        call(model, x, motion=torch.rand(3, 2))
    assert check_motion(None, 2).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert torch.equal(check_motion((0.25, 1.0), 2), torch.tensor([[0.25, 1.0], [0.25, 1.0]]))


def train_steps(model, steps, batch, lr=1e-2):
    loss_fn = FlowMatchingLoss(drop_image=0.0, drop_audio=0.0, drop_text=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(model, batch, step_generator(0, step)).loss.backward()
        if step < steps - 1 or steps == 1:
            opt.step()


def test_gradients_reach_every_new_parameter(tiny_pretrained):
    model = both(tiny_pretrained)
    batch = make_batch()
    new = {n: p for n, p in model.named_parameters() if n.startswith(NEW_PREFIXES)}
    loss_fn = FlowMatchingLoss(drop_image=0.0, drop_audio=0.0, drop_text=0.0)
    loss_fn(model, batch, step_generator(0, 0)).loss.backward()
    # Step 1: the zero-initialised output layers get gradients (nothing before them can yet).
    for name in ["motion.proj_out.weight", "face_kv.0.v_proj.weight", "face_kv.1.v_proj.weight"]:
        assert new[name].grad is not None and new[name].grad.abs().sum() > 0, name
    # After one optimiser step, every new parameter gets a non-zero gradient.
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    opt.zero_grad()
    loss_fn(model, batch, step_generator(0, 1)).loss.backward()
    dead = [n for n, p in new.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead
    assert not any(p.requires_grad for p in model.transformer.parameters())


def test_omega_and_face_change_the_output_once_trained(tiny_pretrained):
    model = both(tiny_pretrained)
    x = random_inputs()
    face_a, face_b = torch.randn(2, 2, 6, 1280).unbind(0)

    def outputs():
        with torch.no_grad():
            return (call(model, x, motion=(0.1, 0.1), face=face_a), call(model, x, motion=(1.0, 1.0), face=face_a),
                    call(model, x, motion=(0.1, 0.1), face=face_b))

    subtle, intense, other_face = outputs()
    assert torch.equal(subtle, intense) and torch.equal(subtle, other_face)  # fresh: no effect
    train_steps(model, 3, make_batch())
    subtle, intense, other_face = outputs()
    assert not torch.allclose(subtle, intense, atol=1e-5)
    assert not torch.allclose(subtle, other_face, atol=1e-5)


def test_new_modules_round_trip_through_an_adapter_checkpoint(tiny_pretrained, tmp_path):
    trained = both(tiny_pretrained)
    train_steps(trained, 2, make_batch())
    torch.save(trained.adapter_state_dict(), tmp_path / "adapter.pt")
    fresh = both(tiny_pretrained)
    loaded = load_adapter_weights(fresh, tmp_path / "adapter.pt")
    assert {k for k in loaded if k.startswith(NEW_PREFIXES)}
    x = random_inputs()
    with torch.no_grad():
        torch.testing.assert_close(call(fresh, x, motion=(0.2, 0.7)), call(trained, x, motion=(0.2, 0.7)), rtol=0, atol=0)


def test_config_switches_compose_and_instantiate(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        off = compose("train", overrides=["experiment=tiny_cpu", f"paths.output_dir={tmp_path}"])
        on = compose("train", overrides=["experiment=tiny_cpu", f"paths.output_dir={tmp_path}",
                                          "model.identity.enabled=true", "model.motion.enabled=true"])
    assert not off.model.identity.enabled and not off.model.motion.enabled
    net = instantiate(on.model)
    assert net.identity.qformer.num_queries == on.model.identity.num_queries
    assert net.motion is not None and net.identity_config.scale == 0.5
    assert instantiate(off.model).identity is None


def test_ft_train_tiny_cpu_trains_both_stages_with_identity_and_motion(tmp_path):
    """`ft-train experiment=tiny_cpu model.identity.enabled=true model.motion.enabled=true`
    (shortened): both stages train, every checkpoint holds the new modules, trained away from their
    zero start, and after training ω changes the output."""
    from ft_train.train import run

    overrides = ["experiment=tiny_cpu", "model.identity.enabled=true", "model.motion.enabled=true",
                 f"paths.output_dir={tmp_path}", "stage.max_steps=6", "data.num_workers=0"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        results = run(compose("train", overrides=overrides), overrides)
    assert [r["module"].net.audio_mode for r in results] == ["clip", "frame"]
    batch = next(iter(results[0]["datamodule"].train_dataloader()))
    assert batch["motion"].shape == (batch["latents"].shape[0], 2)  # the synthetic ω_l, ω_b reach the model
    assert ((batch["motion"] >= 0) & (batch["motion"] <= 1)).all() and batch["motion"].std() > 0
    for result in results:
        state = torch.load(result["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
        assert any(k.startswith("net.identity.qformer.") for k in state)
        assert not any(k.startswith("net.identity.encoder.") for k in state)  # frozen encoders stay out
        for key in ["net.face_kv.0.k_proj.weight", "net.face_kv.1.v_proj.weight", "net.motion.proj_out.weight"]:
            assert state[key].abs().sum() > 0, (result["stage_dir"], key)  # moved from the zero init
    net = results[-1]["module"].net.eval()
    x = random_inputs()
    with torch.no_grad():
        subtle, intense = call(net, x, motion=(0.1, 0.1)), call(net, x, motion=(1.0, 1.0))
    assert not torch.allclose(subtle, intense, atol=1e-6)


# -- ArcFace (model.identity.encoder=arcface) ----------------------------------------------------
TINY_IRESNET = dict(layers=(1, 1, 2, 1), widths=(8, 8, 16, 16))


def random_iresnet(seed=0) -> IResNet:
    """A tiny IResNet with random weights *and* BatchNorm statistics (so loading them is tested)."""
    torch.manual_seed(seed)
    net = IResNet(**TINY_IRESNET)
    for name, buf in net.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_()
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def arcface_file(tmp_path):
    net = random_iresnet()
    path = tmp_path / "backbone.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_arcface_loads_from_a_local_file_and_embeds_face_crops(arcface_file):
    path, saved = arcface_file
    net = load_iresnet(path)
    assert net.layers_per_stage == TINY_IRESNET["layers"] and net.widths == TINY_IRESNET["widths"]
    for key, value in saved.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    assert not net.training and not any(p.requires_grad for p in net.parameters())

    encoder = build_face_encoder(IdentityConfig.from_dict({"encoder": "arcface", "arcface_path": str(path), "face_dim": 512}))
    assert isinstance(encoder, ArcFaceEncoder) and encoder.input_kind == "pixels" and encoder.out_dim == 512
    crops = torch.rand(3, 3, 112, 112) * 2 - 1
    emb = encoder(crops)
    assert emb.shape == (3, 1, 512)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3, 1))
    with torch.no_grad():
        torch.testing.assert_close(emb[:, 0], torch.nn.functional.normalize(saved(crops), dim=-1))
    # uint8 crops are read as x/127.5 - 1; other sizes are resized to 112×112.
    as_uint8 = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    torch.testing.assert_close(encoder(as_uint8), encoder(as_uint8.float() / 127.5 - 1))
    assert encoder(torch.rand(2, 3, 160, 128) * 2 - 1).shape == (2, 1, 512)
    # Training mode never reaches the frozen network (BatchNorm keeps its statistics).
    encoder.train()
    assert not encoder.training and not encoder.net.training
    before = encoder(crops)
    assert torch.equal(before, emb)
    with pytest.raises(ValueError, match=r"takes face crops \(B, 3, H, W\)"):
        encoder(torch.randn(2, 6, 512))


def test_arcface_identity_branch_in_the_model(tiny_pretrained, arcface_file):
    path, _ = arcface_file
    identity = dict(TINY_ID, encoder="arcface", arcface_path=str(path), face_dim=512)
    model = build_model(pretrained=str(tiny_pretrained), identity=identity, motion=TINY_MOTION)
    plain = WanTransformer3DModel.from_pretrained(tiny_pretrained, subfolder="transformer")
    x = random_inputs()
    crops = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.equal(call(model, x, face=crops), plain_forward(plain, x))  # zero-init: no effect
    # The encoder is frozen: not trained, not an adapter module, not in Lightning checkpoints.
    assert not any(n.startswith("identity.encoder.") for n in model.adapter_state_dict())
    module = ClipStageModule(net=model, loss=FlowMatchingLoss())
    assert not any(k.startswith("net.identity.encoder.") for k in module.trainable_keys())
    assert any(k.startswith("net.identity.qformer.") for k in module.trainable_keys())
    model.train()
    assert not model.identity.encoder.net.training
    batch = make_batch(face=False)
    batch["face"] = torch.rand(2, 3, 112, 112) * 2 - 1
    train_steps(model, 2, batch)
    assert model.identity.qformer.proj_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.identity.encoder.parameters())
    other = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(call(model, x, face=crops), call(model, x, face=other), atol=1e-6)
    # Without face crops there is no fallback for a pixel encoder: say what is missing.
    with pytest.raises(ValueError, match=r"model.identity.encoder=arcface needs face crops \(B, 3, H, W\) in the batch's `face`"):
        call(model, x)
    with pytest.raises(ValueError, match="set model.identity.face_dim=512"):
        build_model(pretrained=str(tiny_pretrained), identity=dict(identity, face_dim=1280))


def test_arcface_file_errors_name_the_key_and_the_tensor(arcface_file, tmp_path):
    path, saved = arcface_file
    key = "model.identity.arcface_path"

    def write(state, name):
        torch.save(state, tmp_path / name)
        return tmp_path / name

    state = saved.state_dict()
    cases = [
        (tmp_path / "nope.pth", "auto", FileNotFoundError, "no file at .*nope.pth"),
        (path, "iresnet50", KeyError, r"lacks layer1.1.bn1.weight \(.* for iresnet50\)"),
        (write({k: v for k, v in state.items() if k != "layer3.1.conv2.weight"}, "missing.pth"), "auto", KeyError,
         "lacks layer3.1.conv2.weight"),
        (write({**state, "fc.weight": torch.zeros(512, 100)}, "shape.pth"), "auto", ValueError,
         r"has fc.weight of shape \(512, 100\), .* expects \(512, 784\)"),
        (write({**state, "head.kernel": torch.zeros(512, 10)}, "extra.pth"), "auto", ValueError, "has head.kernel .* no place for"),
        (write({"conv.weight": torch.zeros(1)}, "other.pth"), "auto", ValueError, "not an arcface_torch IResNet state dict"),
        (write([1, 2, 3], "list.pth"), "auto", ValueError, "not a state dict of tensors"),
        (tmp_path / "garbage.pth", "auto", ValueError, "cannot read .* as PyTorch weights"),
        (tmp_path / "glintr100.onnx", "auto", ValueError, "ONNX files are not read"),
    ]
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 8)
    (tmp_path / "glintr100.onnx").write_bytes(b"onnx")
    for file, arch, error, message in cases:
        with pytest.raises(error, match=message) as info:
            load_iresnet(file, arch)
        text = info.value.args[0]
        assert text.startswith(f"{key}: ") and "\n" not in text, text
    # Wrappers insightface writes load too: DDP prefixes, a training checkpoint's backbone entry,
    # and files without BatchNorm's unused counters.
    ddp = write({"state_dict_backbone": {f"module.{k}": v for k, v in state.items() if "num_batches" not in k}}, "ckpt.pt")
    assert torch.equal(load_iresnet(ddp).fc.weight, saved.fc.weight)
