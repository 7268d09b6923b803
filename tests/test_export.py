"""ft-export (official layout, safetensors form, bundle) and importing every layout back.

One real tiny training run (2 steps, adapter only, backbone from a saved tiny diffusers folder)
provides the checkpoint; a fresh model loaded from the same folder receives the exports.
"""

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from ft_train.diffusion import FlowMatchingLoss
from ft_train.export import export, main
from hydra.utils import instantiate

from ft_train.lit import ClipStageModule
from ft_train.models import build_model
from ft_train.models.weights import (
    BUNDLE_CONFIG,
    BUNDLE_WEIGHTS,
    flatten_official,
    load_adapter_weights,
    read_checkpoint,
    to_official,
)
from ft_train.spec import ModelSpec, read_spec
from ft_train.train import train

from .conftest import CONF

PROJ_SHAPES = {"proj.weight": (2048, 768), "norm.weight": (2048,), "norm.bias": (2048,)}


def released_keys(blocks: int) -> set[str]:
    return {f"blocks.{i}.cross_attn.processor.{kv}_proj.weight" for i in range(blocks) for kv in "kv"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_pretrained):
    """A real ft-train checkpoint: 2 steps of stage 1, adapter only, on the saved tiny DiT."""
    out = tmp_path_factory.mktemp("export_run")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=tiny_cpu", "stages=null", "stage.max_steps=2", "data.num_workers=0",
            f"paths.output_dir={out}", f"model.pretrained={tiny_pretrained}", "model.train_backbone=false",
        ])
    result = train(cfg)
    result["net"] = result["module"].net.eval()
    return result


@pytest.fixture
def fresh(tiny_pretrained):
    """A new model on the same backbone, adapter at its zero/default init."""
    return build_model(pretrained=str(tiny_pretrained)).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 36, 3, 8, 8, generator=g),
        timestep=torch.tensor([500.0]),
        text=torch.randn(1, 512, 4096, generator=g),
        image=torch.randn(1, 257, 1280, generator=g),
        audio=torch.randn(1, 40, 768, generator=g),
    )


def assert_same_adapter(a, b):
    sa, sb = a.adapter_state_dict(), b.adapter_state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_official_export_is_exactly_the_released_layout(run, tmp_path):
    result = export(run["checkpoint"], tmp_path / "fantasytalking_model.ckpt")
    assert result["warnings"] == [] and result["layout"] == "lightning"
    # The official loader is a plain torch.load; ours must need nothing but tensors.
    sd = torch.load(tmp_path / "fantasytalking_model.ckpt", map_location="cpu", weights_only=True)
    assert set(sd) == {"proj_model", "audio_processor"}
    assert {k: tuple(v.shape) for k, v in sd["proj_model"].items()} == PROJ_SHAPES
    assert set(sd["audio_processor"]) == released_keys(2)
    assert all(tuple(v.shape) == (64, 2048) for v in sd["audio_processor"].values())
    assert all(v.dtype == torch.float32 for group in sd.values() for v in group.values())
    trained = run["net"]
    assert torch.equal(sd["proj_model"]["proj.weight"], trained.audio_proj.proj.weight)
    assert torch.equal(sd["audio_processor"]["blocks.1.cross_attn.processor.v_proj.weight"], trained.audio_kv[1].v_proj.weight)


def test_official_reimport_gives_the_same_adapter_and_output(run, fresh, inputs, tmp_path):
    trained = run["net"]
    assert any(kv.v_proj.weight.abs().sum() > 0 for kv in trained.audio_kv), "training moved nothing"
    export(run["checkpoint"], tmp_path / "ft.ckpt")
    with torch.no_grad():
        before = fresh(**inputs)
        loaded = load_adapter_weights(fresh, tmp_path / "ft.ckpt")
        after, want = fresh(**inputs), trained(**inputs)
    assert set(loaded) == set(fresh.adapter_state_dict())
    assert_same_adapter(fresh, trained)
    assert not torch.equal(before, want)  # the adapter matters, so the next line tests something
    assert torch.equal(after, want)


