"""Rendering conversations with the chat template, and where their completion text lies.

The completion spans are character ranges of the rendered text; the tokeniser turns them into the
loss mask (`sources._span_mask`). The reference, `render_chat`, renders each assistant turn's prompt
with the generation prompt and the conversation through that turn: the span starts where the
prompt ends (or, with `mask_template_text`, where the message content starts) and ends with the
turn. `Renderer` renders a conversation whose one assistant turn is its last **once**, from a
layout it learned and checked against the reference on the first rows of that shape.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from pipeline.common.errors import DataError

Spans = list[tuple[int, int]]


class Renderer:
    """`render_chat` with one render per row where that gives the same answer (docs/design.md §3).

    For the roles of a conversation whose one assistant turn is its last (`user, assistant`, or with
    a system turn), the reference gives a layout: the generation prompt, `inserted` (text the
    template puts between it and the message: Qwen3's empty think block) and `marker` (what follows
    the message: the end-of-turn token). A later row of those roles is rendered once, and it must
    read `generation prompt + inserted + content + marker` at its end, or it takes the reference.
    The first `CHECKED` rows of each shape take both paths: a row the layout answers wrongly sends
    the shape to the reference for good.
    """

    CHECKED = 16

    def __init__(self, tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, Any], mask_template_text: bool) -> None:
        self.tokenizer, self.kwargs, self.mask = tokenizer, kwargs, mask_template_text
        self.layouts: dict[tuple[str, ...], Layout | None] = {}
        """Roles → their layout, or None: this shape takes the reference."""
        self.checked: dict[tuple[str, ...], int] = {}
        self.once = 0
        """Rows rendered once (the rest took the reference)."""

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, Spans]:
        roles = tuple(m["role"] for m in messages)
        if roles.count("assistant") != 1 or roles[-1] != "assistant" or self.layouts.get(roles, ()) is None:
            return render_chat(messages, self.tokenizer, self.kwargs, self.mask)
        if self.checked.get(roles, 0) < self.CHECKED:
            return self._check(roles, messages)
        fast = self._once(messages, self.layouts[roles])  # type: ignore[arg-type]
        if fast is None:  # a row the template renders otherwise (an empty message, a think block)
            return render_chat(messages, self.tokenizer, self.kwargs, self.mask)
        self.once += 1
        return fast

    def _once(self, messages: list[dict[str, str]], layout: Layout) -> tuple[str, Spans] | None:
        """One render, the span from the layout; None where the row does not read as the layout."""
        prompt, inserted, marker = layout
        content = messages[-1]["content"]
        text = _render(self.tokenizer, messages, False, self.kwargs)
        at = len(text) - len(marker) - len(content)  # where the content starts, if the row fits
        prompt_end = at - len(inserted)
        if not content or prompt_end < len(prompt) or not text.endswith(inserted + content + marker):
            return None
        if not text.startswith(prompt, prompt_end - len(prompt)) or text.find(content, prompt_end) != at:
            return None  # not after the generation prompt, or the reference would take an earlier match
        return text, [(at if self.mask else prompt_end, len(text))]

    def _check(self, roles: tuple[str, ...], messages: list[dict[str, str]]) -> tuple[str, Spans]:
        """The reference's answer; learns this shape's layout from it, or checks the layout against it."""
        reference = render_chat(messages, self.tokenizer, self.kwargs, self.mask)
        layout = self.layouts.get(roles)
        if layout is None:  # not learned yet: learn it from a row it answers rightly
            layout = self._layout(messages, reference[0])
            if layout is not None and self._once(messages, layout) == reference:
                self.layouts[roles] = layout
        elif (got := self._once(messages, layout)) is not None and got != reference:
            self.layouts[roles] = None  # a wrong answer the row's own checks let through
        self.checked[roles] = self.checked.get(roles, 0) + 1
        if self.checked[roles] >= self.CHECKED:
            self.layouts.setdefault(roles, None)  # never learned: the reference
        return reference

    def _layout(self, messages: list[dict[str, str]], text: str) -> Layout | None:
        before = _render(self.tokenizer, messages[:-1], True, self.kwargs)
        prompt = before[len(_render(self.tokenizer, messages[:-1], False, self.kwargs)) :]
        content = messages[-1]["content"]
        at = text.find(content, len(before)) if content else -1
        return (prompt, text[len(before) : at], text[at + len(content) :]) if at >= 0 else None


Layout = tuple[str, str, str]
"""A single-turn shape's generation prompt, the text inserted before the message, and the marker after it."""


