"""Target-SFT inside TRL's `SFTTrainer`: cached priors on TRL's batches, the fused Q-target loss.

    from pipeline.entry.stages import cached_priors
    from pipeline.training.trl_integration import TargetSFTTrainer
    priors = cached_priors(cfg)                      # the set `target-sft priors` made for these rows
    trainer = TargetSFTTrainer(model=model, args=SFTConfig(...), train_dataset=dataset,
                               processing_class=tokenizer, target=preset("target_sft", eta=0.5), priors=priors)

The dataset is the config's data rows in order (TRL's prompt/completion or messages form). A `row`
column (added when missing) travels through TRL's preparation to the collator, which looks the row's
prior record up, checks TRL's token ids and trained positions against the tokenisation the prior
set was captured on, and aligns the prior with `labels[:, 1:]` (docs/design.md §3). The loss is
`fused_q_target_loss` on the final hidden states, divided by `num_items_in_batch` as TRL's own is.
Needs the `trl` extra (trl, accelerate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from trl import SFTTrainer

from pipeline.common.errors import ConfigError, PriorError, TargetError
from pipeline.common.models import load_model_config
from pipeline.common.prior_schema import Prior, PriorRecord
from pipeline.core.loss import fused_q_target_loss
from pipeline.core.targets import IGNORE, TargetSpec
from pipeline.data.tokens import Example
from pipeline.priors import capture as prior_stage
from pipeline.priors.cache import PriorStore
from pipeline.priors.engines import aligned_priors, drop_ids_beyond, first_difference, scored_positions

ROW = "row"
"""The column that carries a dataset row's index to the collator."""


@dataclass
class CachedPriors:
    """A prior set, and this pipeline's tokenisation of the rows it was captured on."""

    key: str
    examples: dict[int, Example]
    records: dict[int, PriorRecord]

    @classmethod
    def open(cls, job: prior_stage.CaptureJob, key: str | None = None) -> CachedPriors:
        """The set `job` captures (`target-sft priors`), or `key` (an import): from the whole config,
        `pipeline.entry.stages.cached_priors(cfg)`."""
        plan = prior_stage.plan(job)
        key = key or plan.key
        reader = PriorStore(job.root).open(key)
        recorded = reader.manifest["key_inputs"]
        if (recorded["dataset_fingerprint"], recorded["tokenizer_sha256"]) != (
            plan.prepared.fingerprint,
            plan.prepared.tokenizer_hash,
        ):
            raise PriorError(f"prior set {key} was captured on other rows or another tokenizer than {job.data_path}")
        records = reader.load_all()
        rows = load_model_config(job.model_path, job.model.trust_remote_code).vocab_size
        drop_ids_beyond(records, rows)  # a wider teacher's extra ids are no logit of the student
        return cls(key, {e.index: e for e in plan.prepared.examples}, records)

    def check(self, row: int, input_ids: Sequence[int], labels: Sequence[int]) -> None:
        """TRL's tokens and trained positions for `row` must be the ones the prior was captured on."""
        ours = self.examples.get(row)
        if ours is None:
            raise PriorError(
                f"row {row} has no prior in set {self.key} (the data dropped it, or it lies beyond data.limit); "
                "train on the rows the set was captured on"
            )
        theirs = np.asarray(input_ids, dtype=np.int64)
        mine = ours.input_ids.astype(np.int64)
        if len(theirs) != len(mine) or not np.array_equal(theirs, mine):
            at = first_difference(theirs.tolist(), mine.tolist())
            raise PriorError(
                f"row {row}, position {at}: TRL's tokenisation ({len(theirs)} tokens) differs from the prior set's "
                f"({len(mine)}); use the same tokenizer, chat template and max_length (truncation) as the capture"
            )
        trained = np.nonzero(np.asarray(labels[1:]) != IGNORE)[0]
        scored = scored_positions(ours)
        if not np.array_equal(trained, scored):
            raise PriorError(
                f"row {row}: TRL trains on {len(trained)} positions, the prior set scores {len(scored)}; "
                "train on the completion only (prompt/completion rows, completion_only_loss=True)"
            )