def test_official_safetensors_form_round_trips(run, fresh, tmp_path):
    out = tmp_path / "fantasytalking_model.safetensors"
    export(run["checkpoint"], out)
    flat = load_file(out)
    assert set(flat) == {f"proj_model.{k}" for k in PROJ_SHAPES} | {f"audio_processor.{k}" for k in released_keys(2)}
    assert read_checkpoint(out).layout == "official"
    load_adapter_weights(fresh, out)
    assert_same_adapter(fresh, run["net"])


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_export(run, fresh, tmp_path, dtype, torch_dtype):
    out = tmp_path / "ft_half.ckpt"
    result = export(run["checkpoint"], out, dtype=dtype)
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch_dtype for group in sd.values() for v in group.values())
    assert result["bytes"] < 0.6 * 4 * result["params"]
    load_adapter_weights(fresh, out)
    for key, value in run["net"].adapter_state_dict().items():
        got = fresh.adapter_state_dict()[key]
        assert got.dtype == torch.float32 and torch.equal(got, value.to(torch_dtype).float()), key


def test_bundle_round_trips_with_its_config(run, fresh, inputs, tmp_path):
    out = tmp_path / "bundle"
    export(run["checkpoint"], out, format="bundle")
    assert sorted(p.name for p in out.iterdir()) == [BUNDLE_CONFIG, BUNDLE_WEIGHTS]
    info = json.loads((out / BUNDLE_CONFIG).read_text())
    assert (info["format"], info["format_version"]) == ("ft_train.adapter", 2)
    spec = info["spec"]  # one description of the model, each fact once
    assert (spec["audio_mode"], info["global_step"], info["num_blocks"]) == ("clip", 2, 2)
    assert spec["pretrained"] and spec["audio_proj_dim"] == 2048 and spec["audio_in_dim"] == 768
    assert spec["audio_expand"] == 4 and spec["fps"] == 23.0 and spec["num_frames"] == 81
    assert json.dumps(info).count("audio_expand") == 1 and "model" not in info and "audio" not in info
    # ft-train wrote the same spec beside the checkpoint; the bundle carries it unchanged.
    beside = json.loads((Path(run["checkpoint"]).parent / "model_spec.json").read_text())
    assert beside == spec
    assert info["modules"] == {"audio_proj": 768 * 2048 + 2 * 2048, "audio_kv": 2 * 2 * 64 * 2048}
    assert set(load_file(out / BUNDLE_WEIGHTS)) == set(run["net"].adapter_state_dict())
    for path in (out, out / BUNDLE_CONFIG):  # the folder or its JSON
        ckpt = read_checkpoint(path)
        assert ckpt.layout == "bundle" and ckpt.meta["global_step"] == 2
    load_adapter_weights(fresh, out)
    assert_same_adapter(fresh, run["net"])
    with torch.no_grad():
        assert torch.equal(fresh(**inputs), run["net"](**inputs))
    # A bundle converts to the official file (and re-exports keeping its config).
    export(out, tmp_path / "from_bundle.ckpt")
    export(out, tmp_path / "bundle16", format="bundle", dtype="fp16")
    assert json.loads((tmp_path / "bundle16" / BUNDLE_CONFIG).read_text())["spec"] == info["spec"]


def test_stage_init_from_accepts_the_official_file(run, fresh, tmp_path):
    export(run["checkpoint"], tmp_path / "ft.ckpt")
    module = ClipStageModule(net=fresh, loss=FlowMatchingLoss(), init_from=str(tmp_path / "ft.ckpt"))
    assert_same_adapter(module.net, run["net"])


