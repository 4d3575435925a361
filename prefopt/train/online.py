"""On-policy pairs: each round trains on pairs sampled from the policy as it was when the round began (#20).

`data.online: {pairs_per_round: N}` on the built-in task, with `trainer.reload_dataloaders_every_n_epochs: 1`: every
training epoch is a round. When Lightning asks the DataModule for the epoch's dataloader, two responses per pair are
sampled from the current policy on the training prompts (the evaluation's sampler, `prefopt.gold.sampling`, with its
key/value cache) and labelled by the task's labeler (`prefopt.gold.pairs.Labeler`: Bradley-Terry on the gold reward
at data.gold.label_temperature, with the data's scenario knobs); they are the round's training pairs, and every loss
trains on them as it would on offline pairs. Labels used and responses sampled are counted (logged at each validation
as val/online/labels_used, val/online/samples_drawn, val/online/round); the round's pairs and the sampling streams
ride in checkpoints, so a resumed run continues the round it was in. The reference's log-probs of the pairs change
every round: the module reads the reference live (`PreferenceDataModule.pairs_change`). The first round samples the
starting policy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefopt.gold import task
from prefopt.gold.build import _derive_seed
from prefopt.gold.pairs import Labeler
from prefopt.gold.sampling import _prompt_ids, sample_responses
from prefopt.train.builtin import OnlinePairs


class Rounds:
    """The rounds' state: the current round's pairs, the label budget spent, and the sampling and labelling streams."""

    def __init__(self, options: OnlinePairs, labeler: Labeler, seed: int) -> None:
        self.options, self.labeler = options, labeler
        self.round, self.labels_used, self.samples_drawn = 0, 0, 0
        self.examples: list[dict[str, Any]] | None = None  # the current round's pairs
        self.epoch: int | None = None  # the training epoch they are for
        self.sampler = torch.Generator().manual_seed(_derive_seed(seed, "online-samples"))
        self.labels = torch.Generator().manual_seed(_derive_seed(seed, "online-labels"))
        self.noise = torch.Generator().manual_seed(_derive_seed(seed, "online-noise"))

    def next_round(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int,
                   scores: bool = False) -> list[dict[str, Any]]:
        """The next round's pairs (prompt_ids, chosen_ids, rejected_ids, index; with `scores`, the gold rewards as
        chosen_score and rejected_score), sampled from `policy` now. A pair whose responses are identical, or one of
        them empty, is not labelled (its samples still count)."""
        per_topic = math.ceil(self.options.pairs_per_round / len(task.TRAIN_TOPICS))
        with torch.no_grad():
            responses = sample_responses(policy, tokenizer, task.TRAIN_TOPICS, 2 * per_topic, self.sampler,
                                         max_new_tokens=self.options.max_new_tokens)
        vocab, eos = tokenizer.get_vocab(), tokenizer.eos_token_id
        prompts = {t: _prompt_ids(tokenizer, t) for t in task.TRAIN_TOPICS}
        examples = []
        for (topic, a, a_ended), (_, b, b_ended) in zip(responses[0::2], responses[1::2]):
            ids = [[vocab[w] for w in words] + ([eos] if ended else []) for words, ended in ((a, a_ended), (b, b_ended))]
            room = max_length - len(prompts[topic])
            ids = [x[:room] for x in ids]
            if not ids[0] or not ids[1] or ids[0] == ids[1]:
                continue
            r_a, r_b = task.gold_reward(topic, a), task.gold_reward(topic, b)
            a_wins, _ = self.labeler.a_wins(a, b, r_a, r_b, self.labels, self.noise)
            (chosen, r_chosen), (rejected, r_rejected) = ((ids[0], r_a), (ids[1], r_b))[:: 1 if a_wins else -1]
            example = {"prompt_ids": prompts[topic], "chosen_ids": chosen, "rejected_ids": rejected,
                       "index": len(examples)}
            if scores:
                example |= {"chosen_score": r_chosen, "rejected_score": r_rejected}
            examples.append(example)
        self.round += 1
        self.samples_drawn += len(responses)
        self.labels_used += len(examples)
        self.examples = examples
        return examples

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "labels_used": self.labels_used, "samples_drawn": self.samples_drawn,
                "examples": self.examples, "epoch": self.epoch, "sampler": self.sampler.get_state(), "labels": self.labels.get_state(),
                "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.labels_used, self.samples_drawn = state["round"], state["labels_used"], state["samples_drawn"]
        self.examples, self.epoch = state["examples"], state["epoch"]
        for name in ("sampler", "labels", "noise"):
            getattr(self, name).set_state(state[name])


def next_round(datamodule: Any) -> list[dict[str, Any]]:
    """The training pairs for the epoch about to start (`PreferenceDataModule.train_dataloader`): on a resume, the
    round the checkpoint was in; otherwise a new round sampled from the policy as it is now. What rounds need is
    checked before the first is drawn."""
    from prefopt.train.formats import DataError

    if datamodule.rounds is None:
        hp, gold, trainer = datamodule.hparams, datamodule.gold, datamodule.trainer
        problems = [why for bad, why in (
            (not datamodule.builtin_task, "samples the built-in task's prompts and labels them with its gold reward: "
                                          "set data.dataset: gold"),
            (hp.extras, "has no further responses per prompt for this loss (TPO, InfoNCA with K) to read"),
            (gold.rejected_edits or gold.excluded_words, "takes the policy's responses as they are: set "
                                                         "data.gold.rejected_edits: 0 and excluded_words: []"),
            (trainer is None or trainer.reload_dataloaders_every_n_epochs != 1,
             "draws a round per epoch: set trainer.reload_dataloaders_every_n_epochs: 1"),
        ) if bad]
        if problems:
            raise DataError("data.online " + "; it ".join(problems))
        labeler = Labeler(temperature=gold.label_temperature, label_flip=gold.label_flip, length_bias=gold.length_bias)
        datamodule.rounds = Rounds(datamodule.online, labeler, hp.seed)
    rounds, trainer, hp = datamodule.rounds, datamodule.trainer, datamodule.hparams
    if datamodule._resumed_round is not None:
        rounds.load_state_dict(datamodule._resumed_round)
        datamodule._resumed_round = None
    # Lightning asks for the dataloader more often than once an epoch (at the start of the fit and of its first
    # epoch, and once more after the last step): a round is drawn once per epoch, and never after the last step.
    done = 0 <= trainer.max_steps <= trainer.global_step
    if rounds.examples is not None and (rounds.epoch == trainer.current_epoch or done):
        return rounds.examples
    rounds.epoch = trainer.current_epoch
    return rounds.next_round(trainer.lightning_module.policy, datamodule.tokenizer, hp.max_length, hp.scores)