def render_chat(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, kwargs: dict[str, Any], mask_template_text: bool
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its completion text.

    An assistant turn's span runs from the end of the prompt rendered with the generation prompt to
    the end of the turn. With `mask_template_text`, text the template itself inserts into the turn
    before the message (Qwen3's empty `<think>\n\n</think>\n\n`) stays out of the loss: the span
    starts where the message content does, so it covers the content and the end-of-turn marker.
    """
    text = _render(tokenizer, messages, False, kwargs)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, kwargs)
        through = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False, kwargs)
        if not (text.startswith(before) and through.startswith(before)):
            raise DataError(
                "the chat template is not prefix-stable (rendering a conversation's first turns "
                "is not a prefix of rendering all of it), so completion tokens cannot be located"
            )
        if text.startswith(through):
            start = len(before)
            inserted = through.find(message["content"], start) - start if mask_template_text else 0
            spans.append((start + max(inserted, 0), len(through)))
        else:
            spans.append(_turn_inside(text, before, through, message["content"], mask_template_text))
    return text, spans


def _turn_inside(text: str, before: str, through: str, content: str, mask_template_text: bool) -> tuple[int, int]:
    """The span of an earlier assistant turn that the template renders differently once later turns
    follow it (Qwen3 writes the think block into the last turn only): the message content found
    after the prompt, through the end-of-turn marker that follows it when the turn is last."""
    in_through, in_text = through.find(content, len(before)), text.find(content, len(before))
    marker = through[in_through + len(content) :]
    if in_through < 0 or in_text < 0 or not text.startswith(marker, in_text + len(content)):
        raise DataError(
            "the chat template renders an earlier assistant turn differently once later turns follow, "
            "and its message text or end-of-turn marker cannot be found in the full rendering"
        )
    return (in_text if mask_template_text else len(before)), in_text + len(content) + len(marker)


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool, kwargs: dict[str, Any]
) -> str:
    if not messages:
        return ""
    import jinja2

    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )
    except DataError:  # the render timer (check_template_time) fired inside the template
        raise
    except jinja2.TemplateError as e:  # sandbox refusals, undefined names, raise_exception(...), syntax
        raise DataError(f"the chat template failed: {type(e).__name__}: {_first_line(e)}") from None
    except (ArithmeticError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise DataError(f"the chat template failed: {type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(text, str):
        raise DataError("the chat template did not render to text; check data.chat_template_kwargs")
    added = len(text) - sum(len(str(m.get("content", ""))) for m in messages)
    if added > MAX_TEMPLATE_TEXT:
        raise DataError(
            f"the chat template adds {added:,} characters to one conversation (limit {MAX_TEMPLATE_TEXT:,}); "
            "a template that inflates every row is almost surely wrong"
        )
    return text


MAX_TEMPLATE_TEXT = 1 << 20
"""Characters a chat template may add around a conversation's messages (tool schemas included):
real templates add hundreds to tens of thousands; `{{ 'x' * 20000000 }}` would make tokenising hang."""
TEMPLATE_SECONDS = 10.0
"""How long rendering the first row may take (checked where a timer can interrupt: the main thread)."""


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:300]


def check_template_time(render: Any) -> None:
    """Run `render()` (one row's rendering) under a timer, so a template that loops for hours fails
    in seconds with one line. Timers interrupt only the main thread; elsewhere (a Prefect worker
    thread) the call runs unbounded, and the size limit above still holds."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        render()
        return

    def expired(signum: int, frame: Any) -> None:
        raise DataError(
            f"rendering one conversation with the chat template took over {TEMPLATE_SECONDS:.0f} s; "
            "check data.chat_template for unbounded loops"
        )

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
    try:
        render()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
