"""Shared plumbing of ``make bench``: figures measured against a same-run baseline, timing, result files.

Every figure is a ratio of two numbers measured in the same run on the same machine (so a
busy or slow machine moves both), reported together with both absolute numbers and the
machine they came from. Timings interleave the variants they compare and keep the best of the
repeats, because the CPU is shared and the least disturbed repeat is the closest to the cost.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")


@dataclass
class Figure:
    """One measured figure: ``ratio = value / baseline`` (both in ``unit``), checked against ``target``.

    ``target`` is a short text such as ``"≥ 0.95"`` (about the ratio unless it says otherwise);
    ``met`` is None when the figure has no target (reported for information).
    """

    name: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    group: str = ""
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.baseline not in (None, 0):
            self.ratio = self.value / self.baseline

    def check(self, ok: Callable[[float], bool]) -> Figure:
        """Set ``met`` from the ratio (None stays None when there is no ratio)."""
        self.met = None if self.ratio is None else bool(ok(self.ratio))
        return self


def failed(group: str, name: str, error: BaseException | str) -> Figure:
    """A figure whose measurement raised: kept in the table so a failure is never silent."""
    return Figure(name=name, value=None, unit="", group=group, target="runs", met=False, note=f"FAILED: {error}")


def best_of(samples: Iterable[float]) -> float:
    """The least disturbed of repeated timings (on a shared CPU, noise only ever adds time)."""
    return min(samples)


def now() -> float:
    return time.perf_counter()


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program.

    Linux's ``ru_maxrss`` survives ``fork`` + ``exec``: a child of a 7 GB parent reports 7 GB even
    if it never used more than 1 GB. ``VmHWM`` belongs to the process's own address space, so it
    is read first; ``ru_maxrss`` (kibibytes on Linux) is the fallback elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def child_env(threads: int, blas_threads: int | None = None) -> dict[str, str]:
    """Environment for a measuring subprocess: the repository importable and the thread counts fixed."""
    blas = str(blas_threads or threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": blas, "OPENBLAS_NUM_THREADS": blas,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]))}
    return env


def run_child(module: str, args: list[str], *, threads: int, blas_threads: int | None = None,
              timeout: float = 900) -> dict[str, Any]:
    """Run ``python bench/<module>.py ARGS`` in a fresh process and parse the JSON line it prints last.

    A fresh process is the only way to read one configuration's peak memory: the high-water mark
    never goes down within a process.
    """
    cmd = [sys.executable, str(REPO / "bench" / f"{module}.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(threads, blas_threads), timeout=timeout, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[1:])} printed no result; stderr: {out.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO, timeout=10)
        return out.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (load average: other work sharing the CPU)."""
    import torch

    return {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "cuda": torch.cuda.is_available(), "commit": _git_commit(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return f"{value:g}"
        magnitude = abs(value)
        if magnitude >= 1e6 or magnitude < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}" if magnitude < 100 else f"{value:,.1f}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(figures: list[Figure]) -> str:
    """The markdown table of every figure (what `make bench` prints at the end)."""
    rows = ["| # | figure | value | unit | baseline | ratio | target | met |", "|---|---|---|---|---|---|---|---|"]
    for f in figures:
        base = f"{_fmt(f.baseline)} ({f.baseline_name})" if f.baseline_name else _fmt(f.baseline)
        cells = [f.group, f.name, _fmt(f.value), f.unit, base, _fmt(f.ratio), f.target or "—", _fmt(f.met)]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def notes(figures: list[Figure]) -> str:
    """One line per figure that carries a note (how it was measured, what the breakdown says)."""
    return "\n".join(f"- **{f.group} {f.name}**: {f.note}" for f in figures if f.note)


def write_results(folder: Path, figures: list[Figure], info: dict[str, Any],
                  title: str = "cldlr benchmark results") -> tuple[Path, Path]:
    """``results.json`` (one entry per figure) and ``results.md`` (machine, table, notes), atomically."""
    from cldlr.common.io import atomic_write_json, atomic_write_text

    json_path, md_path = folder / "results.json", folder / "results.md"
    atomic_write_json(json_path, {"machine": info, "figures": [asdict(f) for f in figures]})  # NumPy values via jsonable
    lines = [f"# {title}", "",
             "Every ratio is value / baseline, both measured in this run on this machine.", "",
             "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items() if k != "figures_seconds"]
    lines += ["", "## Figures", "", table(figures), "", "## Notes", "", notes(figures), ""]
    if info.get("figures_seconds"):
        lines += ["## Time per benchmark (s)", ""]
        lines += [f"- {k}: {v}" for k, v in info["figures_seconds"].items()]
        lines.append("")
    atomic_write_text(md_path, "\n".join(lines))
    return json_path, md_path

