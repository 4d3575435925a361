"""The LightningDataModule: load preference rows, check them, tokenize once, pad per batch.

Rows come from `prefopt.train.sources` (a file, a directory or a hub name); their format (standard, implicit prompt or
unpaired; text or conversational) is detected from the columns, or forced by `format` (`prefopt.train.formats`), and
every row is checked before anything trains: a bad row is an error naming the source, row and field (or, with
`bad_rows: skip`, dropped and counted).

Each example is tokenized once (`prefopt.train.encoding`: prompt ids, then each completion's ids and eos, so the
prompt/completion boundary is exact and no mask is inferred from token values) and cached by `datasets`.

Truncation (documented modes): the prompt is first cut to `max_prompt_length` keeping its end
(`truncation_mode="keep_end"`, the default: the end of a prompt is what the response answers) or its start
(`"keep_start"`); then each completion is cut to `max_length - len(prompt)` keeping its start. An example whose
prompt alone fills `max_length`, or whose chosen and rejected completions are identical, is dropped, and the counts
are logged (a warning when anything is dropped) and kept in `drop_counts`.

Batches (see `prefopt.logps`): paired data gives 2B rows, chosen rows then rejected rows. For losses on unpaired
data (KTO), each pair becomes two rows (chosen: desirable, rejected: undesirable), shuffled together so that batches
mix labels, and each batch appends B mismatched rows (prompt i with the completion of row i+1) for the KL estimate.
Unpaired source data (prompt/completion/label) trains unpaired losses only, on its rows as they are.
Validation batches are always paired, so every loss is measured on the same pairs with the same metrics; for
unpaired source data the validation pairs are its held-out rows regrouped: per prompt, desirable with undesirable.
"""

from __future__ import annotations

from collections import Counter
import logging
import dataclasses
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from prefopt.train import encoding, formats
from prefopt.train.batching import (
    EpochSeededSampler, LengthGroupedSampler, ResumableDataLoader, collate_rows, with_extras, with_index,
)
from prefopt.train.formats import DataError
from prefopt.train.builtin import BUILTIN, DATASETS, GoldData, OnlinePairs, source
from prefopt.train.chunks import staged_sampler
from prefopt.train.models import load_tokenizer
from prefopt.train.rows import Unpairing, prompt_coin, regroup_pairs, unpaired_rows
from prefopt.train.sources import load_rows

log = logging.getLogger(__name__)