def released_style(blocks=2, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = {k: torch.randn(*shape, generator=g) for k, shape in PROJ_SHAPES.items()}
    audio = {k: torch.randn(dim, 2048, generator=g) for k in sorted(released_keys(blocks))}
    return {"proj_model": proj, "audio_processor": audio}


def test_model_init_from_starts_any_stage_from_the_released_file(tmp_path, caplog):
    """`model.init_from=fantasytalking_model.ckpt` (the issue's import key) loads the released
    adapter while the model is built and says what it loaded (stage 2 then does not warn that it
    trains from scratch); a wrong file names that key."""
    sd = released_style()
    torch.save(sd, tmp_path / "fantasytalking_model.ckpt")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=tiny_cpu", "stage=frame", "model.motion.enabled=true",
                                          f"model.init_from={tmp_path / 'fantasytalking_model.ckpt'}"])
    with caplog.at_level("INFO"):
        net = instantiate(cfg.model)
        instantiate(cfg.stage.module)(net=net, loss=instantiate(cfg.loss))
    assert any(r.getMessage() == f"model.init_from: loaded 7 tensors (audio_kv, audio_proj) from "
               f"{tmp_path / 'fantasytalking_model.ckpt'} (official)"
               for r in caplog.records), "\n".join(r.getMessage() for r in caplog.records)
    assert not any("from scratch" in r.getMessage() for r in caplog.records)
    assert torch.equal(net.audio_proj.proj.weight, sd["proj_model"]["proj.weight"])
    assert torch.equal(net.audio_kv[1].v_proj.weight, sd["audio_processor"]["blocks.1.cross_attn.processor.v_proj.weight"])
    torch.save(released_style(blocks=3), tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=r"^model.init_from: "):
        build_model(transformer=dict(cfg.model.transformer), init_from=str(tmp_path / "other.ckpt"))


def test_a_released_style_file_imports(fresh, tmp_path):
    sd = released_style()
    torch.save(sd, tmp_path / "fantasytalking_model.ckpt")
    save_file(flatten_official(sd), str(tmp_path / "fantasytalking_fp16.safetensors"))
    for name in ("fantasytalking_model.ckpt", "fantasytalking_fp16.safetensors"):
        load_adapter_weights(fresh, tmp_path / name)
        assert torch.equal(fresh.audio_proj.norm.bias, sd["proj_model"]["norm.bias"])
        for i in range(2):
            for kv in "kv":
                got = getattr(fresh.audio_kv[i], f"{kv}_proj").weight
                assert torch.equal(got, sd["audio_processor"][f"blocks.{i}.cross_attn.processor.{kv}_proj.weight"])


def test_released_layout_for_the_14b_model(tmp_path):
    """The paper's model (built on the meta device, no memory) exports the released key set."""
    cfg = yaml.safe_load((CONF / "model" / "wan2.1_i2v_14b.yaml").read_text())
    with torch.device("meta"):
        net = build_model(transformer=cfg["transformer"])
    sd = to_official(net.adapter_state_dict())
    assert {k: tuple(v.shape) for k, v in sd["proj_model"].items()} == PROJ_SHAPES
    assert set(sd["audio_processor"]) == released_keys(40)
    assert all(tuple(v.shape) == (5120, 2048) for v in sd["audio_processor"].values())
    assert sum(v.numel() for group in sd.values() for v in group.values()) == 840_437_760  # the released file


