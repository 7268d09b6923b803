"""Memory per GPU of a training step, computed for every strategy and GPU count (CPU, seconds).

What a user needs before ``sbatch``: does stage 2 of the 14B model fit on N cards of 80 GB with
this strategy? Nothing here runs a step; the numbers come from

- the parameters, counted on the meta device from the model yaml (``build_model`` as ``ft-train``
  builds it): frozen, trainable, the largest single tensor (what ZeRO-3 gathers at once), and the
  frozen linear weights ``model.frozen_fp8`` stores in one byte;
- model states per GPU:
  - ``ddp``: every weight in its dtype (bf16 backbone; fp32 adapters), plus 16 B per trainable fp32
    weight (weight, gradient, AdamW's two moments) or 8 B per trainable bf16 backbone weight;
  - ``deepspeed_zero2``: every weight in bf16 (DeepSpeed's bf16 casts the module) plus
    18 B × trainable / N (bf16 and fp32 gradients, fp32 master weights, two fp32 moments:
    DeepSpeed's ``estimate_zero2_model_states_mem_needs``);
  - ``deepspeed_zero3``: (2 B × every weight + 18 B × trainable) / N plus 4 B × the largest tensor
    (``estimate_zero3_model_states_mem_needs``); ``model.frozen_fp8`` weights are buffers, which
    ZeRO-3 does not shard: 1 B each on every GPU;
  - ``deepspeed_zero3_offload``: weights and optimizer state in host memory, 4 B × the largest
    tensor on the GPU; the host needs (2 B × every weight + 18 B × trainable) × 1.5 / nodes
    (DeepSpeed's buffer factor);
- activations of one clip (batch 1) with full activation checkpointing: every block's input
  (blocks × S × d × 2 B, exact; on the host with ``model.checkpoint_offload``) plus one block's
  working set while it is recomputed and differentiated, modelled as ``a·S·d + b·S·f`` bytes
  (S video tokens, d width, f FFN width), with a and b fitted to two measured peaks (the 14B
  adapter step on one H100, ``train_step``; the 1.3B adapter step under ZeRO-2, ``zero_step``).

The output checks the model against every measured peak in ``bench/results/`` (two fitted, two
not), so its error is on the page. Writes ``zero_memory.json`` and ``zero_memory.md``.

Usage::

    python bench/zero_memory.py                      # → $TMPDIR/ft_train-bench/zero_memory.{json,md}
    python bench/zero_memory.py --gpus 8,16,32,64 --card-gib 141 --out /tmp/x     # other counts, H200
    python bench/zero_memory.py --out bench/results  # regenerate the committed tables
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GIB = 2**30
STRATEGIES = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")

# Measured peaks (torch.cuda.max_memory_allocated, GiB) on one H100 80GB HBM3, 2026-11-27:
# bench/results/train_step-nvidia-h100-80gb-hbm3-2026-11-27.md and zero_step-...md.
MEASURED = [
    # (label, model yaml, (height, width, frames), trains backbone, strategy, GiB, used for the fit)
    ("14B adapters, no ZeRO, 512×512×81 (train_step)", "wan2.1_i2v_14b.yaml", (512, 512, 81), False, "ddp", 54.6, True),
    ("1.3B adapters, ZeRO-2, 480×832×81 (zero_step)", "wan_i2v_1.3b.yaml", (480, 832, 81), False, "deepspeed_zero2", 12.3, True),
    ("1.3B adapters, ZeRO-3, 480×832×81 (zero_step)", "wan_i2v_1.3b.yaml", (480, 832, 81), False, "deepspeed_zero3", 13.0, False),
    ("1.3B full fine-tune, no ZeRO, 480×832×81 (train_step)", "wan_i2v_1.3b.yaml", (480, 832, 81), True, "ddp", 19.0, False),
]


@dataclass(frozen=True)
class Model:
    """Parameter counts of one model yaml, and its widths."""

    name: str
    backbone: int  # DiT weights
    adapter: int  # what the project adds (fp32, always trained)
    largest: int  # the largest single tensor
    fp8_linear: int  # frozen block linear weights model.frozen_fp8 stores in 1 byte
    blocks: int
    width: int  # d
    ffn: int  # f
    patch: tuple[int, int, int]


def count(model_yaml: str) -> Model:
    """Parameters of ``conf/model/<model_yaml>`` built on the meta device (no memory, no weights)."""
    from ft_train.models import build_model
    from ft_train.speed.fp8 import Fp8FrozenLinear

    cfg = yaml.safe_load((REPO / "conf" / "model" / model_yaml).read_text())
    tcfg = cfg["transformer"]
    with torch.device("meta"):
        net = build_model(transformer=tcfg)
    adapter = sum(p.numel() for m in net.adapter_modules().values() for p in m.parameters())
    backbone = sum(p.numel() for p in net.transformer.parameters())
    fp8 = sum(m.weight.numel() for m in net.transformer.blocks.modules() if Fp8FrozenLinear.supports(m))
    return Model(model_yaml.removesuffix(".yaml"), backbone, adapter, max(p.numel() for p in net.parameters()), fp8,
                 tcfg["num_layers"], tcfg["num_attention_heads"] * tcfg["attention_head_dim"], tcfg["ffn_dim"],
                 tuple(tcfg["patch_size"]))


def tokens(model: Model, shape: tuple[int, int, int]) -> int:
    """Video tokens S of a clip (height, width, frames): Wan VAE 4×8×8, then the patch."""
    h, w, frames = shape
    pt, ph, pw = model.patch
    return ((frames - 1) // 4 + 1) // pt * (h // 8 // ph) * (w // 8 // pw)


def states(model: Model, full: bool, strategy: str, gpus: int, fp8: bool = False) -> tuple[float, float]:
    """(GPU bytes, host bytes per node with 8 GPUs per node) of weights, gradients and optimizer state."""
    frozen = 0 if full else model.backbone
    trainable = model.adapter + (model.backbone if full else 0)
    fp8_weights = model.fp8_linear if fp8 and not full else 0
    if strategy == "ddp":
        weights = 2 * (model.backbone - fp8_weights) + fp8_weights + 4 * model.adapter
        return weights + 12 * model.adapter + (6 * model.backbone if full else 0), 0.0
    bf16_all = 2 * (frozen - fp8_weights + trainable)
    if strategy == "deepspeed_zero2":
        return bf16_all + fp8_weights + 18 * trainable / gpus, 0.0
    if strategy == "deepspeed_zero3":
        return (bf16_all + 18 * trainable) / gpus + fp8_weights + 4 * model.largest, 0.0
    if strategy == "deepspeed_zero3_offload":
        nodes = max(1, gpus // 8)
        return fp8_weights + 4 * model.largest, (bf16_all + 18 * trainable) * 1.5 / nodes
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def activations(model: Model, s: int, coef: tuple[float, float], offload: bool = False) -> tuple[float, float]:
    """(GPU bytes, host bytes) of one clip's activations with full checkpointing."""
    inputs = model.blocks * s * model.width * 2
    working = coef[0] * s * model.width + coef[1] * s * model.ffn
    return (working, inputs) if offload else (inputs + working, 0.0)