class PreferenceDataModule(L.LightningDataModule):
    def __init__(
        self,
        dataset: str = BUILTIN,
        subset: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        val_fraction: float = 0.05,
        columns: dict[str, str] | None = None,
        format: formats.Format = "auto",
        assistant_marker: str = "Assistant:",
        chat_template: str | None = None,
        bad_rows: Literal["error", "skip"] = "error",
        tokenizer: str = BUILTIN,
        max_length: int = 64,
        max_prompt_length: int | None = None,
        truncation_mode: Literal["keep_end", "keep_start"] = "keep_end",
        max_train_pairs: int | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        num_proc: int | None = None,
        share_prompt: bool = False,
        group_by_length: int = 0,
        stages: int = 1,
        unpaired: bool = False,
        unpairing: Unpairing | None = None,
        scores: bool = False,
        extras: bool = False,
        labels: bool = True,
        seed: int = 0,
        gold: GoldData | None = None,
        online: OnlinePairs | None = None,
    ) -> None:
        """
        Args:
            dataset: "gold" (the built-in task), a local file (.jsonl/.json/.parquet/.csv), a `save_to_disk`
                directory, a dataset directory laid out as on the hub, or a hub dataset name.
            subset: the hub dataset's config name, if it has several.
            train_split: split used for training.
            val_split: split used for validation (or the path of a separate file); None holds out `val_fraction`
                of the training rows (seeded; for unpaired data, that fraction of its prompts with all their rows).
            val_fraction: fraction held out when there is no validation split, in (0, 1).
            columns: map from prefopt's field names (prompt, chosen, rejected, completion, label) to the dataset's
                column names, e.g. {prompt: question, chosen: good, rejected: bad}.
            format: "auto" detects it from the columns (prefopt/train/formats.py); or force "standard" (prompt, chosen,
                rejected), "implicit_prompt" (chosen and rejected transcripts; the prompt is their shared start) or
                "unpaired" (prompt, completion, boolean label; unpaired losses only). Text or conversational
                (lists of {role, content} messages) is read from the column types.
            assistant_marker: implicit prompts of text transcripts end just after the last occurrence of this
                marker in the text chosen and rejected share ("Assistant:" for Anthropic/hh-rlhf).
            chat_template: a Jinja chat template (or the path of a file holding one) replacing the tokenizer's,
                for conversational data; None uses the tokenizer's own.
            bad_rows: a row that fails a check (wrong type, empty completion, non-boolean label, malformed
                messages, no findable prompt, a template that breaks the prompt prefix): "error" stops before
                training, naming the source, row and field of the first and counting the rest; "skip" drops them
                and logs the count and the first few reasons.
            tokenizer: tokenizer name or path (linked to `model.model` by the CLI).
            max_length: maximum tokens of prompt + completion.
            max_prompt_length: maximum prompt tokens (None: no separate limit).
            truncation_mode: which end of a too-long prompt to keep.
            max_train_pairs: use only the first N training pairs (rows, for unpaired data): a data-size axis.
            batch_size: pairs per training batch. Unpaired losses get 2 x batch_size rows per batch (both responses
                of batch_size pairs), so every loss sees the same number of responses per step.
            val_batch_size: pairs per validation batch (default: batch_size).
            num_workers: DataLoader worker processes.
            num_proc: processes for tokenizing (datasets' map); None: one.
            share_prompt: paired training batches hold one row prompt + chosen + rejected per pair, so the prompt is
                computed once (prefopt/fast/prefix_sharing.py); the loss is unchanged up to float rounding. Validation
                batches and unpaired losses keep the two-row layout.
            group_by_length: 0: off; k >= 1: sort each window of k training batches by length and cut it into
                batches again, then shuffle the batches (prefopt/train/batching.py): less padding, less varied batches.
            stages: sDPO's data in chunks (`prefopt.train.chunks`): stage t of T trains on the t-th of T chunks of the
                pairs, with the reference reset at its start (model.reference_update every max_steps / T, alpha 1).
            unpaired: train on unpaired (prompt, completion, label) rows (set by the CLI from the loss's metadata).
            unpairing: which rows pairs give an unpaired loss (imbalanced or unrelated; `prefopt.train.rows`).
            scores: read the responses' scores (fields chosen_score and rejected_score, mapped with `columns`; on the
                built-in task, its exact gold rewards); set by the CLI when the loss reads them.
            extras: read further responses per prompt (field extra, a list per row, the same count in every row; with
                scores, extra_scores too; on the built-in task, `gold.extra_responses`); set by the CLI when the loss
                reads them (TPO's gold response, InfoNCA with K responses).
            labels: the loss reads which response is chosen (set by the CLI); False: only the scores, so on-policy
                rounds (`online`) spend no labels on it.
            seed: the run's seed (linked to `seed_everything`): it redraws the built-in task's pairs and the order.
            gold: pair sampling of the built-in task.
            online: train each epoch (a round) on responses sampled from the policy as it is at the round's start,
                to the built-in task's prompts or the data's (`prefopt.train.online`; needs
                trainer.reload_dataloaders_every_n_epochs: 1). The offline pairs still give the validation pairs (and a
                learned reward model's training pairs).
        """
        super().__init__()
        if max_length < 2 or stages < 1:
            raise DataError(f"data.max_length must be at least 2 and data.stages at least 1, got {max_length}, {stages}")
        if not 0 < val_fraction < 1:
            raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        unknown = set(columns or {}) - set(formats.FIELDS)
        if unknown:
            raise DataError(f"data.columns: unknown field(s) {sorted(unknown)}; fields: {', '.join(formats.FIELDS)}")
        self.save_hyperparameters()
        self.gold, self.unpairing, self.online = gold or GoldData(), unpairing, online  # hparams hold dicts
        self.rounds, self._resumed_round = None, None  # on-policy rounds (`online`): their state, one restored
        self.tokenizer = None
        self.train_examples: list[dict[str, Any]] = []  # pairs: prompt_ids, chosen_ids, rejected_ids
        self.val_examples: list[dict[str, Any]] = []
        self.train_rows: list[dict[str, Any]] | None = None  # unpaired source data: prompt/completion ids, desirable
        self.layout: formats.Layout | None = None
        self.drop_counts: dict[str, dict[str, int]] = {}
        self.extra_count = 0  # further responses per pair (`extras`), the same in every row

    # ---------------------------------------------------------------- loading
    def _sources(self) -> tuple[Any, Any, str, str]:
        """(train rows, validation rows or None, train source name, val source name)."""
        hp = self.hparams
        if hp.dataset in DATASETS:  # made in code (prefopt.train.builtin), with the data's options for it
            train_path, val_path = source(DATASETS, hp.dataset)(seed=hp.seed, **dataclasses.asdict(self.gold))
            return load_rows(str(train_path)), load_rows(str(val_path)), str(train_path), str(val_path)
        train = load_rows(hp.dataset, hp.subset, hp.train_split)
        name = hp.dataset if hp.train_split == "train" else f"{hp.dataset}[{hp.train_split}]"
        if hp.val_split is None:
            return train, None, name, name
        if Path(hp.val_split).expanduser().is_file():  # a separate validation file
            return train, load_rows(hp.val_split), name, hp.val_split
        return train, load_rows(hp.dataset, hp.subset, hp.val_split), name, f"{hp.dataset}[{hp.val_split}]"

    def _load_tokenizer(self):
        hp = self.hparams
        tok = load_tokenizer(hp.tokenizer)
        if hp.chat_template is not None:
            tok.chat_template = formats.read_chat_template(hp.chat_template)
        return tok

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        hp = self.hparams
        self.tokenizer = self._load_tokenizer()
        train, val, train_name, val_name = self._sources()
        columns, extras = hp.columns or {}, hp.extras and self.online is None  # online: the rounds give extras
        if hp.dataset in DATASETS:  # the built-in task's pair files hold the exact gold rewards
            columns = {"chosen_score": "chosen_reward", "rejected_score": "rejected_reward",
                       "extra_scores": "extra_rewards", **columns}
            if extras and not self.gold.extra_responses:
                raise DataError("this loss reads further responses per prompt: set data.gold.extra_responses (1 for "
                                "TPO's gold response, K - 2 for InfoNCA with K responses)")
        layout = formats.detect_layout(train.features, columns, train_name, hp.format, rows=train, scores=hp.scores,
                                       extras=extras)
        if layout.conversational and not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"{train_name} is conversational (lists of messages) but the tokenizer of "
                            f"{hp.tokenizer!r} has no chat template; set data.chat_template to one")
        if not layout.paired and not hp.unpaired:
            raise DataError(f"{train_name} holds unpaired rows (prompt, completion, label): it trains unpaired losses "
                            "(e.g. kto) only; this loss needs chosen/rejected pairs")
        encode = dict(tokenizer=self.tokenizer, marker=hp.assistant_marker, num_proc=hp.num_proc)
        train = self._check_errors(encoding.encode(train, layout, source=train_name, **encode), train_name)
        if val is None and not layout.paired:  # hold out whole prompts, so that validation pairs can be regrouped
            coins = [prompt_coin(p, hp.seed) for p in train["prompt_ids"]]
            threshold = max(hp.val_fraction, min(coins))  # at least one prompt, however small the data
            held = [c <= threshold for c in coins]
            val = train.select([i for i, h in enumerate(held) if h])
            train = train.select([i for i, h in enumerate(held) if not h])
        elif val is None:
            split = train.train_test_split(test_size=hp.val_fraction, seed=hp.seed)
            train, val = split["train"], split["test"]
        else:
            val_layout = formats.detect_layout(val.features, columns, val_name, layout.structure, rows=val,
                                               scores=hp.scores, extras=extras)
            val = self._check_errors(encoding.encode(val, val_layout, source=val_name, **encode), val_name)
        if hp.max_train_pairs is not None:
            train = train.select(range(min(hp.max_train_pairs, len(train))))
        self.layout = layout
        if extras:  # the further responses' count per pair: what most rows have (a row that differs is named)
            self.extra_count = max(Counter(len(x) for x in train["extra_ids"] if x).items(), key=lambda kv: kv[1],
                                   default=(0, 0))[0]
        train_out, val_out = self._truncate(train, train_name, "train"), self._truncate(val, val_name, "val")
        if layout.paired:
            self.train_examples, self.val_examples = train_out, val_out
            for i, example in enumerate(self.train_examples):
                example["index"] = i
        else:
            self.train_rows, self.val_examples = train_out, regroup_pairs(val_out, val_name)
        if not train_out:
            raise DataError(f"no usable training examples left in {train_name} (see the logged counts)")
        if not self.val_examples:
            why = "" if layout.paired else ": unpaired rows are validated as pairs, and no held-out prompt has " \
                "both a desirable and an undesirable row"
            raise DataError(f"no usable validation examples in {val_name}{why} (see the logged counts)")

    def _check_errors(self, encoded: Any, name: str) -> Any:
        """Raise on rows that failed a check (`bad_rows: error`), or log them (`skip`; `_truncate` drops them)."""
        errors = [e for e in encoded["error"] if e]
        if errors and self.hparams.bad_rows == "error":
            more = f" ({len(errors) - 1} more rows fail checks; data.bad_rows: skip drops them)" * (len(errors) > 1)
            raise DataError(errors[0] + more)
        if errors:
            log.warning("%s: skipping %d rows that fail checks, e.g.\n  %s", name, len(errors), "\n  ".join(errors[:3]))
        return encoded

    def _truncate(self, encoded: Any, name: str, split: str) -> list[dict[str, Any]]:
        """Cut prompts and completions to the length limits; drop (and count) what cannot be kept."""
        hp = self.hparams
        names = ("chosen_ids", "rejected_ids") if self.layout.paired else ("completion_ids",)
        out, too_long_prompt, identical, truncated, bad = [], [], 0, 0, 0
        rows = (dict(zip(batch, values)) for batch in encoded.iter(batch_size=1024) for values in zip(*batch.values()))
        for ex in rows:  # batched reads: row-by-row reads of an arrow table are ~10x slower
            if ex["error"]:  # logged by _check_errors
                bad += 1
                continue
            if self.layout.paired and ex["chosen_ids"] == ex["rejected_ids"]:  # identical rows come out empty
                identical += 1
                continue
            prompt = ex["prompt_ids"]
            if hp.max_prompt_length is not None and len(prompt) > hp.max_prompt_length:
                keep = hp.max_prompt_length
                prompt = prompt[-keep:] if hp.truncation_mode == "keep_end" else prompt[:keep]
            room = hp.max_length - len(prompt)
            if room < 1:
                too_long_prompt.append(ex["row"])
                continue
            cut = {n: ex[n][:room] for n in names}
            truncated += any(len(ex[n]) > room for n in names)
            if self.layout.paired and cut["chosen_ids"] == cut["rejected_ids"]:
                identical += 1
                continue
            example = {"prompt_ids": prompt, **cut, **{f: ex[f] for f in formats.SCORES if f in ex}}
            if "extra_ids" in ex:
                example |= self._extras(ex, room, name)
            if not self.layout.paired:
                example["desirable"] = ex["desirable"]
            out.append(example)
        examples = f" (e.g. rows {[r + 1 for r in too_long_prompt[:5]]}, counting from 1)" if too_long_prompt else ""
        log.log(
            logging.WARNING if too_long_prompt or identical or bad else logging.INFO,
            "%s (%s): %d %s kept; %d truncated; dropped %d whose prompt fills max_length=%d%s, %d with identical "
            "chosen and rejected completions and %d that fail checks", name, split, len(out),
            "pairs" if self.layout.paired else "rows", truncated, len(too_long_prompt), hp.max_length, examples,
            identical, bad,
        )
        self.drop_counts[split] = {"prompt_too_long": len(too_long_prompt), "identical": identical,
                                   "truncated": truncated, "bad_rows": bad}
        return out

    def _extras(self, ex: dict[str, Any], room: int, name: str) -> dict[str, Any]:
        """A row's further responses cut to `room` tokens, and their scores; every row must have `extra_count`."""
        count = len(ex["extra_ids"])
        if count != self.extra_count:
            raise DataError(f"{name}: row {ex['row'] + 1} (counting from 1), field {formats.EXTRA!r}: {count} further "
                            f"responses where most rows have {self.extra_count}; every row needs the same number")
        out = {"extra_ids": [ids[:room] for ids in ex["extra_ids"]]}
        return out | ({formats.EXTRA_SCORES: ex[formats.EXTRA_SCORES]} if formats.EXTRA_SCORES in ex else {})

    # ---------------------------------------------------------------- batching
    def collate_pairs(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [e["prompt_ids"] for e in examples]
        completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        batch = collate_rows(prompts + prompts, completions, self.tokenizer.pad_token_id)
        return with_extras(with_index(batch, examples), examples, self.tokenizer.pad_token_id)

    def collate_shared_pairs(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        """One row prompt + chosen + rejected per pair (`share_prompt`); see prefopt/fast/prefix_sharing.py."""
        from prefopt.fast.prefix_sharing import collate_shared_pairs

        batch = collate_shared_pairs([e["prompt_ids"] for e in examples], [e["chosen_ids"] for e in examples],
                                     [e["rejected_ids"] for e in examples], self.tokenizer.pad_token_id)
        return with_extras(with_index(batch, examples), examples, self.tokenizer.pad_token_id)

    def collate_unpaired(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        # Mismatched rows for the KL estimate: prompt i with the completion of row i+1 (needs a batch of 2+).
        shifted = completions[1:] + completions[:1]
        kl = [c[: max(1, self.hparams.max_length - len(p))] for p, c in zip(prompts, shifted)]
        batch = collate_rows(prompts + prompts, completions + kl, self.tokenizer.pad_token_id)
        batch["desirable"] = torch.tensor([r["desirable"] for r in rows], dtype=torch.bool)
        return batch

    def unpaired_rows(self) -> list[dict[str, Any]]:
        """Unpaired source data's rows, or the training pairs' (`prefopt.train.rows`, as `unpairing` says)."""
        if self.train_rows is not None:
            return self.train_rows
        return unpaired_rows(self.train_examples, self.unpairing, self.hparams.seed)

    @property
    def builtin_task(self) -> bool:
        """The data is the built-in task's (what its evaluation, `prefopt.gold.evaluation`, needs)."""
        return self.hparams.dataset == BUILTIN

    @property
    def pairs_change(self) -> bool:
        """The training pairs change during the run (`online`): no table keyed by their position stays valid."""
        return self.online is not None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.rounds is None else {"online": self.rounds.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed_round = state.get("online")

    @property
    def shares_prompts(self) -> bool:
        """Training batches are prompt-shared: paired training with `share_prompt` (unpaired rows never are)."""
        return bool(self.hparams.share_prompt and not self.hparams.unpaired)

    def example_lengths(self, data: list[dict[str, Any]]) -> list[int]:
        """Padded width each example needs in a training batch (what `group_by_length` sorts by)."""
        if self.hparams.unpaired:
            return [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in data]
        if self.shares_prompts:
            from prefopt.fast.prefix_sharing import shared_row_length

            return [shared_row_length(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in data]
        return [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in data]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if self.online is not None:  # a round: pairs from the policy as it is now
            from prefopt.train.online import next_round

            self.train_examples = next_round(self)
        if hp.unpaired:
            data, collate, rows = self.unpaired_rows(), self.collate_unpaired, 2 * hp.batch_size
        else:
            collate = self.collate_shared_pairs if self.shares_prompts else self.collate_pairs
            data, rows = self.train_examples, hp.batch_size
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if hp.stages > 1:
            sampler = staged_sampler(self, len(data), rows, rank, world)
        elif hp.group_by_length:
            sampler = LengthGroupedSampler(self.example_lengths(data), rows, hp.group_by_length, hp.seed, rank, world)
        else:
            sampler = EpochSeededSampler(len(data), hp.seed, rank, world)
        if trainer is not None:  # resuming mid-epoch: skip the batches this epoch already trained on
            sampler.epoch = self.trainer.current_epoch
            loop = self.trainer.fit_loop.epoch_loop  # (a reload at a new epoch sees the last epoch's count: no skip)
            sampler.skip = loop.batch_progress.current.processed * rows if loop.restarting else 0
        return ResumableDataLoader(data, batch_size=rows, sampler=sampler, collate_fn=collate,
                          num_workers=hp.num_workers, drop_last=hp.unpaired)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.val_examples, batch_size=hp.val_batch_size or hp.batch_size,
                          collate_fn=self.collate_pairs, num_workers=hp.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
