"""Evaluation: answer verification, Average@n / pass@n, and end-to-end runs with hf and vLLM."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from pipeline.common.config import load_config
from pipeline.entry import stages
from pipeline.entry.config import RunConfig
from pipeline.evaluation import answers, evaluate
from pipeline.evaluation.config import EvalConfig, EvalSetConfig
from pipeline.world import builder

# (completion, reference, answer_type, expected)
TRICKY = [
    # math: math-verify equivalences
    (r"So the answer is $\boxed{\frac{1}{2}}$.", "0.5", "math", True),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}", "math", True),
    (r"Adding up: 600 + 400.\n#### 1,000", "1000", "math", True),
    (r"The answer: $x = 3$", "3", "math", True),
    (r"\boxed{3.0}", "3", "math", True),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", "math", True),
    (r"\boxed{[0,1)}", "[0, 1)", "math", True),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", "math", True),
    (r"\boxed{10^{3}}", "1000", "math", True),
    (r"first \boxed{2}, then corrected: \boxed{3}", "3", "math", True),
    (r"$\pi/2$", r"\frac{\pi}{2}", "math", True),
    (r"\boxed{-7}", "7", "math", False),
    (r"\boxed{1/3}", "0.33", "math", False),
    (r"\boxed{2}", r"\boxed{3}", "math", False),
    ("I am not sure.", "3", "math", False),
    # numeric: the embedded task's `#### n` line (the first one counts), else the last box
    ("So 3 + 4 = 7.\n#### 7", "7", "numeric", True),
    ("#### 7\n#### 8", "7", "numeric", True),
    ("#### 1,000", "1000", "numeric", True),
    ("#### 12.50", "12.5", "numeric", True),
    (r"The total is \boxed{42}.", "42", "numeric", True),
    ("#### -3", "3", "numeric", False),
    ("#### 71", "7", "numeric", False),
    ("the answer is 7", "7", "numeric", False),
    # choice: the option letter, whatever the wrapping
    ("The answer is (B).", "B", "choice", True),
    ("Answer: c", "C", "choice", False),
    ("Answer: C", "(C)", "choice", True),
    (r"\boxed{\text{(D)}}", "D. Aspirin", "choice", True),
    ("#### A", "A", "choice", True),
    ("B", "b", "choice", True),
    ("Between (A) and (C), I pick (C)", "C", "choice", True),
    ("The answer is (B).", "A", "choice", False),
    ("No idea.", "A", "choice", False),
]


@pytest.mark.parametrize("completion,reference,answer_type,expected", TRICKY)
def test_answer_verification_on_tricky_forms(completion, reference, answer_type, expected):
    assert answers.is_correct(completion, reference, answer_type) is expected


def test_math_verification_works_off_the_main_thread():
    """Flows run tasks in worker threads, where math-verify's SIGALRM timeout cannot be set."""
    results = []
    thread = threading.Thread(
        target=lambda: results.append(answers.check_answers([(r"\boxed{\frac12}", "0.5")], "math"))
    )
    thread.start()
    thread.join()
    assert results == [[True]]


def test_a_pathological_answer_cannot_hang_an_evaluation_in_any_thread():
    """sympy expanding 9^(9^(9^9)) holds the GIL and ignores signals: in-thread it hangs forever.
    The worker process is killed at the deadline, the answer counts as wrong, the next one is checked."""
    items = [(r"\boxed{9^{9^{9^{9}}}}", "1"), (r"\boxed{\frac12}", "0.5"), (r"\boxed{3}", "3")]
    results = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: results.append(answers.check_answers(items, "math", deadline_s=5)))
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and results == [[False, True, True]]
    assert time.monotonic() - started < 60


