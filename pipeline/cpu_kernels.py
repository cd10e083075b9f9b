"""Pinned CPU kernels, so the embedded build and the demo give the same numbers run after run and on
every machine of one CPU kind (docs/design.md §7).

fp32 alone is not enough: PyTorch's ATen picks AVX-512 or AVX2 loops by CPU, and MKL and oneDNN pick
their own code paths by vendor and ISA, each summing in its own order. This pins all three to their
AVX2 paths. It is not vendor-proof: MKL honours MKL_CBWR=AVX2 on Intel processors only and uses its
AUTO branch on others (measured under emulation: README "The same numbers across x86 CPUs"). MKL
reads MKL_CBWR when the process loads it, so the variables must be set before Python starts: the
Makefile exports them, and the `target-sft` command re-executes itself once with them where they are
unset. A user's own values always win; TARGET_SFT_CPU_KERNELS=native turns the pinning off.
"""

from __future__ import annotations

import os
import platform
import sys

PINNED = {"MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
OPT_OUT = "TARGET_SFT_CPU_KERNELS"


def missing() -> dict[str, str]:
    """The pinning variables this process lacks (none where pinning is off or does not apply)."""
    if os.environ.get(OPT_OUT) == "native" or platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {k: v for k, v in PINNED.items() if k not in os.environ}


def reexec_pinned() -> None:
    """Replace this process by the same command with the pinning variables set; no-op when set."""
    extra = missing()
    if extra:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **extra})
