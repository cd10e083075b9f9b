"""The data section: which SFT dataset, how it is read, rendered and tokenised."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.common.config import PositiveInt


@dataclass
class DataConfig:
    """Where the SFT examples come from and how they become token ids and label masks."""

    path: str | None = None
    """Where the rows are, read through `datasets`: a local Hub snapshot folder (its README
    `configs:`, as `huggingface-cli download --repo-type dataset` leaves it), a folder of data
    files, one file (.jsonl/.json/.parquet/.csv/.arrow), a glob (`/data/train-*.parquet`), a
    `save_to_disk` folder, or a Hub name (only when the Hub is reachable). None: the embedded
    synthetic SFT set of the embedded base model."""
    split: str = "train"
    """Split to read from a folder or Hub dataset with several splits."""
    subset: str | None = None
    """Config name of a dataset with several (`name=` of `datasets.load_dataset`)."""
    data_files: list[str] | None = None
    """Files (or globs) inside `path` to read instead of its default configuration."""
    format: Literal["auto", "messages", "prompt_completion", "question_answer", "conversations"] = "auto"
    """Row layout; `auto` detects it from the column names: `messages` (role/content chats),
    `prompt`+`completion` (strings, or message lists as in TRL's conversational form),
    `question`+`answer`, or ShareGPT-style `conversations` (from/value turns)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Maps canonical names (messages, prompt, completion, question, answer, conversations) to the
    dataset's own column names, e.g. {prompt: instruction, completion: output}."""
    message_keys: dict[str, str] = field(default_factory=dict)
    """Keys of a turn in `conversations`: {role: from, content: value} by default."""
    roles: dict[str, str] = field(default_factory=dict)
    """Extra role names mapped to user/assistant/system (ShareGPT's human/gpt are built in),
    e.g. {patient: user, doctor: assistant}."""
    chat_template: str | None = None
    """A chat template (Jinja) to use instead of the tokenizer's own, inline or as a `.jinja` file
    path; it is saved with the trained model."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the template, e.g. {enable_thinking: false} for Qwen3; evaluation renders
    its prompts with them too."""
    mask_template_text: bool = True
    """Keep text that the template inserts into an assistant turn before the message (Qwen3's empty
    `<think>\n\n</think>\n\n`) out of the loss: the mask covers the content and the end-of-turn."""
    max_length: PositiveInt = 512
    """Longest tokenised example, prompt plus completion."""
    truncation: Literal["truncate", "drop"] = "truncate"
    """What to do with longer examples: cut the tail off, or leave the example out (counted)."""
    skip_invalid: bool = False
    """Leave malformed rows out and report them, instead of stopping at the first one."""
    limit: PositiveInt | None = None
    """Use only the first `limit` rows (for smoke runs)."""
    eval_path: str | None = None
    """Held-out SFT examples (same format and columns as `path`) for the training-time eval loss;
    None: the embedded held-out problems when the data is the embedded set, else no eval loss."""


RESERVED_TEMPLATE_KWARGS = (
    "conversation", "add_generation_prompt", "continue_final_message", "tokenize", "chat_template", "padding",
    "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
)  # fmt: skip
"""Arguments of `apply_chat_template` the pipeline sets itself on every render (data.py)."""


def template_kwargs_problems(kwargs: dict[str, Any]) -> list[str]:
    """`data.chat_template_kwargs` reach `apply_chat_template`: no reserved names, and the two it
    interprets itself (`tools`, `documents`) must be lists of mappings."""
    problems = []
    for name in sorted(set(kwargs) & set(RESERVED_TEMPLATE_KWARGS)):
        problems.append(
            f"data.chat_template_kwargs.{name}: the pipeline sets {name!r} itself on every render; remove it"
        )
    for name in ("tools", "documents"):
        value = kwargs.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            problems.append(f"data.chat_template_kwargs.{name} must be a list of mappings, got {value!r:.60}")
    return problems