def save(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case, error, message", [
    ("blocks", ValueError, "audio layers for 3 blocks, the model has 2"),
    ("shape", ValueError, r"audio_kv.0.k_proj.weight of shape \(128, 2048\), the model expects \(64, 2048\)"),
    ("missing", KeyError, "lacks 1 adapter tensors the model has"),
    ("unexpected", ValueError, "unexpected key audio_processor"),
    ("garbage", ValueError, "cannot read .* as a torch checkpoint"),
    ("garbage_st", ValueError, "cannot read .* as safetensors"),
    ("unknown", ValueError, "unknown layout"),
    ("deepspeed", ValueError, "cannot gather the DeepSpeed checkpoint"),  # an empty shard folder
    ("bundle_version", ValueError, "format_version 99"),
])
def test_bad_checkpoints_fail_in_one_line_naming_the_file(fresh, tmp_path, case, error, message):
    sd = released_style()
    if case == "blocks":
        path = save(released_style(blocks=3), tmp_path / "big.ckpt")
    elif case == "shape":
        path = save(released_style(dim=128), tmp_path / "wide.ckpt")
    elif case == "missing":
        del sd["proj_model"]["norm.bias"]
        path = save(sd, tmp_path / "partial.ckpt")
    elif case == "unexpected":
        sd["audio_processor"]["blocks.0.self_attn.q.weight"] = torch.zeros(1)
        path = save(sd, tmp_path / "odd.ckpt")
    elif case == "garbage":
        path = tmp_path / "garbage.ckpt"
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif case == "garbage_st":
        path = tmp_path / "garbage.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    elif case == "unknown":
        path = save({"model": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    elif case == "deepspeed":
        path = tmp_path / "model.ckpt"
        (path / "checkpoint").mkdir(parents=True)
        (path / "latest").write_text("checkpoint")
    elif case == "bundle_version":
        path = tmp_path / "bundle"
        path.mkdir()
        (path / BUNDLE_CONFIG).write_text(json.dumps({"format": "ft_train.adapter", "format_version": 99}))
    with pytest.raises(error, match=message) as info:
        load_adapter_weights(fresh, path, key="stage.init_from")
    text = info.value.args[0]
    assert text.startswith("stage.init_from: ") and path.name in text and "\n" not in text


def test_export_reports_what_the_official_format_cannot_carry(run, fresh, tmp_path, caplog):
    state = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    state["state_dict"]["net.transformer.blocks.0.ffn.net.2.weight"] = torch.zeros(64, 128)
    state["state_dict"]["net.identity.queries"] = torch.zeros(4, 64)
    ckpt = save(state, tmp_path / "full.ckpt")
    result = export(ckpt, tmp_path / "ft.ckpt")
    assert len(result["warnings"]) == 1 and "2 trained tensors outside the audio adapter (1 backbone, 1 other" in result["warnings"][0]
    assert "cannot use the model.identity (1) weights" in result["warnings"][0]
    assert "outside the audio adapter" in caplog.text
    sd = torch.load(tmp_path / "ft.ckpt", map_location="cpu", weights_only=True)
    assert set(sd["audio_processor"]) == released_keys(2)
    # The bundle keeps every adapter (identity too) but not the backbone, and says so.
    result = export(ckpt, tmp_path / "bundle", format="bundle", config=str(run["stage_dir"]) + "/config.yaml")
    assert "backbone tensors" in result["warnings"][0]
    # The run's config disables identity: a model rebuilt from the bundle would ignore that tensor.
    assert "model.identity.enabled=false" in result["warnings"][1] and len(result["warnings"]) == 2
    assert json.loads((tmp_path / "bundle" / BUNDLE_CONFIG).read_text())["spec"]["identity"] is None
    assert "identity.queries" in load_file(tmp_path / "bundle" / BUNDLE_WEIGHTS)
    caplog.clear()
    load_adapter_weights(fresh, tmp_path / "bundle")  # a model without that module: loads, warns
    assert "no place for" in caplog.text
    assert_same_adapter(fresh, run["net"])


def test_export_refuses_to_overwrite_and_bad_options(run, tmp_path):
    export(run["checkpoint"], tmp_path / "ft.ckpt")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export(run["checkpoint"], tmp_path / "ft.ckpt")
    export(run["checkpoint"], tmp_path / "ft.ckpt", overwrite=True)
    with pytest.raises(ValueError, match="format: unknown 'comfy'"):
        export(run["checkpoint"], tmp_path / "x", format="comfy")
    with pytest.raises(ValueError, match="dtype: unknown 'int8'"):
        export(run["checkpoint"], tmp_path / "x", dtype="int8")
    with pytest.raises(FileNotFoundError, match="pass config="):
        export(tmp_path / "ft.ckpt", tmp_path / "b", format="bundle")  # an official file has no run config


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_mode_a_plain_open_gives(run, tmp_path, umask):
    """Every exported file is 0666 less the umask, like any other output (safetensors alone
    would leave its file 0600); the bundle folder 0777 less the umask, like a plain mkdir."""
    old = os.umask(umask)
    try:
        export(run["checkpoint"], tmp_path / "ft.ckpt")
        export(run["checkpoint"], tmp_path / "ft.safetensors")
        export(run["checkpoint"], tmp_path / "bundle", format="bundle")
        export(run["checkpoint"], tmp_path / "ft.safetensors", overwrite=True)  # a replaced file too
    finally:
        os.umask(old)
    files = [tmp_path / "ft.ckpt", tmp_path / "ft.safetensors", tmp_path / "bundle" / BUNDLE_WEIGHTS,
             tmp_path / "bundle" / BUNDLE_CONFIG]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(files)
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o666 & ~umask, f
    assert stat.S_IMODE(os.stat(tmp_path / "bundle").st_mode) == 0o777 & ~umask


def test_ft_export_command(run, tmp_path):
    step_dir = run.get("checkpoint_dir") or run["checkpoint"]
    out = tmp_path / "fantasytalking_model.ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "ft_train.export", f"ckpt={step_dir}", f"out={out}", "dtype=fp16"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout and out.is_file()
    with pytest.raises(SystemExit, match="ft-export: ckpt: no checkpoint at /no/such"):
        main(["ckpt=/no/such", f"out={tmp_path / 'x.ckpt'}"])
    with pytest.raises(SystemExit, match="set ckpt"):
        main([f"out={tmp_path / 'x.ckpt'}"])


# -- identity and motion modules ---------------------------------------------------------------
NEW_PREFIXES = ("identity.", "face_kv.", "motion.")


@pytest.fixture(scope="module")
def run_both(tmp_path_factory, tiny_pretrained):
    """A real ft-train checkpoint with the identity and motion modules: 2 steps of stage 1."""
    out = tmp_path_factory.mktemp("export_run_both")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=tiny_cpu", "stages=null", "stage.max_steps=2", "data.num_workers=0",
            f"paths.output_dir={out}", f"model.pretrained={tiny_pretrained}", "model.train_backbone=false",
            "model.identity.enabled=true", "model.motion.enabled=true",
        ])
    result = train(cfg)
    result["net"] = result["module"].net.eval()
    return result


