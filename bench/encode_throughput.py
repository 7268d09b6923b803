"""Clips per second of the latent-cache encode (``ft-prep task=encode``) on one GPU, real-size encoders.

The encode pass (``data_tools/encode.py``) turns each raw clip into the tensors training reads, by
:func:`ft_train.data.clip_prep.encode_clips` over the four frozen encoders. This script times that
very function, and each encoder alone, for a clip of 81 frames at 512×512 (25 fps), with
random-init encoders of the real sizes built straight on the device (no weights are read):

  vae        diffusers ``AutoencoderKLWan``, the Wan2.1 config (base_dim 96, z_dim 16, dim_mult
             [1, 2, 4, 4], 2 res blocks, temporal downsample [F, T, T]), inside
             :class:`~ft_train.models.encoders.WanVAEEncoder`. One call encodes the clip and the
             I2V condition ``[frame 0, zeros…]`` as a batch of 2 per clip, as ``encode_clips``
             does. fp32 (``conf/encode.yaml`` ``vae_dtype``'s default) and bf16.
  clip       transformers ``CLIPVisionModel`` ViT-H/14 (1280 wide, 32 layers, 16 heads, MLP 5120,
             224 px, patch 14) in :class:`~ft_train.models.encoders.CLIPImageEncoder`, bf16. The
             encode pass calls it twice per clip: frame 0 and the face crop (``face: clip``).
  umt5       ``UMT5EncoderModel`` umT5-XXL (d_model 4096, 24 layers, 64 heads, d_ff 10240, d_kv
             64, vocab 256,384; 5.7B parameters) in
             :class:`~ft_train.models.encoders.UMT5TextEncoder`, bf16, 512 tokens (padded, as Wan).
             The tokenizer is an offline WordLevel one over a few words (the way
             ``save_tiny_encoders`` builds it): the model always runs all 512 positions, so the
             caption's words do not change the work.
  wav2vec    ``Wav2Vec2Model`` with the default config (= wav2vec2-base: 768 wide, 12 layers) and a
             normalising feature extractor (as wav2vec2-base-960h has), in
             :class:`~ft_train.models.encoders.Wav2VecAudioEncoder`, bf16; 3.24 s of 16 kHz audio.
  encode_clips
             the whole ``encode_clips`` from uint8 frames in host memory (as the encode pass holds
             them): uint8 → [-1, 1] on the CPU, the VAE, CLIP twice (frame 0 and the face crop),
             umT5, wav2vec2, the lip mask → latent grid. Its rate is the encode pass's clips/s per
             GPU, decoding excluded. Once with the fp32 VAE, once with the bf16 VAE.

Timing: median of ``--iters`` calls after ``--warmup`` calls, CUDA events (``perf_counter`` on
CPU), the device synchronised before each call. Peak memory: ``torch.cuda.max_memory_allocated``
during the case, every encoder's weights included (the encode pass holds all four). The sum of the
components (VAE + 2 × CLIP + umT5 + wav2vec2) is reported beside the measured ``encode_clips``:
the difference is the host-side work and copies.

Safety as ``bench/train_step.py``: an out-of-memory case is recorded as ``OOM`` and the run goes
on; cases stop starting at ``--budget`` seconds; the JSON is rewritten before and after every
case; a watchdog dumps every stack and exits at ``--budget + --grace``.

Usage::

    python bench/encode_throughput.py --budget 100 --out $OUT      # GPU: every case
    python bench/encode_throughput.py --cases vae,encode_clips
    python bench/encode_throughput.py --tiny --out /tmp/bench       # CPU smoke test, tiny encoders
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the GPU image runs the checkout without installing the project
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    Budget, add_run_options, bench_parser, case_failure, device_peaks, finish_report, fmt, free_memory, is_oom,
    report_header, run_guarded, slug,
)
from train_step import Clock, building, environment  # noqa: E402

RUNNING = "running (the watchdog stopped the run here)"
CASES = ("vae", "vae-bf16", "clip", "umt5", "wav2vec", "encode_clips", "encode_clips-bf16-vae")
CAPTION = "a woman is talking to the camera and smiles"


@dataclass(frozen=True)
class EncoderSizes:
    """Configs of the four encoders and the clip they encode."""

    name: str
    vae: dict[str, Any]
    clip: dict[str, Any]
    umt5: dict[str, Any]
    wav2vec: dict[str, Any]
    frames: int = 81
    height: int = 512
    width: int = 512
    fps: float = 25.0
    face_box: tuple[float, float, float, float] = (176.0, 160.0, 336.0, 352.0)  # x0, y0, x1, y1 in pixels
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def audio_samples(self) -> int:
        from ft_train.data.clip_prep import clip_audio_samples

        return clip_audio_samples(self.frames, self.fps)


REAL = EncoderSizes(
    name="real",
    # = AutoencoderKLWan's defaults, which are Wan2.1's vae/config.json (latents_mean/std included).
    vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]),
    # Wan2.1-I2V's image_encoder/config.json (open-clip ViT-H/14 as a CLIPVisionModel).
    clip=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
              image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5),
    # Wan2.1's text_encoder/config.json (umT5-XXL encoder).
    umt5=dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dense_act_fn="gelu_new", is_gated_act=True, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0, tie_word_embeddings=False),
    wav2vec=dict(),  # transformers' defaults are wav2vec2-base
)
TINY = EncoderSizes(
    name="tiny",
    # The sizes of ft_train.tiny.save_tiny_encoders (same strides, same code).
    vae=dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    clip=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
              patch_size=14, projection_dim=32),
    umt5=dict(vocab_size=64, d_model=64, d_kv=8, d_ff=32, num_layers=1, num_heads=2, relative_attention_num_buckets=8,
              pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    wav2vec=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(16,) * 7,
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=32),
    frames=17,
    height=64,
    width=64,
    face_box=(20.0, 18.0, 44.0, 46.0),
)


# ---------------------------------------------------------------------------------------------
# encoders


def wordlevel_tokenizer():
    """An offline umT5 stand-in: WordLevel over ``TINY_VOCAB``, ``</s>`` appended, pad id 0 (as
    :func:`ft_train.tiny.save_tiny_encoders` builds it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ft_train.models.encoders import TEXT_TOKENS
    from ft_train.tiny import TINY_VOCAB

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(TINY_VOCAB))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=TEXT_TOKENS)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_encoder(which: str, sizes: EncoderSizes, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """One of the project's encoder wrappers around a random-init model, built on ``device`` in ``dtype``
    (the wrappers are what :func:`ft_train.models.encoders.load_encoders` returns for real weights)."""
    from ft_train.models.encoders import CLIPImageEncoder, UMT5TextEncoder, Wav2VecAudioEncoder, WanVAEEncoder

    if which == "vae":
        from diffusers import AutoencoderKLWan

        with building(device, dtype):
            return WanVAEEncoder(AutoencoderKLWan(**sizes.vae)).to(device)
    if which == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        with building(device, dtype):
            return CLIPImageEncoder(CLIPVisionModel(CLIPVisionConfig(**sizes.clip))).to(device)
    if which == "umt5":
        from transformers import UMT5Config, UMT5EncoderModel

        # Built on the device in bf16 directly: 5.7B parameters never exist in fp32 on the host.
        with building(device, dtype):
            return UMT5TextEncoder(wordlevel_tokenizer(), UMT5EncoderModel(UMT5Config(**sizes.umt5))).to(device)
    if which == "wav2vec":
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

        from ft_train.media import AUDIO_RATE

        extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=AUDIO_RATE, padding_value=0.0,
                                             do_normalize=True, return_attention_mask=False)
        with building(device, dtype):
            return Wav2VecAudioEncoder(Wav2Vec2Model(Wav2Vec2Config(**sizes.wav2vec)), extractor).to(device)
    raise ValueError(which)