def test_average_and_pass_at_n_on_a_hand_computed_example():
    correct = [
        [True, False, False, False],  # 1/4
        [False, False, False, False],  # 0/4
        [True, True, True, True],  # 4/4
    ]
    summary = evaluate.summarize(correct, greedy=[True, False, False])
    assert summary["average_at_n"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert summary["pass_at_n"] == pytest.approx(2 / 3)
    assert summary["greedy"] == pytest.approx(1 / 3)
    # Unbiased pass@k: 1 - C(n-c, k) / C(n, k); n=4, c=1, k=2 -> 1 - 3/6.
    assert evaluate.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert evaluate.pass_at_k(4, 0, 4) == 0.0 and evaluate.pass_at_k(4, 3, 2) == 1.0
    overall = evaluate.overall(
        {
            "a": {"problems": 1, "average_at_n": 1.0, "pass_at_n": 1.0},
            "b": {"problems": 3, "average_at_n": 0.0, "pass_at_n": 0.0},
        }
    )
    assert overall == {"problems": 4, "average_at_n": 0.25, "pass_at_n": 0.25}


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(engine="hf", n=3, max_new_tokens=64, limit=12, **kw)


def test_hf_eval_end_to_end_greedy_matches_the_base_model_evaluator(tiny_build, tmp_path):
    heldout = [json.loads(line) for line in tiny_build.sft_heldout.read_text().splitlines()][:12]
    report = evaluate.evaluate(
        _cfg(), tiny_build.model, tmp_path / "a", builder.embedded_sets(tiny_build)[:1], progress=False
    )
    reference = builder.evaluate(tiny_build.model, heldout, "chat")
    assert report["sets"][builder.EMBEDDED_SET]["greedy"] == pytest.approx(reference["accuracy"])
    assert report["engine"] == "hf" and report["overall"]["problems"] == 12
    samples = [json.loads(line) for line in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all(len(s["samples"]) == 3 for s in samples)
    recount = sum(sum(s["correct"]) for s in samples) / 36
    assert report["overall"]["average_at_n"] == pytest.approx(recount)
    assert "| arith-heldout | 12 |" in (tmp_path / "a" / "report.md").read_text()
    again = evaluate.evaluate(
        _cfg(), tiny_build.model, tmp_path / "b", builder.embedded_sets(tiny_build)[:1], progress=False
    )
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()
    assert again["overall"] == report["overall"]


def test_math_and_choice_sets_from_user_files(tiny_build, tmp_path):
    math_set = tmp_path / "math.jsonl"
    math_set.write_text(
        "".join(json.dumps({"problem": f"What is {i} + {i}?", "solution": str(2 * i)}) + "\n" for i in range(4))
    )
    choice_set = tmp_path / "mc.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["Pick one: (A) 1 (B) 2"] * 3, "answer": ["A", "B", "(A)"]}), choice_set)
    cfg = _cfg(
        sets=[
            EvalSetConfig(name="m", path=str(math_set), question_column="problem", answer_column="solution"),
            EvalSetConfig(name="c", path=str(choice_set), answer_type="choice", prompt_template="Q: {question}"),
        ]
    )
    report = evaluate.evaluate(cfg, tiny_build.model, tmp_path / "out", progress=False)
    assert report["sets"]["m"]["problems"] == 4 and report["sets"]["c"]["problems"] == 3
    assert report["overall"]["problems"] == 7
    assert set(json.loads((tmp_path / "out" / "report.json").read_text())["sets"]) == {"m", "c"}


def test_bad_eval_inputs_fail_clearly(tiny_build, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n")
    bad_column = _cfg(sets=[EvalSetConfig(name="x", path=str(rows))])
    with pytest.raises(evaluate.EvalError, match="column 'question' not found"):
        evaluate.evaluate(bad_column, tiny_build.model, tmp_path / "o")
    with pytest.raises(evaluate.EvalError, match="no evaluation sets"):
        evaluate.evaluate(_cfg(), tiny_build.model, tmp_path / "o")
    good = _cfg(sets=[EvalSetConfig(name="x", path=str(rows), question_column="q", answer_column="a")])
    with pytest.raises(evaluate.EvalError, match="no model at"):
        evaluate.evaluate(good, tmp_path / "missing", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    cfg = load_config(
        RunConfig,
        None,
        [f"storage_root={tmp_path}", f"model.path={tiny_build.model}", f"data.path={rows}", "train.name=nope"],
    )
    with pytest.raises(evaluate.EvalError, match="has no final model"):
        stages.eval_target(cfg)
    from pipeline.common.errors import ConfigError

    with pytest.raises(ConfigError, match="missing required key 'path'"):
        load_config(RunConfig, None, ["eval.sets=[{name: x}]"])


@pytest.mark.slow  # 80 s; the demo runs the vllm eval engine end to end on every `make demo`
@pytest.mark.vllm
def test_vllm_and_hf_greedy_answers_agree(tiny_build, tmp_path):
    default = builder.embedded_sets(tiny_build)[:1]
    evaluate.evaluate(_cfg(), tiny_build.model, tmp_path / "hf", default, progress=False)
    vllm = evaluate.evaluate(
        EvalConfig(engine="vllm", n=3, max_new_tokens=64, limit=12),
        tiny_build.model,
        tmp_path / "vllm",
        default,
        progress=False,
    )
    assert vllm["engine"] == "vllm"
    read = lambda d: [json.loads(x)["greedy"] for x in (tmp_path / d / "samples.jsonl").read_text().splitlines()]  # noqa: E731
    same = sum(a == b for a, b in zip(read("hf"), read("vllm"), strict=True))
    assert same >= 11, f"greedy completions of hf and vLLM differ on {12 - same} of 12 problems"
    assert all(
        len(s) == 3
        for s in [json.loads(x)["samples"] for x in (tmp_path / "vllm" / "samples.jsonl").read_text().splitlines()]
    )


def test_a_changed_reference_answer_is_not_served_from_an_old_report(tiny_build, tmp_path):
    """Same size and mtime, another answer: the report's key reads the set files' content (issue 25)."""
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    stamp = path.stat()
    sets = [EvalSetConfig(name="s", path=str(path))]
    before = evaluate.report_fingerprint(EvalConfig(), Path(tiny_build.model), sets, None)
    path.write_text(json.dumps({"question": "1+1?", "answer": "3"}) + "\n")
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stamp.st_size, stamp.st_mtime_ns)
    assert evaluate.report_fingerprint(EvalConfig(), Path(tiny_build.model), sets, None) != before


def test_the_forgetting_set_can_be_left_out_of_the_embedded_sets(tiny_build, tmp_path):
    """eval.forgetting: false (`make demo`): only the held-out problems of the SFT skill."""
    from pipeline.common.config import to_dict
    from tests.conftest import TINY, tiny_args

    names = lambda sets: [s.name for s in sets]  # noqa: E731
    assert names(builder.embedded_sets(tiny_build)) == [builder.EMBEDDED_SET, builder.FORGETTING_SET]
    assert names(builder.embedded_sets(tiny_build, forgetting=False)) == [builder.EMBEDDED_SET]
    settings = [*tiny_args(tiny_build, tmp_path), "model.path=null", "data.path=null"]
    cfg = load_config(RunConfig, None, [*settings, f"world={json.dumps(to_dict(TINY))}", "eval.forgetting=false"])
    assert names(stages.eval_target(cfg, base=True)[2]) == [builder.EMBEDDED_SET]