def both_fresh(tiny_pretrained):
    """A new model with both modules at the sizes of conf/model/tiny.yaml (what run_both trained)."""
    cfg = yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())
    identity, motion = dict(cfg["identity"], enabled=True), dict(cfg["motion"], enabled=True)
    return build_model(pretrained=str(tiny_pretrained), identity=identity, motion=motion).eval()


def new_module_state(net):
    return {k: v.clone() for k, v in net.state_dict().items() if k.startswith(NEW_PREFIXES)}


def test_lightning_checkpoint_holds_identity_and_motion(run_both):
    state = torch.load(run_both["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    trained = run_both["net"].adapter_state_dict()
    new = {k for k in trained if k.startswith(NEW_PREFIXES)}
    assert {k for k in state if k.startswith(tuple("net." + p for p in NEW_PREFIXES))} == {f"net.{k}" for k in new}
    for key in new:
        assert torch.equal(state[f"net.{key}"], trained[key]), key
    assert state["net.face_kv.0.v_proj.weight"].abs().sum() > 0 and state["net.motion.proj_out.weight"].abs().sum() > 0


def test_bundle_with_identity_and_motion_round_trips_through_init_from(run_both, tiny_pretrained, inputs, tmp_path):
    out = tmp_path / "bundle"
    result = export(run_both["checkpoint"], out, format="bundle")
    assert result["warnings"] == []
    info = json.loads((out / BUNDLE_CONFIG).read_text())
    spec = info["spec"]
    assert spec["identity"] == dict(run_both["net"].identity_config.to_dict())
    assert spec["identity"]["enabled"] and spec["identity"]["num_queries"] == 4
    assert spec["motion"] == run_both["net"].motion_config.to_dict() and spec["motion"]["enabled"]
    assert {"audio_proj", "audio_kv", "identity", "face_kv", "motion"} == set(info["modules"])
    assert set(load_file(out / BUNDLE_WEIGHTS)) == set(run_both["net"].adapter_state_dict())
    # ft-infer's way back: rebuild the model from the bundle's own spec, start it from the bundle.
    net = build_model(pretrained=spec["pretrained"], transformer=spec["transformer"],
                      **ModelSpec.from_dict(spec).model_kwargs())
    module = ClipStageModule(net=net, loss=FlowMatchingLoss(), init_from=str(out))
    fresh = module.net.eval()
    assert_same_adapter(fresh, run_both["net"])
    face = torch.randn(1, 5, 1280, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for extra in ({}, {"motion": (0.2, 0.9), "face": face}):
            assert torch.equal(fresh(**inputs, **extra), run_both["net"](**inputs, **extra))
        # The modules are trained: they change the output, so the equality above tests them.
        assert not torch.equal(fresh(**inputs, motion=(0.0, 0.0)), fresh(**inputs, motion=(1.0, 1.0)))
        assert not torch.equal(fresh(**inputs, face=face), fresh(**inputs))


def test_official_export_warns_that_identity_and_motion_are_left_out(run_both, tmp_path, caplog):
    result = export(run_both["checkpoint"], tmp_path / "fantasytalking_model.ckpt")
    (warning,) = result["warnings"]
    assert "the official code has no identity or motion module and cannot use" in warning
    assert "model.identity (" in warning and "model.motion (" in warning and "format=bundle" in warning
    assert warning in caplog.text
    sd = torch.load(tmp_path / "fantasytalking_model.ckpt", map_location="cpu", weights_only=True)
    assert set(sd["audio_processor"]) == released_keys(2) and set(sd["proj_model"]) == set(PROJ_SHAPES)


def test_released_file_initialises_a_model_with_identity_and_motion(tiny_pretrained, inputs, tmp_path, caplog):
    """The released file (audio only) starts a model with both modules: the audio adapter loads,
    the new modules stay exactly at their zero-initialised start, so the output is the audio-only
    model's whatever ω and face say."""
    torch.save(released_style(), tmp_path / "fantasytalking_model.ckpt")
    net = both_fresh(tiny_pretrained)
    before = new_module_state(net)
    module = ClipStageModule(net=net, loss=FlowMatchingLoss(), init_from=str(tmp_path / "fantasytalking_model.ckpt"))
    assert module.net is net
    for key, value in new_module_state(net).items():
        assert torch.equal(value, before[key]), key
    assert net.face_kv[0].k_proj.weight.abs().sum() == 0 and net.motion.proj_out.weight.abs().sum() == 0
    audio_only = build_model(pretrained=str(tiny_pretrained)).eval()
    load_adapter_weights(audio_only, tmp_path / "fantasytalking_model.ckpt")
    with torch.no_grad():
        want = audio_only(**inputs)
        assert torch.equal(net(**inputs), want)
        assert torch.equal(net(**inputs, motion=(1.0, 0.0), face=torch.randn(1, 3, 1280)), want)
    # Said at INFO level: the released file cannot hold those modules, so nothing is amiss.
    caplog.clear()
    caplog.set_level(logging.INFO, logger="ft_train.models.weights")
    load_adapter_weights(net, tmp_path / "fantasytalking_model.ckpt")
    (record,) = [r for r in caplog.records if "has no model.identity / model.motion weights" in r.getMessage()]
    assert record.levelno == logging.INFO


def test_partial_or_mismatched_identity_motion_weights_fail(run_both, tiny_pretrained, run, tmp_path, caplog):
    trained = run_both["net"].adapter_state_dict()
    partial = {k: v for k, v in trained.items() if k != "face_kv.1.k_proj.weight"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(KeyError, match=r"lacks 1 adapter tensors .*first: face_kv.1.k_proj.weight\) \(a partial model.identity"):
        load_adapter_weights(both_fresh(tiny_pretrained), tmp_path / "partial.pt", key="stage.init_from")
    # A whole module missing is fine (stays fresh), but the audio adapter never may be.
    no_motion = {k: v for k, v in trained.items() if not k.startswith("motion.")}
    torch.save(no_motion, tmp_path / "no_motion.pt")
    net = both_fresh(tiny_pretrained)
    loaded = load_adapter_weights(net, tmp_path / "no_motion.pt")
    assert any(k.startswith("face_kv.") for k in loaded) and not any(k.startswith("motion.") for k in loaded)
    assert net.motion.proj_out.weight.abs().sum() == 0
    no_audio = {k: v for k, v in trained.items() if not k.startswith("audio_kv.0.")}
    torch.save(no_audio, tmp_path / "no_audio.pt")
    with pytest.raises(KeyError, match="first: audio_kv.0.k_proj.weight"):
        load_adapter_weights(both_fresh(tiny_pretrained), tmp_path / "no_audio.pt")
    bigger = yaml.safe_load((CONF / "model" / "tiny.yaml").read_text())["identity"]
    wide = build_model(pretrained=str(tiny_pretrained), identity=dict(bigger, enabled=True, num_queries=6))
    with pytest.raises(ValueError, match=r"identity.qformer.queries of shape \(4, 32\), the model expects \(6, 32\) \(model.identity settings differ"):
        load_adapter_weights(wide, run_both["checkpoint"], key="stage.init_from")
    # An audio-only ft-train checkpoint starts a model with both modules, which stay fresh.
    caplog.clear()
    net = both_fresh(tiny_pretrained)
    before = new_module_state(net)
    load_adapter_weights(net, run["checkpoint"])
    assert "has no model.identity / model.motion weights" in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in new_module_state(net).items())
    for key, value in run["net"].adapter_state_dict().items():
        assert torch.equal(net.adapter_state_dict()[key], value), key


def test_a_bundle_of_the_first_format_still_reads(tmp_path):
    """tests/assets/bundle_v1 was written by ft-export before bundles carried one model spec
    (format_version 1: the run's model config plus an audio section; a tiny frame-level run with
    identity and motion, fp16). The one reader gives its spec, ft-infer's reader the same settings,
    and the model rebuilt from it takes every tensor; re-exported it becomes format 2."""
    from ft_train.infer import read_adapters

    folder = Path(__file__).parent / "assets" / "bundle_v1"
    old = json.loads((folder / BUNDLE_CONFIG).read_text())
    assert old["format_version"] == 1 and "spec" not in old
    spec = read_spec(read_checkpoint(folder))
    assert (spec.audio_mode, spec.audio_in_dim, spec.audio_proj_dim, spec.audio_expand) == ("frame", 8, 16, 4)
    assert spec.fps == 23.0 and spec.num_frames == 81 and spec.transformer["num_layers"] == 2
    assert spec.identity == old["model"]["identity"] and spec.motion == old["model"]["motion"]
    adapters = read_adapters(folder)
    assert adapters.spec == spec  # every module's tensors are in the bundle, so nothing is cut
    net = build_model(transformer=spec.transformer, **spec.model_kwargs())
    loaded = load_adapter_weights(net, folder)
    assert sorted(loaded) == sorted(net.adapter_state_dict()) and len(loaded) == 53
    export(folder, tmp_path / "v2", format="bundle")
    new = json.loads((tmp_path / "v2" / BUNDLE_CONFIG).read_text())
    assert new["format_version"] == 2 and ModelSpec.from_dict(new["spec"]) == spec