def fit(models: dict[str, Model]) -> tuple[float, float]:
    """a, b of the working-set model from the two measured peaks marked for the fit."""
    rows, rhs = [], []
    for _, yml, shape, full, strategy, gib, use in MEASURED:
        if not use:
            continue
        m = models[yml]
        s = tokens(m, shape)
        rest = states(m, full, strategy, 1)[0] + m.blocks * s * m.width * 2
        rows.append([s * m.width, s * m.ffn])
        rhs.append(gib * GIB - rest)
    a, b = torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)).tolist()
    return a, b


def plan(gpus: list[int], card_gib: float) -> dict[str, Any]:
    models = {yml: count(yml) for yml in ("wan2.1_i2v_14b.yaml", "wan_i2v_1.3b.yaml")}
    coef = fit(models)
    checks = []
    for label, yml, shape, full, strategy, gib, used in MEASURED:
        m = models[yml]
        got = (states(m, full, strategy, 1)[0] + activations(m, tokens(m, shape), coef)[0]) / GIB
        checks.append({"case": label, "measured_gib": gib, "computed_gib": round(got, 2),
                       "error": round(got / gib - 1, 3), "fitted": used})
    rows = []
    m14 = models["wan2.1_i2v_14b.yaml"]
    for shape in ((512, 512, 81), (720, 1280, 81)):
        s = tokens(m14, shape)
        for full in (False, True):
            variants = [("", False, False)] if full else [("", False, False), ("frozen_fp8", True, False),
                                                         ("frozen_fp8, checkpoint_offload", True, True)]
            for option, fp8, offload in variants:
                for strategy in STRATEGIES:
                    act_gpu, act_host = activations(m14, s, coef, offload)
                    per_gpu, host = {}, {}
                    for n in ([1] if strategy == "ddp" else gpus):
                        gpu, host_states = states(m14, full, strategy, n, fp8)
                        per_gpu[n] = round((gpu + act_gpu) / GIB, 1)
                        host[n] = round((host_states + min(n, 8) * act_host) / GIB)
                    rows.append({"clip": f"{shape[0]}×{shape[1]}×{shape[2]}", "tokens": s,
                                 "trains": "everything" if full else "adapters", "options": option,
                                 "strategy": strategy, "activations_gib": round(act_gpu / GIB, 1),
                                 "per_gpu_gib": per_gpu, "host_gib_per_node": host,
                                 "fits": {n: v <= 0.95 * card_gib for n, v in per_gpu.items()}})
    return {"card_gib": card_gib, "gpus": gpus, "coefficients_bytes": {"a_per_token_width": round(coef[0], 2),
            "b_per_token_ffn": round(coef[1], 2)}, "models": {k: vars(v) for k, v in models.items()},
            "checks": checks, "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    a, b = report["coefficients_bytes"].values()
    lines = ["# Memory per GPU, computed (bench/zero_memory.py)", "",
             f"Batch 1, full activation checkpointing, bf16. One block's working set = {a:.1f}·S·d + {b:.1f}·S·f "
             "bytes (fitted); every block's input S·d·2 bytes. \"fits\" = at most 95 % of a "
             f"{report['card_gib']:.0f} GiB card. Host memory: per node of 8 GPUs (fewer when the run has fewer).", "",
             "## The model against measured peaks (one H100 80GB, bench/results/)", "",
             "| case | measured GiB | computed GiB | error | |", "| --- | --- | --- | --- | --- |"]
    for c in report["checks"]:
        lines.append(f"| {c['case']} | {c['measured_gib']} | {c['computed_gib']} | {100 * c['error']:+.0f} % | "
                     f"{'fitted' if c['fitted'] else 'check'} |")
    gpus = report["gpus"]
    lines += ["", "## 14B stage 2 (Wan2.1-I2V-14B): GiB per GPU by GPU count", "",
              "`ddp` is the same on any number of GPUs. Over the card (95 %) in *italics*; host memory per node "
              "(8 GPUs, or fewer when the run has fewer) in brackets where the option uses it.", "",
              "| clip | trains | options | strategy | activations | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpus) + " |",
              "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in gpus) + " |"]
    for r in report["rows"]:
        cells = []
        for n in gpus:
            value, host = r["per_gpu_gib"].get(n), r["host_gib_per_node"].get(n)
            if value is None:
                cells.append("")
                continue
            text = f"{value}" if r["fits"][n] else f"*{value}*"
            cells.append(text + (f" [{host}]" if host else ""))
        lines.append(f"| {r['clip']} | {r['trains']} | {r['options'] or '–'} | {r['strategy']} | "
                     f"{r['activations_gib']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,8,64", help="GPU counts for the ZeRO strategies (comma-separated)")
    ap.add_argument("--card-gib", type=float, default=80.0, help="memory of one card, GiB")
    # Not bench/results: a plain run must not overwrite the committed tables (regenerate them
    # with --out bench/results).
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ft_train-bench",
                    help="folder for zero_memory.json and .md (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        gpus = [int(g) for g in args.gpus.split(",")]
    except ValueError:
        raise SystemExit(f"--gpus: expected comma-separated counts such as 1,8,64, got {args.gpus!r}")
    report = plan(gpus, args.card_gib)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero_memory.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "zero_memory.md").write_text(text)
    print(text)
    print(f"[zero_memory] wrote {args.out / 'zero_memory.json'} and {args.out / 'zero_memory.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