class PriorCollator:
    """TRL's collator, plus the prior tensors of each row aligned with `labels[:, 1:]`."""

    def __init__(self, base: Callable[[list[dict[str, Any]]], dict[str, Any]], priors: CachedPriors) -> None:
        self.base, self.priors = base, priors

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [int(f.pop(ROW)) for f in features]
        for row, f in zip(rows, features, strict=True):
            self.priors.check(row, f["input_ids"], f["labels"])
        batch = self.base(features)
        prior = aligned_priors(
            [self.priors.records[r] for r in rows],
            [len(f["input_ids"]) for f in features],
            batch["input_ids"].shape[1] - 1,
        )
        batch.update(prior_ids=prior.ids, prior_logprobs=prior.logprobs, prior_obs_logprob=prior.obs_logprob)
        return batch


class TargetSFTTrainer(SFTTrainer):
    """`SFTTrainer` whose loss is the fused Q-target loss of `target` (with `priors` where it needs them)."""

    def __init__(
        self,
        *args: Any,
        target: TargetSpec,
        priors: CachedPriors | None = None,
        tail: str = "student_tail",
        chunk_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        if target.needs_prior and priors is None:
            raise TargetError(
                f"target {target.name!r} needs priors: pass priors=cached_priors(cfg) (pipeline.entry.stages)"
            )
        if priors is not None:
            for split in ("train_dataset", "eval_dataset"):
                if kwargs.get(split) is not None:
                    kwargs[split] = with_row_index(kwargs[split], split)
        super().__init__(*args, **kwargs)
        if priors is not None:
            if getattr(self.args, "packing", False) or getattr(self.args, "padding_free", False):
                raise ConfigError(
                    "TargetSFTTrainer with priors takes padded batches: set packing=False, padding_free=False"
                )
            self.data_collator = PriorCollator(self.data_collator, priors)
        self.target, self.tail, self.chunk_size = target, tail, chunk_size

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None and ROW not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW]  # keep the row index for the collator

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        labels = inputs.pop("labels")
        prior = None
        if "prior_ids" in inputs:
            prior = Prior(inputs.pop("prior_ids"), inputs.pop("prior_logprobs"), inputs.pop("prior_obs_logprob"))
            prior = prior.map(lambda t: t.flatten(0, 1))
        # through the (possibly DDP-wrapped) model, so gradients synchronise; one logit row, not [B, T, V]
        outputs = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = outputs.hidden_states[-1][:, :-1].flatten(0, 1)
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        loss = fused_q_target_loss(
            hidden,
            head.weight,
            labels[:, 1:].flatten(),
            self.target,
            prior=prior,
            bias=head.bias,
            tail=self.tail,  # type: ignore[arg-type]
            reduction="mean",
            num_items=num_items_in_batch,
            chunk_size=self.chunk_size,
        ).loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer does: DDP averages the gradients
        return (loss, outputs) if return_outputs else loss


def with_row_index(dataset: Any, split: str) -> Any:
    """`dataset` with the `row` column the collator matches priors by: added as 0..n-1, or checked
    where the caller set it.

    Raises:
        ConfigError: not a map-style `datasets.Dataset` (an IterableDataset has no row index), or a
            `row` column that does not hold integer row indices.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise ConfigError(
            f"{split} is a {type(dataset).__name__}; with priors, TargetSFTTrainer needs a map-style datasets.Dataset "
            "(rows are matched to their priors by index): load it without streaming"
        )
    if ROW not in dataset.column_names:
        return dataset.add_column(ROW, list(range(len(dataset))))
    dtype = getattr(dataset.features[ROW], "dtype", None)
    if dtype not in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        raise ConfigError(
            f"{split} has a {ROW!r} column of {dtype or type(dataset.features[ROW]).__name__}; TargetSFTTrainer uses "
            f"{ROW!r} for the integer row index the priors were captured on: rename or drop that column"
        )
    return dataset


def as_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """A `messages` row as TRL's conversational prompt/completion: the last assistant turn is the
    completion, so TRL trains on it alone, as this pipeline does."""
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}
