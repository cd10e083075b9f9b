"""Random-initialised Qwen2-shaped models for the benchmarks and the GPU suite (no download)."""

from __future__ import annotations

# vocab, hidden, layers, attention heads, key/value heads, MLP width
SHAPES = {
    "tiny": (1024, 64, 2, 2, 1, 128),  # smoke runs
    "0.5b": (151936, 896, 24, 14, 2, 4864),  # Qwen2.5-0.5B
    "1.5b": (151936, 1536, 28, 12, 2, 8960),  # Qwen2.5-1.5B
}


def random_qwen2(shape: str, attn: str = "sdpa"):
    """A Qwen2ForCausalLM of `shape` with random weights, in fp32 on the CPU (move it yourself)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab, hidden, layers, heads, kv, ffn = SHAPES[shape]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=ffn,
        tie_word_embeddings=True,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(config)