def inner_model(wrapper: torch.nn.Module) -> torch.nn.Module:
    return wrapper.vae if hasattr(wrapper, "vae") else wrapper.model


# ---------------------------------------------------------------------------------------------
# inputs


def make_clips(sizes: EncoderSizes, batch: int, seed: int) -> dict[str, Any]:
    """What the encode pass hands ``encode_clips`` for ``batch`` equal clips (random, never zeros)."""
    g = np.random.default_rng(seed)
    f, h, w = sizes.frames, sizes.height, sizes.width
    frames = torch.from_numpy(g.integers(0, 256, size=(batch, f, h, w, 3), dtype=np.uint8))
    masks = torch.zeros(batch, f, h, w, dtype=torch.uint8)
    x0, y0, x1, y1 = (int(v) for v in sizes.face_box)
    masks[:, :, (y0 + 3 * y1) // 4 : y1, (3 * x0 + x1) // 4 : (x0 + 3 * x1) // 4] = 255  # a mouth box in the face box
    audio = [(g.standard_normal(sizes.audio_samples) * 0.1).astype(np.float32) for _ in range(batch)]
    return {"frames": frames, "audio": audio, "lip_masks": masks, "captions": [CAPTION] * batch,
            "face_boxes": [list(sizes.face_box)] * batch}


def device_video(clips: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's input as ``encode_clips`` makes it — (2B, 3, F, H, W): the clips then their I2V
    conditions — and frame 0 (B, 3, H, W), on ``device``, float32 in [-1, 1]."""
    from ft_train.data.clip_prep import frames_to_video

    video = frames_to_video(clips["frames"]).to(device)
    condition = torch.zeros_like(video)
    condition[:, :, 0] = video[:, :, 0]
    return torch.cat([video, condition]), video[:, :, 0].contiguous()


# ---------------------------------------------------------------------------------------------
# timing


def time_calls(call: Callable[[], Any], clock: Clock, device: torch.device, warmup: int, iters: int,
               budget: Budget) -> tuple[dict[str, Any], Any]:
    """``warmup`` then up to ``iters`` timed calls; stops early when the next would pass the budget."""
    warm, times, out = [], [], None
    for i in range(warmup + iters):
        last = times[-1] if times else (warm[-1] if warm else 0.0)
        if i >= warmup and budget.left() < last * 1.2:
            break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = clock.mark()
        out = call()
        end = clock.mark()
        (warm if i < warmup else times).append(clock.seconds(start, end))
    res: dict[str, Any] = {"warmup_s": [round(t, 4) for t in warm], "iters": len(times)}
    if times:
        res["step_s"] = statistics.median(times)
        res["step_s_all"] = [round(t, 4) for t in times]
    return res, out


def shapes_and_finite(out: Any) -> tuple[Any, bool]:
    """Shapes of an encoder output (tensor, list of tensors or dict of them) and whether all are finite."""
    if torch.is_tensor(out):
        return list(out.shape), bool(torch.isfinite(out.float()).all()) if out.is_floating_point() else True
    if isinstance(out, (list, tuple)):
        parts = [shapes_and_finite(o) for o in out]
        return [p[0] for p in parts], all(p[1] for p in parts)
    if isinstance(out, dict):
        parts = {k: shapes_and_finite(v) for k, v in out.items()}
        return {k: p[0] for k, p in parts.items()}, all(p[1] for p in parts.values())
    return None, True


# ---------------------------------------------------------------------------------------------
# run


def parse_cases(spec: str) -> list[str]:
    if not spec or spec == "all":
        return list(CASES)
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            out += CASES
        elif item in CASES:
            out.append(item)
        else:
            raise SystemExit(f"--cases: unknown case {item!r}; use all or some of {', '.join(CASES)}")
    return list(dict.fromkeys(out))


def needs(case: str) -> list[str]:
    """The encoders (by build key) a case needs."""
    return {
        "vae": ["vae"], "vae-bf16": ["vae-bf16"], "clip": ["clip"], "umt5": ["umt5"], "wav2vec": ["wav2vec"],
        "encode_clips": ["vae", "clip", "umt5", "wav2vec"], "encode_clips-bf16-vae": ["vae-bf16", "clip", "umt5", "wav2vec"],
    }[case]


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Clips/s of ``encode_clips`` and the per-clip sum of the components, per VAE precision."""
    by = {r["case"]: r for r in results if r["status"] == "ok"}
    out: dict[str, Any] = {}
    for vae, total in (("vae", "encode_clips"), ("vae-bf16", "encode_clips-bf16-vae")):
        parts = [by.get(vae), by.get("clip"), by.get("umt5"), by.get("wav2vec")]
        row: dict[str, Any] = {}
        if all(parts):
            per_clip = [p["step_s"] / p["batch"] for p in parts]
            row["components_s_per_clip"] = per_clip[0] + 2 * per_clip[1] + per_clip[2] + per_clip[3]
        if by.get(total):
            row["encode_clips_s_per_clip"] = by[total]["step_s"] / by[total]["batch"]
            row["clips_per_s"] = by[total]["clips_per_s"]
            row["peak_mem_gib"] = by[total].get("peak_mem_gib")
        if row:
            out["fp32 VAE" if vae == "vae" else "bf16 VAE"] = row
    return out


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    s = report["sizes"]
    lines = [
        *report_header("encode_throughput.py", env),
        f"torch {env['torch']}, diffusers {env['diffusers']}, transformers {report.get('transformers')}"
        + (f", CUDA {env.get('cuda')}" if env["device"] == "cuda" else f", CPU {env.get('cpu')}")
        + f", commit {env.get('git_commit') or '?'}  ",
        f"clip: {s['frames']} frames at {s['height']}×{s['width']}, {s['fps']:g} fps, batch {report['batch']} "
        f"({report['sizes_name']} encoder sizes, random init); wall {report['wall_s']:.0f} s of a "
        f"{report['budget_s']:.0f} s budget",
        "",
        "| case | status | dtype (encode_clips: the VAE's) | s/call | clips/s | peak GiB | params | iters |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['case']} | {r['status']} | {r.get('dtype', '–')} | {fmt(r.get('step_s'), '.4f')} | "
            f"{fmt(r.get('clips_per_s'), '.3f')} | {fmt(r.get('peak_mem_gib'), '.1f')} | "
            f"{fmt(r.get('params'), ',')} | {r.get('iters', 0)} |"
        )
    if report.get("summary"):
        lines += ["", "| VAE | encode_clips s/clip | clips/s | components s/clip (VAE + 2·CLIP + umT5 + wav2vec2) |",
                  "| --- | --- | --- | --- |"]
        for name, row in report["summary"].items():
            lines.append(f"| {name} | {fmt(row.get('encode_clips_s_per_clip'), '.3f')} | {fmt(row.get('clips_per_s'), '.3f')} | "
                         f"{fmt(row.get('components_s_per_clip'), '.3f')} |")
    b = report.get("builds", {})
    if b:
        lines += ["", "Builds: " + "; ".join(f"{k} {v.get('status')} {fmt(v.get('build_s'), '.1f')} s" for k, v in b.items())]
    lines += ["", "vae = one WanVAEEncoder call on the clip and its I2V condition (batch 2 per clip); clip = one "
              "CLIPImageEncoder call (the pass makes two per clip: frame 0 and the face crop); encode_clips = "
              "the whole ft_train.data.clip_prep.encode_clips from uint8 frames in host memory.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, cases_help=f"comma-separated: all | {' | '.join(CASES)}",
                      tiny_help="CPU smoke test: tiny encoders, 17×64×64 clip, --device cpu")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu")
    ap.add_argument("--batch", type=int, default=1, help="clips per encoder call (the encode pass's batch_size; default 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per case (default 3; tiny 2)")
    add_run_options(ap, budget=150.0, grace=30.0, min_case_s=10.0)
    return run_guarded(run, ap.parse_args(argv))


def run(args: argparse.Namespace, budget: Budget) -> int:
    tiny = args.tiny
    device = torch.device(args.device or ("cpu" if tiny else "cuda"))
    warmup = args.warmup if args.warmup is not None else 1
    iters = args.iters if args.iters is not None else (2 if tiny else 3)
    cases = parse_cases(args.cases)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench/encode_throughput.py: no CUDA device visible to torch {torch.__version__}; "
                         "run it on the GPU machine, or pass --tiny for the CPU smoke test")
    try:
        import diffusers  # noqa: F401
        import transformers
    except ImportError as e:
        raise SystemExit(f"bench/encode_throughput.py: {e}; install the project's dependencies (bench/README.md, 'Packages')") from None
    if device.type == "cuda":
        torch.cuda.init()

    sizes = TINY if tiny else REAL
    # The encode pass's dtype 'auto': bf16 on a GPU, fp32 on the CPU; its VAE is fp32 unless asked.
    enc_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"encode_throughput-{slug(env['card'])}-{env['date']}" + ("-tiny" if tiny else "")
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"
    report: dict[str, Any] = {
        "environment": env, "transformers": transformers.__version__, "budget_s": args.budget, "batch": args.batch,
        "sizes_name": sizes.name, "cases_requested": cases, "encoder_dtype": str(enc_dtype).replace("torch.", ""),
        "sizes": {"frames": sizes.frames, "height": sizes.height, "width": sizes.width, "fps": sizes.fps,
                  "audio_samples": sizes.audio_samples, "face_box": list(sizes.face_box), "vae": sizes.vae,
                  "clip": sizes.clip, "umt5": sizes.umt5, "wav2vec": sizes.wav2vec or "transformers defaults (wav2vec2-base)"},
        "builds": {}, "results": [], "wall_s": 0.0,
        # fp32 convolutions run as TF32 unless cuDNN's flag is off (the VAE's fp32 rows depend on it).
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn_benchmark": torch.backends.cudnn.benchmark},
    }
    print(f"[bench] {env['card']} torch {env['torch']}; {sizes.name} encoders; clip {sizes.frames}×{sizes.height}×"
          f"{sizes.width}, batch {args.batch}; cases: {', '.join(cases)}; budget {args.budget:.0f} s "
          f"(hard stop at {args.budget + args.grace:.0f} s)", flush=True)

    def save() -> None:
        report["wall_s"] = budget.elapsed()
        report["summary"] = summary(report["results"])
        json_path.write_text(json.dumps(report, indent=1))
        md_path.write_text(markdown(report))

    save()

    # Build every encoder the cases need, once (the encode pass holds all four at once).
    wanted = list(dict.fromkeys(k for c in cases for k in needs(c)))
    encoders: dict[str, torch.nn.Module] = {}
    for key in wanted:
        name = "vae" if key.startswith("vae") else key
        dtype = {"vae": torch.float32, "vae-bf16": torch.bfloat16}.get(key, enc_dtype)
        info: dict[str, Any] = {"dtype": str(dtype).replace("torch.", "")}
        report["builds"][key] = {**info, "status": RUNNING}
        save()
        if budget.left() < args.min_case_s:
            report["builds"][key] = {**info, "status": "skipped: time budget"}
            continue
        t0 = time.perf_counter()
        failed = None
        try:
            torch.manual_seed(args.seed)
            if key == "vae-bf16" and "vae" in encoders:  # the same random VAE, in bf16
                import copy

                enc = copy.deepcopy(encoders["vae"]).to(dtype=dtype)
                enc.mean, enc.std = enc.mean.float(), enc.std.float()  # buffers stay fp32, as the loader leaves them
            else:
                enc = build_encoder(name, sizes, device, dtype)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            encoders[key] = enc
        except Exception as exc:  # noqa: BLE001 - one failed build must not end the run
            failed = "OOM" if is_oom(exc) else f"error: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if not is_oom(exc):
                traceback.print_exc()
        if failed:
            enc = None
            free_memory(device)
            report["builds"][key] = {**info, "status": failed}
        else:
            model = inner_model(encoders[key])
            info.update(status="ok", build_s=round(time.perf_counter() - t0, 2), params=count(model),
                        attention=getattr(model.config, "_attn_implementation", None))
            if device.type == "cuda":
                info["allocated_gib"] = torch.cuda.memory_allocated(device) / 2**30
            report["builds"][key] = info
        print(f"[bench] build {key}: {report['builds'][key]['status']} "
              f"{fmt(report['builds'][key].get('build_s'), '.1f')} s (t={budget.elapsed():.0f} s)", flush=True)
        save()

    clips = make_clips(sizes, args.batch, args.seed)
    clock = Clock(device)
    video2 = frame0 = None

    def record(case: str, status: str, **extra: Any) -> None:
        results = report["results"]
        if results and results[-1]["case"] == case and results[-1]["status"] == RUNNING:
            results.pop()
        results.append({"case": case, "status": status, "batch": args.batch, **extra})
        save()
        if status != RUNNING:
            shown = f" {extra['step_s']:.4f} s/call" if "step_s" in extra else ""
            mem = f", peak {extra['peak_mem_gib']:.1f} GiB" if extra.get("peak_mem_gib") else ""
            print(f"[bench] {case}: {status}{shown}{mem} (t={budget.elapsed():.0f} s)", flush=True)

    for case in cases:
        missing = [k for k in needs(case) if k not in encoders]
        if missing:
            record(case, "skipped: encoder not built", missing=missing)
            continue
        if budget.left() < args.min_case_s:
            record(case, "skipped: time budget")
            continue
        vae_key = "vae-bf16" if "vae-bf16" in needs(case) else "vae"
        dtype = report["builds"][vae_key]["dtype"] if case.startswith(("vae", "encode_clips")) else report["encoder_dtype"]
        record(case, RUNNING, dtype=dtype)
        res: dict[str, Any] = {}
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            if video2 is None and case in ("vae", "vae-bf16", "clip"):
                video2, frame0 = device_video(clips, device)
            if case in ("vae", "vae-bf16"):
                enc = encoders[case]
                call = lambda: enc(video2)  # noqa: E731
                res["input"] = list(video2.shape)
                res["params"] = count(enc.vae)
            elif case == "clip":
                call = lambda: encoders["clip"](frame0)  # noqa: E731
                res.update(input=list(frame0.shape), calls_per_clip=2, params=count(encoders["clip"].model))
            elif case == "umt5":
                call = lambda: encoders["umt5"](clips["captions"])  # noqa: E731
                res.update(tokens=encoders["umt5"].max_length, params=count(encoders["umt5"].model))
            elif case == "wav2vec":
                call = lambda: encoders["wav2vec"](clips["audio"])  # noqa: E731
                res.update(audio_samples=sizes.audio_samples, params=count(encoders["wav2vec"].model))
            else:
                from ft_train.data.clip_prep import encode_clips
                from ft_train.models import FrozenEncoders

                frozen = FrozenEncoders(vae=encoders[vae_key], image=encoders["clip"], text=encoders["umt5"],
                                        audio=encoders["wav2vec"])
                call = lambda: encode_clips(frozen, clips["frames"], clips["audio"], clips["lip_masks"],  # noqa: E731
                                            clips["captions"], face_boxes=clips["face_boxes"], face="clip")
                res.update(face="clip", params=sum(count(inner_model(e)) for e in
                                                   (encoders[vae_key], encoders["clip"], encoders["umt5"], encoders["wav2vec"])))
            timing, out = time_calls(call, clock, device, warmup, iters, budget)
            res.update(timing)
            res["output_shapes"], res["finite"] = shapes_and_finite(out)
            if res.get("step_s") and case.startswith("encode_clips"):
                res["clips_per_s"] = args.batch / res["step_s"]
            status = "ok" if res.get("iters") else "skipped: time budget"
            out = None
        except Exception as exc:  # noqa: BLE001 - record OOM (or any failure) and go on
            status, res["error"] = case_failure(exc)
        res.update(device_peaks(device))
        record(case, status, dtype=dtype, **res)
        free_memory(device)

    return finish_report(save, lambda: markdown(report), json_path, md_path)


if __name__ == "__main__":
    sys.exit(main())
