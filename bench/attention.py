"""Attention kernels alone at the model's shapes: which SDPA backend is fastest, forward and backward.

At 512×512×81 the 14B model's video self-attention (S = 21,504 tokens, 40 heads of 128) is about
42 % of a forward pass's FLOPs and, at 2.5× those in backward, the largest single cost of a training
step. This script times ``torch.nn.functional.scaled_dot_product_attention`` at the shapes the
model runs, for every backend torch has (``--backends``):

- ``self``: the video self-attention, (1, S, H, D) inputs viewed as (1, H, S, D) the way diffusers'
  processors pass them;
- ``self-contig``: the same with contiguous (1, H, S, D) inputs (what diffusers' ``_native_cudnn``
  backend copies them into first);
- ``text``: video queries over the 512 text tokens;
- ``audio``: the frame-level audio windows, (F_lat, H, S/F_lat, D) queries over (F_lat, H, W, D)
  keys with a boolean key mask (the windows' padding).

Each (shape, backend) is a case: forward alone and forward + backward (bf16 on a GPU, fp32 on the
CPU), the median of ``--iters`` after one warm-up, CUDA events; TFLOP/s counts QKᵀ and PV
(4·S_q·S_k·d per forward, 2.5× that in backward). A backend that cannot run a shape (no kernel, or
the CPU for cuDNN) is recorded as ``unsupported`` with torch's reason. Writes
``attention-<card>-<date>.json`` and ``.md``.

Usage::

    python bench/attention.py --budget 40 --out $OUT           # GPU (gpu_session.sh part "attention")
    python bench/attention.py --tiny --out /tmp/bench           # CPU smoke test, seconds
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    REPO, add_run_options, bench_parser, case_failure, finish_report, fmt, report_header, run_guarded, slug,
)

if str(REPO) not in sys.path:  # the GPU image runs the checkout without installing the project
    sys.path.insert(0, str(REPO))
from ft_train.speed.attention import default_sdpa_kernel, median_seconds  # noqa: E402
from ft_train.models.audio import audio_window_index  # noqa: E402

BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}
SHAPES = ("self", "self-contig", "text", "audio")


def model_shapes(tiny: bool) -> dict[str, Any]:
    """Heads, head width, video tokens, latent frames and audio window width of the 14B model at
    512×512×81 (25 fps), or of the tiny model at 128×128×17."""
    name, (f, h, w), audio_tokens, frames = (
        ("tiny.yaml", (5, 16, 16), 34, 17) if tiny else ("wan2.1_i2v_14b.yaml", (21, 64, 64), 162, 81)
    )
    tcfg = yaml.safe_load((REPO / "conf" / "model" / name).read_text())["transformer"]
    pt, ph, pw = tcfg["patch_size"]
    index, lengths = audio_window_index(audio_tokens, frames, 4)
    return {"model": f"conf/model/{name}", "heads": tcfg["num_attention_heads"], "head_dim": tcfg["attention_head_dim"],
            "tokens": (f // pt) * (h // ph) * (w // pw), "latent_frames": f, "window": index.shape[1],
            "window_lengths": lengths.tolist()}


def make_inputs(shape: str, dims: dict[str, Any], device: torch.device, dtype: torch.dtype, grad: bool):
    """(q, k, v, attn_mask, query tokens, key tokens per query) for one shape."""
    g = torch.Generator(device=device).manual_seed(0)
    h, d, s = dims["heads"], dims["head_dim"], dims["tokens"]

    def rand(*size):
        return torch.randn(*size, generator=g, device=device, dtype=dtype)

    mask = None
    if shape in ("self", "text"):
        keys = s if shape == "self" else 512
        q, k, v = rand(1, s, h, d).transpose(1, 2), rand(1, keys, h, d).transpose(1, 2), rand(1, keys, h, d).transpose(1, 2)
        rows, cols = s, keys
    elif shape == "self-contig":
        q, k, v = rand(1, h, s, d), rand(1, h, s, d), rand(1, h, s, d)
        rows, cols = s, s
    else:  # audio windows: each latent frame's tokens attend to its window, padded slots masked
        f, win = dims["latent_frames"], dims["window"]
        per_frame = s // f
        q, k, v = rand(f, h, per_frame, d), rand(f, h, win, d), rand(f, h, win, d)
        lengths = torch.tensor(dims["window_lengths"], device=device).clamp(min=1)
        mask = (torch.arange(win, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        rows, cols = s, win
    tensors = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    return (*tensors, mask, rows, cols)


def run_case(shape: str, backend: str, dims: dict[str, Any], device: torch.device, dtype: torch.dtype,
             iters: int) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, BACKENDS[backend])
    q, k, v, mask, rows, cols = make_inputs(shape, dims, device, dtype, grad=True)
    width = dims["heads"] * dims["head_dim"]
    flops = 4 * rows * cols * width
    grad_out = torch.randn_like(q)

    def forward():
        with torch.no_grad(), sdpa_kernel(kernel):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def forward_backward():
        with sdpa_kernel(kernel):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.autograd.backward(out, grad_out)
        q.grad = k.grad = v.grad = None

    row: dict[str, Any] = {"shape": shape, "backend": backend, "query_tokens": rows, "key_tokens": cols,
                           "fwd_flops": flops, "torch_default": default_sdpa_kernel(q, k, v, mask)}
    try:
        with warnings.catch_warnings():  # torch warns why each backend declines, then raises
            warnings.simplefilter("ignore")
            fwd = median_seconds(forward, device, iters)
            row.update(status="ok", fwd_ms=fwd * 1e3, fwd_tflops=flops / fwd / 1e12)
            both = median_seconds(forward_backward, device, iters)
            row.update(fwd_bwd_ms=both * 1e3, fwd_bwd_tflops=3.5 * flops / both / 1e12,
                       bwd_tflops=2.5 * flops / (both - fwd) / 1e12 if both > fwd else None)
    except RuntimeError as exc:
        text = str(exc).lower()
        if any(m in text for m in ("no available kernel", "no viable backend", "not supported")):
            row.update(status="unsupported", error=str(exc).splitlines()[0][:200])
        else:
            status, error = case_failure(exc)
            row.update(status=status, error=error)
    return row


def environment(device: torch.device) -> dict[str, Any]:
    env = {"torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
           "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if device.type == "cuda":
        env.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        env["card"] = "cpu"
    return env


def markdown(report: dict[str, Any]) -> str:
    env, dims = report["environment"], report["dims"]
    lines = report_header("attention.py", env) + [
        f"torch {env['torch']}" + (f", CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}" if env.get("cuda") else "")
        + f"; {report['dtype']}; {dims['model']}: {dims['heads']} heads × {dims['head_dim']}, S = {dims['tokens']:,} video "
        f"tokens, {dims['latent_frames']} audio windows of {dims['window']}", "",
        "| shape | backend | status | fwd ms | fwd TFLOP/s | fwd+bwd ms | bwd TFLOP/s | torch's own choice |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        lines.append(f"| {r['shape']} | {r['backend']} | {r['status']} | {fmt(r.get('fwd_ms'), '.2f')} | "
                     f"{fmt(r.get('fwd_tflops'), '.3g')} | {fmt(r.get('fwd_bwd_ms'), '.2f')} | {fmt(r.get('bwd_tflops'), '.3g')} | "
                     f"{r.get('torch_default') or '–'} |")
    lines += ["", "TFLOP/s: 4·S_q·S_k·(heads·head_dim) per forward, 2.5× that in backward (bwd = fwd+bwd − fwd).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, cases_help=f"comma-separated shapes: {', '.join(SHAPES)} (default: all)",
                      tiny_help="CPU smoke test: the tiny model's shapes, fp32")
    ap.add_argument("--backends", default="flash,cudnn,efficient", help=f"comma-separated: {', '.join(BACKENDS)}")
    ap.add_argument("--iters", type=int, default=5)
    add_run_options(ap, budget=40.0, grace=20.0, min_case_s=2.0)
    return run_guarded(run, ap.parse_args(argv))


def run(args, budget) -> int:
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/attention.py: no CUDA device; pass --tiny for the CPU smoke test")
    shapes = list(SHAPES) if args.cases in ("", "all") else args.cases.split(",")
    backends = args.backends.split(",")
    for name, known in (("--cases", SHAPES), ("--backends", BACKENDS)):
        bad = [x for x in (shapes if name == "--cases" else backends) if x not in known]
        if bad:
            raise SystemExit(f"bench/attention.py: {name}: unknown {', '.join(bad)}; use {', '.join(known)}")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    env = environment(device)
    report: dict[str, Any] = {"environment": env, "dims": model_shapes(args.tiny), "dtype": str(dtype).removeprefix("torch."),
                              "results": []}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"attention-{slug(env['card'])}-{env['date']}" + ("-tiny" if args.tiny else "")
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"

    def save() -> None:
        json_path.write_text(json.dumps(report, indent=1))
        md_path.write_text(markdown(report))

    for shape in shapes:
        for backend in backends:
            if budget.left() < args.min_case_s:
                report["results"].append({"shape": shape, "backend": backend, "status": "skipped: time budget"})
                continue
            row = run_case(shape, backend, report["dims"], device, dtype, args.iters)
            report["results"].append(row)
            print(f"[bench] {shape} {backend}: {row['status']} fwd {fmt(row.get('fwd_ms'), '.2f')} ms, "
                  f"fwd+bwd {fmt(row.get('fwd_bwd_ms'), '.2f')} ms", flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return finish_report(save, lambda: markdown(report), json_path, md_path)


if __name__ == "__main__":
    raise SystemExit(main())
