"""The real path: Hub-like dataset layouts and row formats through `datasets`, a Llama-3-style
tokenizer without a pad token, and eval prompts from any column. Everything is built locally."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from pipeline.common.config import load_config
from pipeline.common.errors import DataError, EvalError
from pipeline.core.targets import IGNORE
from pipeline.data import sources
from pipeline.data.config import DataConfig
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.evaluation import evaluate
from pipeline.evaluation.config import EvalSetConfig
from tests.conftest import REPO, hub_snapshot, tiny_args, write_jsonl

QA = [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(12)]


def rows_in(fmt: str) -> list[dict]:
    """The same 12 problems in each row format a Hub SFT set comes in."""
    out = []
    for r in QA:
        user, assistant = r["question"], f"{r['answer']} #### {r['answer']}"
        out.append(
            {
                "messages": {
                    "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
                },
                "prompt_completion": {"prompt": user, "completion": assistant},
                "conversational": {
                    "prompt": [{"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": assistant}],
                },
                "question_answer": {"question": user, "answer": assistant},
                "sharegpt": {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": assistant}]},
            }[fmt]
            | {"source": "synthetic", "id": len(out)}  # extra columns a real set has, never read
        )
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_build):
    return AutoTokenizer.from_pretrained(tiny_build.model)


@pytest.mark.parametrize("fmt", ["messages", "prompt_completion", "conversational", "question_answer", "sharegpt"])
def test_every_row_format_from_a_hub_snapshot_gives_the_same_examples(tmp_path, tokenizer, fmt):
    folder = hub_snapshot(tmp_path / "snapshot", rows_in(fmt))
    prepared = sources.prepare(DataConfig(path=str(folder)), folder, tokenizer)
    reference = sources.prepare(DataConfig(), write_jsonl(tmp_path / "ref.jsonl", rows_in("messages")), tokenizer)
    assert [e.input_ids.tolist() for e in prepared.examples] == [e.input_ids.tolist() for e in reference.examples]
    assert [e.labels.tolist() for e in prepared.examples] == [
        e.labels.tolist() for e in reference.examples
    ]  # same mask rules
    assert prepared.format == {"conversational": "prompt_completion", "sharegpt": "conversations"}.get(fmt, fmt)


def test_every_path_form_reads_the_same_rows(tmp_path, tokenizer):
    rows = rows_in("prompt_completion")
    snapshot = hub_snapshot(tmp_path / "snapshot", rows, test_rows=rows[:3])
    files = tmp_path / "files"
    files.mkdir()
    for i in range(3):
        pq.write_table(pa.Table.from_pylist(rows[i * 4 : (i + 1) * 4]), files / f"part-{i}.parquet")
    single = write_jsonl(tmp_path / "all.jsonl", rows)
    csv = tmp_path / "all.csv"
    csv.write_text("prompt,completion\n" + "".join(f'"{r["prompt"]}","{r["completion"]}"\n' for r in rows))
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    expected = [(r["prompt"], r["completion"]) for r in rows]
    for path, split in [
        (snapshot, "train"),
        (files, "train"),
        (single, "train"),
        (csv, "train"),
        (str(files / "part-*.parquet"), "train"),
        (tmp_path / "saved", "train"),
    ]:
        source = sources.open_source(path, split)
        got = [(r["prompt"], r["completion"]) for r in source.read(["prompt", "completion"])]
        assert got == expected or sorted(got) == sorted(expected), path
    test = sources.open_source(snapshot, "test").read(None)
    assert [r["prompt"] for r in test] == [r["prompt"] for r in rows[:3]]
    only = sources.open_source(snapshot, "train").read(["prompt"])
    assert set(only[0]) == {"prompt"}  # only the needed columns are read


def test_two_snapshots_laid_out_alike_never_share_a_cache(tmp_path):
    """datasets keys a local folder's cache by its README's relative patterns: without our own cache
    key, the second folder (or a changed file) would be read as the first."""
    a = hub_snapshot(tmp_path / "a" / "sft", rows_in("prompt_completion")[:4])
    b = hub_snapshot(tmp_path / "b" / "sft", rows_in("question_answer")[4:8])
    assert sources.open_source(a).columns[:2] == ["prompt", "completion"]
    assert sources.open_source(b).columns[:2] == ["question", "answer"]
    shard = next((a / "data").glob("train-00001-*"))
    pq.write_table(pa.Table.from_pylist(rows_in("prompt_completion")[10:12]), shard)
    assert [r["prompt"] for r in sources.open_source(a).read(["prompt"])][-1] == QA[11]["question"]


@pytest.mark.parametrize(
    "path,split,message",
    [
        ("some-org/some-dataset", "train", "is not a local path, and the Hub is offline"),
        ("{tmp}/nothing/*.parquet", "train", "no data files match"),
        ("{snapshot}", "validation", "has splits ['train'], not 'validation'"),
        ("{tmp}/missing.jsonl", "train", "dataset not found"),
    ],
)
def test_bad_paths_are_one_clear_error(tmp_path, path, split, message):
    snapshot = hub_snapshot(tmp_path / "snapshot", rows_in("messages"))
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        sources.open_source(path.format(tmp=tmp_path, snapshot=snapshot), split)


def test_sharegpt_roles_and_keys_are_mappable(tmp_path, tokenizer):
    rows = [{"dialog": [{"speaker": "patient", "text": "It hurts."}, {"speaker": "doctor", "text": "Rest."}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(
        format="conversations",
        columns={"conversations": "dialog"},
        message_keys={"role": "speaker", "content": "text"},
        roles={"patient": "user", "doctor": "assistant"},
    )
    prepared = sources.prepare(cfg, path, tokenizer)
    assert "Rest." in tokenizer.decode([t for t in prepared.examples[0].labels.tolist() if t != IGNORE])
    with pytest.raises(DataError, match=r"turn 0 has role 'patient'; map it with data\.roles"):
        sources.prepare(DataConfig(format="conversations", columns={"conversations": "dialog"},
                                message_keys={"role": "speaker", "content": "text"}), path, tokenizer)  # fmt: skip


# --- a Llama-3-style tokenizer: header tokens, no pad token ------------------------------------------


def test_a_tokenizer_without_pad_token_trains_and_evaluates(llama3_style, tiny_build, tmp_path):
    """eos pads (under the attention mask) and stays a scored completion token (<|eot_id|>)."""
    data_path = hub_snapshot(tmp_path / "sft", rows_in("conversational"))
    eval_set = json.dumps([{"name": "arith", "path": str(tiny_build.sft_heldout), "answer_type": "numeric"}])
    cfg = load_config(
        RunConfig,
        None,
        tiny_args(
            tiny_build,
            tmp_path,
            f"model.path={llama3_style}",
            f"data.path={data_path}",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "train.max_steps=2",
            "train.eval_every=0",
            "train.threads=1",
            f"eval.sets={eval_set}",
            "eval.engine=hf",
            "eval.n=1",
            "eval.limit=3",
            "eval.max_new_tokens=4",
        ),
    )
    tok = AutoTokenizer.from_pretrained(llama3_style)
    example = sources.prepare(cfg.data, data_path, tok).examples[0]
    assert example.labels[-1] == tok.convert_tokens_to_ids("<|eot_id|>")  # eos is scored
    final = stages.train(cfg, progress=False)
    report = json.loads(stages.evaluate_run(cfg, progress=False).read_text())
    assert (final / "model.safetensors").exists() and report["overall"]["problems"] == 3


# --- eval prompts from any column ----------------------------------------------------------------------


def test_prompt_template_uses_any_column_and_renders_options(tmp_path):
    rows = [
        {"question": "Which is a fruit?", "options": {"A": "Apple", "B": "Brick"}, "answer": "A"},
        {"question": "Which is blue?", "options": ["Grass", "Sky"], "answer": "B"},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    s = EvalSetConfig(name="mc", path=str(path), answer_type="choice", prompt_template="{question}\n{options}\nAnswer:")
    problems = evaluate.load_problems(s, None)
    assert problems[0].prompt == "Which is a fruit?\nA. Apple\nB. Brick\nAnswer:"
    assert problems[1].prompt == "Which is blue?\nA. Grass\nB. Sky\nAnswer:"
    for template, message in [
        ("{question}\n{choices}", "column 'choices' not found"),
        ("{question} (hint: {answer})", "names the answer column 'answer'"),
    ]:
        with pytest.raises(EvalError, match=message):
            evaluate.load_problems(EvalSetConfig(name="mc", path=str(path), prompt_template=template), None)


def test_eval_set_from_a_hub_snapshot_test_split(tmp_path):
    folder = hub_snapshot(tmp_path / "math", QA[:4], test_rows=QA[4:7])
    problems = evaluate.load_problems(EvalSetConfig(name="m", path=str(folder), split="test"), None)
    assert [p.answer for p in problems] == ["5", "6", "7"]
    shutil.rmtree(folder)


# --- one prior worker per GPU ---------------------------------------------------------------------------


def test_prior_capture_fans_out_one_worker_per_gpu(tiny_build, tmp_path, monkeypatch, capsys):
    """Two simulated GPUs: two worker processes, each seeing only its own GPU, share the shards; this
    process then writes the manifest. (On this CPU the workers fall back to the CPU.)"""
    from pipeline.entry import launch
    from pipeline.priors.cache import PriorStore

    monkeypatch.setattr(launch, "visible_gpus", lambda: ["0", "1"])
    overrides = tiny_args(tiny_build, tmp_path, "priors.shard_size=16")
    cfg = load_config(RunConfig, None, overrides)
    result = launch.capture_priors(cfg, None, overrides, progress=False)
    out = capsys.readouterr().out
    assert "[gpu 0] prior worker 0 of 2, CUDA_VISIBLE_DEVICES=0" in out
    assert "[gpu 1] prior worker 1 of 2, CUDA_VISIBLE_DEVICES=1" in out
    store = PriorStore(str(tmp_path))
    assert result.complete and store.verify(result.key) == [] and result.forward_passes > 0
    made = store.manifest(result.key)["capture"]  # how it was made, beside the key
    assert (made["engine"], made["device"], made["dtype"]) == ("hf", "cpu", "float32")
    assert made["data_counts"]["examples"] == made["data_counts"]["rows"] == 60
    single = stages.plan_priors(cfg, progress=False)
    assert single.key == result.key
    again = launch.capture_priors(cfg, None, overrides, progress=False)
    assert again.forward_passes == 0 and "[gpu" not in capsys.readouterr().out  # reused, no worker started


# --- weight files are hashed once ----------------------------------------------------------------------


def test_weight_hashes_are_memoized_and_still_see_every_change(tiny_build, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from pipeline.priors import capture

    model = tmp_path / "model"
    shutil.copytree(tiny_build.model, model)
    memo = tmp_path / "file-sha256.json"
    first = capture.model_content_hash(model, memo)
    reads = []
    real = capture.sha256_file
    monkeypatch.setattr(capture, "sha256_file", lambda path: reads.append(path) or real(path))
    assert capture.model_content_hash(model, memo) == first and reads == []  # nothing re-read
    weights = model / "model.safetensors"
    original = weights.read_bytes()
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0  # a changed tensor, same file size
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == len(original)
    assert capture.model_content_hash(model, memo) != first and reads == [weights]
    weights.write_bytes(original)  # the old bytes again under a new mtime: hashed again, the old key back
    assert capture.model_content_hash(model, memo) == first and len(reads) == 2


# --- chat templates: override, kwargs, text the template inserts ---------------------------------------

QWEN3_STYLE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{%- if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{%- endif %}{{ m['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)


def _scored_text(prepared, tokenizer) -> str:
    return tokenizer.decode([t for t in prepared.examples[0].labels.tolist() if t != IGNORE])


def test_template_inserted_text_stays_out_of_the_loss(tmp_path, tiny_build):
    """A Qwen3-style template that writes an empty think block into every assistant turn: by default the
    mask covers exactly the content and the end-of-turn marker; the kwargs path renders it in the prompt."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_build.model)  # its own: prepare() sets the template on it
    template = tmp_path / "qwen3.jinja"
    template.write_text(QWEN3_STYLE)
    path = write_jsonl(tmp_path / "d.jsonl", rows_in("prompt_completion")[:2])
    masked = sources.prepare(DataConfig(chat_template=str(template)), path, tokenizer)
    assert tokenizer.chat_template == QWEN3_STYLE  # the override (saved with the trained model)
    assert _scored_text(masked, tokenizer) == "1 #### 1<|im_end|>"
    unmasked = sources.prepare(DataConfig(chat_template=QWEN3_STYLE, mask_template_text=False), path, tokenizer)
    assert _scored_text(unmasked, tokenizer).startswith("<think>")
    no_think = DataConfig(chat_template=QWEN3_STYLE, chat_template_kwargs={"enable_thinking": False})
    rendered = sources.prepare(no_think, path, tokenizer)
    assert _scored_text(rendered, tokenizer) == "1 #### 1<|im_end|>"
    assert rendered.fingerprint != masked.fingerprint  # the kwargs are part of what training sees


