"""Prior-capture benchmark: hf engine vs a plain transformers forward, the vllm engine, the reader.

All engines score the same tokenised examples (the embedded SFT set by default) and the report
gives scored tokens/s with ratios to the plain baseline measured in the same run:

* plain: `model(input_ids).logits` over the whole padded batch, `log_softmax`, `topk` (what a
  straightforward script does; it materialises batch × length × vocab logits);
* hf: `HFEngine` (hidden states, chunked lm_head over scored positions only, logsumexp, top-k);
* vllm: `VLLMEngine` (prompt logprobs), when vLLM imports;
* bare vLLM generate: the engine's own `LLM.generate` call with `flat_logprobs=True`, no records
  built (the ceiling the vllm engine is measured against);
* reader: decoding the written Parquet shards back into per-example arrays, on one thread (best
  of 5 after a warm-up).

    python benchmarks/priors.py                      # CPU, embedded model, 512 examples
    python benchmarks/priors.py --device cuda --random-model 1.5b --synthetic 1024 --examples 2048  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def plain_forward(model, examples, k: int, batch_tokens: int, device: str) -> None:
    import torch

    from pipeline.data.tokens import pad_rows
    from pipeline.priors.engines import token_budget_batches

    with torch.no_grad():
        for batch in token_budget_batches(examples, batch_tokens):
            ids, mask = pad_rows([e.input_ids for e in batch], 0)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            logp.topk(k, dim=-1)
            if device == "cuda":
                torch.cuda.synchronize()


def bare_vllm_generate(llm, examples, k: int) -> None:
    """The engine's vLLM call alone: prompt logprobs as flat arrays, no records built."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
    prompts = [TokensPrompt(prompt_token_ids=e.input_ids.tolist()) for e in examples]
    llm.generate(prompts, params, use_tqdm=False)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_model(shape: str, dtype, device: str):
    """A random-initialised Qwen2-shaped model (benchmarks/shapes.py), in eval mode."""
    from benchmarks.shapes import random_qwen2

    return random_qwen2(shape).to(device=device, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-model", choices=["tiny", "0.5b", "1.5b"], help="GPU: random Qwen2-shaped model")
    parser.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="TOKENS",
        help="random examples of about this many tokens instead of the embedded SFT set (no build)",
    )
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="random model's dtype")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak for the dtype, for MFU (default: 989 on H100/H200 bf16)",
    )
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()  # fmt: skip
    if args.synthetic and not args.random_model:
        parser.error("--synthetic needs --random-model (the embedded model reads the embedded set)")

    import torch

    from pipeline.common.devices import vllm_available
    from pipeline.data import sources
    from pipeline.data.config import DataConfig
    from pipeline.priors import cache
    from pipeline.priors.engines import HFEngine, VLLMEngine
    from pipeline.world import builder
    from pipeline.world.config import WorldConfig

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.shapes import SHAPES

    vocab = SHAPES[args.random_model][0] if args.random_model else 0  # the embedded set brings its own ids
    if args.synthetic:
        examples = synthetic_examples(args.examples, args.synthetic, vocab)
    else:
        build = builder.build(WorldConfig(), os.environ.get("TARGET_SFT_STORAGE", "storage"))
        tokenizer = AutoTokenizer.from_pretrained(build.model)
        examples = sources.prepare(DataConfig(limit=args.examples), build.sft_train, tokenizer).examples
    scored = sum(e.num_scored for e in examples)
    tokens = sum(len(e.input_ids) for e in examples)
    rows = []

    if args.random_model:  # GPU shape study: a big random model
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = random_model(args.random_model, dtype, args.device)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            engine = HFEngine(folder, args.k, device=args.device, dtype=dtype, batch_tokens=args.batch_tokens)
        model_path_note = f"random Qwen2 {args.random_model}"
    else:
        model = AutoModelForCausalLM.from_pretrained(build.model, dtype=torch.float32).to(args.device).eval()
        engine = HFEngine(build.model, args.k, device=args.device, batch_tokens=args.batch_tokens)
        model_path_note = f"embedded {build.model.name}"

    plain_forward(model, examples[:8], args.k, args.batch_tokens, args.device)  # warm-up
    base = timed(lambda: plain_forward(model, examples, args.k, args.batch_tokens, args.device))
    rows.append(("plain forward + log_softmax + top-k", base))
    engine.score(examples[:8])
    records = []
    rows.append(("hf engine", timed(lambda: records.extend(engine.score(examples)))))
    engine.close()

    vllm_ratio = None
    if not args.skip_vllm and vllm_available() and not args.random_model:
        vllm_engine = VLLMEngine(build.model, args.k, max_model_len=prepared_max(examples), dtype="float32")
        vllm_engine.score(examples[:8])
        bare, engine_s = [], []
        for _ in range(3):  # alternate the two: both see the same machine noise
            bare.append(timed(lambda: bare_vllm_generate(vllm_engine.llm, examples, args.k)))
            engine_s.append(timed(lambda: vllm_engine.score(examples)))
        rows.append(("bare vLLM generate (flat_logprobs, no records)", min(bare)))
        rows.append(("vllm engine", min(engine_s)))
        vllm_ratio = min(bare) / min(engine_s)
        vllm_engine.flat_logprobs = False  # the per-position dict path older vLLMs give
        rows.append(("vllm engine, dict path (vLLM without flat_logprobs)", timed(lambda: vllm_engine.score(examples))))
        vllm_engine.close()

    blob = cache.encode_shard(records, args.k)
    import io

    import pyarrow.parquet as pq

    torch.set_num_threads(1)
    read = lambda: cache.decode_shard(pq.read_table(io.BytesIO(blob), use_threads=False), args.k)  # noqa: E731
    read()  # warm-up (first Parquet read initialises pyarrow)
    reader_s = min(timed(read) for _ in range(5))

    print(
        f"\nprior benchmark: {model_path_note}, device={args.device}, threads={args.threads}, "
        f"{len(examples)} examples, {scored} scored tokens, k={args.k}"
    )
    print("| path | seconds | scored tokens/s | vs plain |\n|---|---:|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {scored / seconds:,.0f} | {base / seconds:.2f}x |")
    print(f"| reader (decode Parquet, 1 thread) | {reader_s:.3f} | {scored / reader_s:,.0f} | |")
    if vllm_ratio is not None:
        print(f"\nvllm engine vs bare generate with flat_logprobs: {vllm_ratio:.2f}x (goal >= 0.8x)")
    print(f"\nbytes per scored token (k={args.k}): {len(blob) / scored:.1f}")
    mfu = None
    if args.random_model:  # forward FLOPs ≈ 2 × parameters × tokens (attention left out: a floor)
        peak = args.peak_tflops or (989.0 if "H100" in device_name() or "H200" in device_name() else None)
        params = sum(p.numel() for p in model.parameters())
        engine_s = dict(rows)["hf engine"]
        mfu = 2 * params * tokens / engine_s / (peak * 1e12) if peak else None
        print(f"hf engine: {tokens / engine_s:,.0f} tokens/s forward, MFU {mfu:.1%}" if mfu else "MFU: peak unknown")
    result = {
        "rows": rows,
        "reader_s": reader_s,
        "scored": scored,
        "tokens": tokens,
        "mfu": mfu,
        "vllm_vs_bare": vllm_ratio,
        "device": device_name(),
        "args": {**vars(args), "json": str(args.json)},
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def synthetic_examples(count: int, length: int, vocab: int):
    """Random token examples of about `length` tokens, the last 90% completion (no tokenizer needed)."""
    import numpy as np

    from pipeline.data.tokens import Example

    rng = np.random.default_rng(0)
    examples = []
    for i in range(count):
        n = int(rng.integers(length // 2, length + 1))
        examples.append(Example(i, rng.integers(vocab, size=n).astype(np.int32), np.arange(n) >= n // 10))
    return examples


def prepared_max(examples) -> int:
    return max(len(e.input_ids) for e in examples)


if __name__ == "__main__":
    main()
