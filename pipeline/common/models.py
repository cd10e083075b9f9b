"""Loading models, tokenizers and model configs from local folders, safely.

Every stage loads through these three functions, so one place decides two things:
- No code from a model folder runs unless `model.trust_remote_code` is true. A folder whose
  config or tokenizer config has an `auto_map` is refused *before* transformers sees it, so
  nothing can prompt ("[y/N]") at a terminal or execute the folder's Python files.
- A missing, truncated or unreadable folder is one clear `ModelError`, not a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.common.errors import ModelError

REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse a folder that asks to run its own code, unless the user opted in."""
    if trust_remote_code:
        return
    for name in REMOTE_CODE_FILES:
        try:
            meta = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue  # missing or unreadable: the loader reports it
        if isinstance(meta, dict) and meta.get("auto_map"):
            raise ModelError(
                f"{path}/{name} asks to run the model's own Python code (auto_map); set "
                "model.trust_remote_code=true only if you trust it"
            )


def _folder(path: Path) -> Path:
    if not Path(path).is_dir():
        raise ModelError(f"model/tokenizer not found: {path} (a local from_pretrained folder is required)")
    return Path(path)


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    check_remote_code(_folder(path), trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from e


def load_model_config(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    check_remote_code(_folder(path), trust_remote_code)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the model config from {path}: {str(e).splitlines()[0]}") from e


def load_model(path: Path, trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """`AutoModelForCausalLM.from_pretrained` with the checks above; a corrupt weight file is a ModelError."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    check_remote_code(_folder(path), trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelError(f"cannot load the model in {path}: {str(e).splitlines()[0]}") from e


def pad_id(tokenizer: Any) -> int:
    """The id to pad batches with: the pad token, else eos (Llama 3 ships no pad token), else unk, else 0.

    Padding is right-padding under an attention mask with labels -100, so the id never reaches the
    loss, even where eos is also a scored completion token.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0