def test_a_qwen3_tokenizer_keeps_its_think_block_out_of_the_loss(qwen3_style, tmp_path, capsys):
    """The Qwen3-style fixture's own template (no override) writes `<think>\n\n</think>\n\n` into the
    answer turn: no think token is scored, the mask is the content plus `<|im_end|>\n`, and
    `data inspect` highlights exactly that."""
    from pipeline.entry import cli

    tokenizer = AutoTokenizer.from_pretrained(qwen3_style)
    think = set(tokenizer.convert_tokens_to_ids(["<think>", "</think>"]))
    path = write_jsonl(tmp_path / "d.jsonl", rows_in("messages")[:3])
    prepared = sources.prepare(DataConfig(), path, tokenizer)
    example = prepared.examples[0]
    assert think <= set(example.input_ids.tolist())  # the template wrote the block into the input...
    assert not think & set(example.labels.tolist())  # ...and none of it is scored
    assert _scored_text(prepared, tokenizer) == "1 #### 1<|im_end|>\n"
    args = [
        "data",
        "inspect",
        str(REPO / "configs" / "worlds" / "model-strong.yaml"),
        f"--set=model.path={qwen3_style}",
        f"--set=data.path={path}",
    ]
    assert cli.main([*args, f"--set=storage_root={tmp_path / 'storage'}"]) == 0
    assert "<think>\n\n</think>\n\n⟦1 #### 1<|im_end|>\n⟧" in capsys.readouterr().out


def test_a_qwen3_template_on_multi_turn_conversations(qwen3_style, tmp_path):
    """Qwen3's template writes the think block into the last answer only, so an earlier answer renders
    differently once later turns follow: each answer is still found, and exactly every answer's
    content plus its `<|im_end|>\n` is scored."""
    tokenizer = AutoTokenizer.from_pretrained(qwen3_style)
    turns = [("What is 1 plus 1?", "2 #### 2"), ("And 2 plus 2?", "4 #### 4")]
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    prepared = sources.prepare(DataConfig(), path, tokenizer)
    assert _scored_text(prepared, tokenizer) == "2 #### 2<|im_end|>\n4 #### 4<|im_end|>\n"
    think = set(tokenizer.convert_tokens_to_ids(["<think>", "</think>"]))
    assert think <= set(prepared.examples[0].input_ids.tolist())  # in the last answer's turn...
    assert not think & set(prepared.examples[0].labels.tolist())  # ...and never scored
