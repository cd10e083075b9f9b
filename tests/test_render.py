"""Rendering once per row (`pipeline.data.render.Renderer`) gives the reference's text and spans."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from pipeline.data.render import Renderer, render_chat


def rows(seed: int = 0, n: int = 120) -> list[list[dict[str, str]]]:
    """Single-turn rows with and without a system turn, multi-turn rows, rows whose answer repeats
    the question or holds a think block, and an empty answer."""
    rng = random.Random(seed)
    words = ["one", "two", "three", "plus", "minus", "equals", "<think>", "</think>", "think", "end", "im"]
    out = []
    for i in range(n):
        q, a = " ".join(rng.choices(words, k=rng.randint(1, 8))), " ".join(rng.choices(words, k=rng.randint(1, 8)))
        if i % 7 == 3:
            a = q  # the answer is the question's text
        if i % 11 == 5:
            a = "<think>\nwork\n</think>\n\n" + a  # Qwen3 renders a reasoning block differently
        conversation = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 1:
            conversation.insert(0, {"role": "system", "content": "be brief"})
        if i % 13 == 6:
            conversation += [{"role": "user", "content": "and?"}, {"role": "assistant", "content": a + " more"}]
        out.append(conversation)
    out.append([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}])
    return out


@pytest.mark.parametrize("family", ["embedded", "llama3", "qwen3"])
@pytest.mark.parametrize("mask_template_text", [True, False])
def test_one_render_gives_the_references_text_and_spans(
    family, mask_template_text, tiny_build, llama3_style, qwen3_style
):
    folder = {"embedded": tiny_build.model, "llama3": llama3_style, "qwen3": qwen3_style}[family]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    render = Renderer(tokenizer, {}, mask_template_text)
    for conversation in rows():
        assert render(conversation) == render_chat(conversation, tokenizer, {}, mask_template_text), conversation
    assert render.once > 40  # most single-turn rows were rendered once


def guarded(template: str, tiny_build) -> tuple[Renderer, int]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model)
    tokenizer.chat_template = template
    render = Renderer(tokenizer, {}, False)
    short = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    conversations = [short, *rows(1, 60)]  # the layout is learned from a short question
    for conversation in conversations:
        assert render(conversation) == render_chat(conversation, tokenizer, {}, False)
    return render, sum(len(c) == 2 and c[-1]["content"] != "" for c in conversations)


TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and messages[0].content|length > 12 %}"
    "{{ extra }}{% endif %}{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_a_row_the_layout_does_not_describe_takes_the_reference(tiny_build):
    """The template inserts text after the generation prompt for long questions only: those rows do
    not read `prompt + content + marker` and take the reference; the others are rendered once."""
    render, single = guarded(TEMPLATE.replace("{{ extra }}", "<x>"), tiny_build)
    assert 0 < render.once < single - Renderer.CHECKED and render.layouts[("user", "assistant")] is not None


def test_a_shape_whose_layout_answers_wrongly_takes_the_reference_for_good(tiny_build):
    """Here the inserted text is the generation prompt itself, so a long question's row reads as the
    layout but its span would start too late: caught while the shape's first rows are checked."""
    render, _ = guarded(TEMPLATE.replace("{{ extra }}", "<assistant>"), tiny_build)
    assert render.layouts[("user", "assistant")] is None  # (a system turn's short text keeps its shape fast)
