"""Pinned CPU kernels, so the embedded build and the demo give the same numbers run after run and on
every machine of one CPU kind, or, in the portable mode, on every x86 CPU (docs/design.md §7).

fp32 alone is not enough: PyTorch's ATen picks AVX-512 or AVX2 loops by CPU, and MKL and oneDNN pick
their own code paths by vendor and ISA, each summing in its own order. The default pins all three to
their AVX2 paths. It is not vendor-proof: MKL honours MKL_CBWR=AVX2 on Intel processors only and
uses its AUTO branch on others (docs/results.md "The same numbers across x86 CPUs"). The portable mode
(TARGET_SFT_CPU_KERNELS=portable) asks MKL for its vendor-neutral COMPATIBLE branch and AdamW for
its fused kernel (whose square root is exact, where ATen's `torch.sqrt` goes through MKL's vector
math, an ulp and CPU-dependent): the same bits on every x86 CPU measured, at about twice the matmul
time. MKL reads MKL_CBWR when the process loads it, so the variables must be set before Python
starts: the Makefile exports them, and the `target-sft` command re-executes itself once with them
where they are unset. A user's own values always win; TARGET_SFT_CPU_KERNELS=native turns pinning off.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from pipeline.common.errors import ConfigError

PINNED = {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
PORTABLE = {**PINNED, "MKL_CBWR": "COMPATIBLE"}
MODE = "TARGET_SFT_CPU_KERNELS"
"""unset or `pinned`: PINNED; `portable`: PORTABLE; `native`: no pinning (this CPU's fastest paths)."""
MODES = ("pinned", "portable", "native")


def wanted() -> dict[str, str]:
    """The variables the chosen mode sets (none where pinning is off or the CPU is not x86)."""
    mode = os.environ.get(MODE) or "pinned"
    if mode not in MODES:
        raise ConfigError(f"{MODE}={mode!r} is not one of {', '.join(MODES)}; unset it for the default (pinned)")
    if mode == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return PORTABLE if mode == "portable" else PINNED


def missing() -> dict[str, str]:
    """The chosen mode's variables this process lacks."""
    return {k: v for k, v in wanted().items() if k not in os.environ}


def adamw_fused(device_type: str) -> bool | None:
    """AdamW's `fused` argument: True on CPU when MKL runs its COMPATIBLE branch (the portable
    mode), so no square root goes through MKL's CPU-dependent vector math; None (PyTorch's own
    choice) elsewhere, which leaves the default mode's numbers as they were."""
    return True if device_type == "cpu" and os.environ.get("MKL_CBWR") == "COMPATIBLE" else None


def reexec_pinned() -> None:
    """Replace this process by the same command with the pinning variables set; no-op when set."""
    try:
        extra = missing()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if extra:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **extra})


def mode() -> str:
    """The arithmetic this process actually runs: `pinned` or `portable` where the variables are
    exactly that mode's, `native` where none is set, else `custom` (a user's own values)."""
    now = {k: os.environ.get(k) for k in PINNED}
    if now == PINNED:
        return "pinned"
    if now == PORTABLE:
        return "portable"
    return "native" if not any(now.values()) else "custom"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@functools.cache
def cpu_kind() -> str:
    """The CPU kind that pinned-mode numbers are comparable within: vendor and widest vector ISA,
    e.g. `AuthenticAMD/avx512` or `GenuineIntel/avx2`. MKL picks its code path by both, so two
    machines of one kind run the same pinned kernels; two kinds may not (docs/design.md §7)."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"
    return f"{info.get('vendor_id') or platform.machine() or 'unknown'}/{isa}"


def _mkl_version() -> str | None:
    import torch

    found = re.search(r"Math Kernel Library Version ([\d.]+)", torch.__config__.show())
    return found.group(1) if found else None


@functools.cache
def arithmetic() -> dict[str, Any]:
    """What the numbers of this process depend on, recorded in run.json, comparison tables and
    Prefect artifacts so a reader can tell which numbers are comparable (docs/design.md §7)."""
    import torch

    return {
        "cpu": _cpuinfo().get("model name") or platform.processor() or platform.machine(),
        "cpu_kind": cpu_kind(),
        "aten_isa": torch.backends.cpu.get_cpu_capability(),
        "kernels": mode(),
        "torch": torch.__version__,
        "mkl": _mkl_version(),
    }


def describe(record: dict[str, Any]) -> str:
    """One line for a table: `AMD EPYC (AuthenticAMD/avx2), ATen AVX2, portable kernels, torch ..., MKL ...`."""
    return (
        f"{record.get('cpu')} ({record.get('cpu_kind')}), ATen {record.get('aten_isa')}, "
        f"{record.get('kernels')} kernels, torch {record.get('torch')}, MKL {record.get('mkl')}"
    )
