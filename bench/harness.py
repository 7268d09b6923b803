"""What the GPU benches share: the time budget and its watchdog, the common command-line options,
the report header and small formatting helpers.

``train_step.py``, ``encode_throughput.py`` and ``zero_step.py`` each run inside one device call
that must not outlive its lease: no case starts once ``--budget`` seconds are spent, and a
watchdog dumps every thread's stack and exits at ``--budget + --grace`` (plus ``backstop_s``).
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import re
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


class Budget:
    """Seconds left of ``--budget`` since the script started."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def bench_parser(doc: str | None, *, cases_help: str, tiny_help: str, cases_default: str = "all") -> argparse.ArgumentParser:
    """The benches' command line: the script's first docstring line as its description, ``--cases``
    and ``--tiny`` (the CPU smoke test); each script adds its own options, then
    :func:`add_run_options`."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=cases_default, help=cases_help)
    ap.add_argument("--tiny", action="store_true", help=tiny_help)
    return ap


def finish_report(save: Callable[[], None], markdown_text: Callable[[], str], *paths: Path) -> int:
    """Write the report a last time, print its markdown (the device tool returns the output's
    tail, so the tables come back even when the files do not) and where it went."""
    save()
    print(markdown_text())
    print(f"[bench] wrote {' and '.join(str(p) for p in paths)}", flush=True)
    return 0


def add_run_options(ap: argparse.ArgumentParser, *, budget: float, grace: float, min_case_s: float | None,
                    min_case_help: str | None = None, grace_help: str | None = None) -> None:
    """``--budget``, ``--grace``, ``--min-case-s``, ``--seed`` and ``--out`` (results folder)."""
    ap.add_argument("--budget", type=float, default=budget,
                    help=f"seconds: no case starts after this (default {budget:g})")
    ap.add_argument("--grace", type=float, default=grace,
                    help=grace_help or "seconds after the budget when the watchdog kills the run")
    ap.add_argument("--min-case-s", type=float, default=min_case_s,
                    help=min_case_help or "a case needs at least this many budget seconds left to start")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for the JSON and markdown")


def run_guarded(run: Callable[[argparse.Namespace, Budget], int], args: argparse.Namespace,
                backstop_s: float = 0.0) -> int:
    """``run(args, budget)`` under the watchdog: a hung kernel or process must not outlive the
    device lease, so every thread's stack is dumped and the script exits at
    ``--budget + --grace + backstop_s``."""
    budget = Budget(args.budget)
    faulthandler.dump_traceback_later(args.budget + args.grace + backstop_s, exit=True)
    try:
        return run(args, budget)
    finally:
        faulthandler.cancel_dump_traceback_later()


def report_header(script: str, env: dict[str, Any]) -> list[str]:
    """The first lines of a bench's markdown: which script, on which card, on which day, and the command."""
    return [f"# bench/{script} on {env['card']} ({env['date']})", "", f"command: `{env['command']}`  "]


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def case_failure(exc: BaseException) -> tuple[str, str]:
    """(status, one-line error) of a case that raised: ``OOM`` for out of memory, else
    ``error: <type>`` with its traceback printed. The run records it and goes on."""
    oom = is_oom(exc)
    if not oom:
        traceback.print_exc()
    error = str(exc).splitlines()[0][:300] if str(exc) else exc.__class__.__name__
    return ("OOM" if oom else f"error: {exc.__class__.__name__}"), error


def device_peaks(device) -> dict[str, float]:
    """Peak allocated and reserved GPU memory (GiB) since the last reset; nothing on CPU."""
    import torch

    if device.type != "cuda":
        return {}
    return {"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def free_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
