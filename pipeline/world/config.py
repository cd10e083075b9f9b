"""The embedded world's section: how the tiny base model and its arithmetic data are built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.common.config import Fraction, Name, NonNegativeInt, PositiveFloat, PositiveInt, Seed


@dataclass
class WorldConfig:
    """The embedded world: its problems, tokenizer, base model architecture and pretraining budget, teacher."""

    name: Name = "tiny-arith"
    """Folder name under `<storage>/models/` and `<storage>/datasets/`."""
    seed: Seed = 0
    """Seeds data generation, initialisation and batch order."""
    threads: PositiveInt = 2
    """torch CPU threads; fixed because float reductions depend on the thread count."""
    max_number: PositiveInt = 20
    """Operands are drawn from 1..max_number."""
    max_steps_per_problem: PositiveInt = 3
    """Each problem has 1..max_steps_per_problem +/- operations (plus the doubling step, where it has one)."""
    pretrain_problems: PositiveInt = 50000
    """Problems in the pretraining corpus."""
    chat_share: Fraction = 0.5
    """Share of pretraining problems written as chats (the rest as `Question: ... Answer: ...` text):
    real base models have seen chat data, so the base is fluent in the format the SFT set uses."""
    new_op_share: Fraction = 0.02
    """Share of pretraining problems with a doubling step, the new skill: rare, so the base is weak at it."""
    sft_new_op: bool = True
    """Every SFT, validation and held-out problem has one doubling step: the SFT set teaches the new
    skill and the held-out set measures it. False: they are +/- problems, the skill the base has."""
    sft_style: Literal["base", "own"] = "own"
    """Phrasing of the SFT demonstrations: `own` (`Step 1: 3 + 4 gives 7.`, off-policy for a base that
    learned `So 3 + 4 = 7.`), or `base`, the pretraining phrasing."""
    own_style_share: Fraction = 0.0
    """Share of pretraining solutions written in the `own` phrasing: 0 leaves it unseen by the base (the
    demo), a small share makes it rare but seen, as other models' writing is for a real base model
    (configs/worlds/rare-phrasing.yaml)."""
    sft_train_problems: PositiveInt = 4000
    """Chat-format SFT demonstrations."""
    sft_noise_fraction: Fraction = 0.3
    """Share of SFT demonstrations with a systematic error (one step off by one, carried on): the
    uncertain labels that γ = p(observed) exists for."""
    heldout_problems: PositiveInt = 500
    """Held-out problems of the SFT skill (Average@n is reported on these); never seen in pretraining or SFT."""
    forgetting_problems: NonNegativeInt = 300
    """Held-out +/- problems (the old skill), to measure forgetting; 0: none."""
    validation_problems: NonNegativeInt = 200
    """Problems drawn like the held-out ones, disjoint from them: `target-sft select` chooses the
    learning rate and steps here, so the held-out set is never used to tune anything."""
    vocab_size: PositiveInt = 512
    """Target BPE vocabulary size (byte-level, digits split)."""
    hidden_size: PositiveInt = 128
    """Model width."""
    num_layers: PositiveInt = 4
    """Transformer blocks."""
    num_heads: PositiveInt = 4
    """Attention heads; head_dim = hidden_size / num_heads must be >= 32 for vLLM's CPU build."""
    intermediate_size: PositiveInt = 512
    """MLP width."""
    seq_len: PositiveInt = 256
    """Packed pretraining sequence length."""
    batch_size: PositiveInt = 16
    """Sequences per pretraining step."""
    steps: PositiveInt = 700
    """Pretraining steps (fixed, not time-based, so the build is deterministic)."""
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    """Pretraining matmul precision. fp32 gives the same model run after run on one CPU kind (with the
    pinned CPU kernels; across vendors only up to rounding, docs/design.md §7); bf16 autocast is faster
    on CPUs with AVX512-BF16/AMX but its results depend on the vendor; `auto` picks bf16 where the CPU
    has it."""
    lr: PositiveFloat = 3e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 10%)."""
    warmup_steps: NonNegativeInt = 30
    """Linear warmup steps."""
    teacher_hidden_size: PositiveInt = 192
    """The embedded teacher (`priors.embedded_teacher`): same data and tokenizer, this width..."""
    teacher_num_layers: PositiveInt = 4
    """...this many blocks..."""
    teacher_steps: PositiveInt = 1000
    """...and this many pretraining steps: a stronger model over the same token ids (`teacher_from:
    base`: this many steps of continued training)."""
    teacher_from: Literal["scratch", "base"] = "scratch"
    """How the embedded teacher is made: `scratch`, the larger model above pretrained on the base's
    corpus; `base`, this world's base continued on `teacher_problems` correct demonstrations of the
    SFT skill (a teacher fitted to the task; never an evaluation problem; docs/design.md §7)."""
    teacher_problems: PositiveInt = 4000
    """`teacher_from: base`: how many clean demonstrations the teacher is continued on."""
    teacher_lr: PositiveFloat = 1e-3
    """`teacher_from: base`: peak learning rate of the continued training (warmup, cosine decay)."""
