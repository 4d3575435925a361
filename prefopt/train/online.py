"""On-policy rounds: each round trains on responses sampled from the policy as it was when the round began (#20).

`data.online: {pairs_per_round: N}`, with `trainer.reload_dataloaders_every_n_epochs: 1`: every training epoch is a
round (every `epochs_per_round` epochs: a round's examples then train that many epochs, for a smaller label budget at
the same steps). When Lightning asks the DataModule for the epoch's dataloader, K responses
(`responses_per_prompt`, 2 by default) per drawn prompt are sampled from the current policy and scored by the round's
reward (`data.online.reward`, `prefopt.train.rewards`: the gold reward, a learned reward model, a reward model's
directory, or a user's function). On the built-in task the prompts are its 8 training topics' (N / 8 draws each) and
the sampler is its evaluation's (`prefopt.gold.sampling`, with its key/value cache); on real data they are the next N
of a seeded order of the data's distinct training prompts, sampled by the same loop for prompts of any length
(`prefopt.train.generation`), and scored by a reward model or a function (there is no gold reward).
For a loss that reads labels, the first two are a pair labelled by the task's labeler (`prefopt.gold.pairs.Labeler`:
Bradley-Terry on the reward at data.gold.label_temperature, with the data's scenario knobs; a pair of identical
responses is not labelled): online DPO, and iterative DPO with `model.reference_update`. For a loss that reads only
scores (`labels=False`: RLOO, InfoNCA), the K responses are kept as they were drawn, with their rewards as scores,
and no label is spent. The further K - 2 responses are the record's extras.

Counted and logged at each validation as val/online/*: rounds, responses sampled, labels used (the labeler's, and
those a learned reward model was trained on) and reward queries (responses whose reward a loss read, or that a reward
model or function scored), with a learned reward's accuracy and gold correlation. The round's examples and the
sampling streams ride in checkpoints, so a resumed run continues the round it was in. The reference's log-probs of
the examples change every round: the module reads the reference live (`PreferenceDataModule.pairs_change`). The first
round samples the starting policy. An on-policy loss (RLOO) needs each round to fit in one batch: its samples are
then never older than the step that trains on them.
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
from prefopt.train.formats import DataError
from prefopt.train.generation import sample_continuations
from prefopt.train.rewards import Reward, Sample, gold_reward, make_reward


class Rounds:
    """The rounds' state: the current round's examples, the budgets spent, and the sampling and labelling streams."""

    COUNTERS = ("round", "samples_drawn", "labels_used", "reward_queries")
    STATE = ("drawn",)  # besides the counters

    def __init__(self, options: OnlinePairs, labeler: Labeler, seed: int, reward: Reward | None = None,
                 labels: bool = True, prompts: list[list[int]] | None = None) -> None:
        self.options, self.labeler, self.labels_read = options, labeler, labels
        self.prompts = prompts  # real data: its distinct training prompts; None: the built-in task's 8 topics'
        self.seed, self.drawn = seed, 0  # real data: prompts drawn so far from its seeded order (fresh each pass)
        self.reward = reward if reward is not None else gold_reward()
        self.round, self.samples_drawn, self.reward_queries = 0, 0, 0
        self.labels_used = self.reward.labels_spent  # a learned reward's training labels
        self.examples: list[dict[str, Any]] | None = None  # the current round's examples
        self.epoch: int | None = None  # the training epoch they were drawn for (their round's first)
        self.sampler = torch.Generator().manual_seed(_derive_seed(seed, "online-samples"))
        self.labels = torch.Generator().manual_seed(_derive_seed(seed, "online-labels"))
        self.noise = torch.Generator().manual_seed(_derive_seed(seed, "online-noise"))

    def counters(self) -> dict[str, float]:
        """What the rounds spent so far, and what is known of the reward's quality (logged as val/online/*)."""
        return {**{name: float(getattr(self, name)) for name in self.COUNTERS}, **self.reward.stats}

    def next_round(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int,
                   scores: bool = False) -> list[dict[str, Any]]:
        """The next round's examples (prompt_ids, chosen_ids, rejected_ids, index; with K > 2, extra_ids; with
        `scores`, the rewards as chosen_score, rejected_score and extra_scores), sampled from `policy` now."""
        k = self.options.responses_per_prompt
        samples = (self._sample_topics if self.prompts is None else self._sample_prompts)(policy, tokenizer,
                                                                                          max_length)
        groups = [samples[i : i + k] for i in range(0, len(samples), k)]
        if self.labels_read:  # a pair of identical responses, or an empty one, is not labelled (its samples count)
            groups = [g for g in groups if g[0].response_ids and g[1].response_ids
                      and g[0].response_ids != g[1].response_ids]
        # The reward is queried only where it is read: the loss's scores, or a labeler on a reward other than gold.
        queried = scores or not self.reward.gold
        rewards = self.reward([s for g in groups for s in g]) if queried or self.labels_read else []
        examples = []
        for i, group in enumerate(groups):
            r = rewards[i * k : (i + 1) * k]
            order = (0, 1)
            if self.labels_read:
                a, b = group[0].words, group[1].words
                a_wins, _ = self.labeler.a_wins(a, b, r[0], r[1], self.labels, self.noise)
                order = (0, 1) if a_wins else (1, 0)
            example = {"prompt_ids": group[0].prompt_ids, "chosen_ids": group[order[0]].response_ids,
                       "rejected_ids": group[order[1]].response_ids, "index": i}
            if k > 2:
                example["extra_ids"] = [s.response_ids for s in group[2:]]
            if scores:
                example |= {"chosen_score": r[order[0]], "rejected_score": r[order[1]]}
                example |= {"extra_scores": r[2:]} if k > 2 else {}
            examples.append(example)
        self.round += 1
        self.samples_drawn += len(samples)
        self.labels_used += len(examples) if self.labels_read and self.reward.gold else 0
        self.reward_queries += len(examples) * k if queried else 0
        self.examples = examples
        return examples

    def _sample_topics(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       max_length: int) -> list[Sample]:
        """The built-in task: K responses to each of ceil(N / 8) draws of each training topic, by its sampler."""
        k, per_topic = self.options.responses_per_prompt, math.ceil(self.options.pairs_per_round / len(task.TRAIN_TOPICS))
        with torch.no_grad():
            responses = sample_responses(policy, tokenizer, task.TRAIN_TOPICS, k * per_topic, self.sampler,
                                         max_new_tokens=self.options.max_new_tokens)
        vocab, eos = tokenizer.get_vocab(), tokenizer.eos_token_id
        prompts = {t: _prompt_ids(tokenizer, t) for t in task.TRAIN_TOPICS}
        return [Sample(prompts[topic], ([vocab[w] for w in words] + ([eos] if ended else []))[
            : max_length - len(prompts[topic])], topic, words) for topic, words, ended in responses]

    def _sample_prompts(self, policy: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                        max_length: int) -> list[Sample]:
        """Real data: K continuations of each of the next N prompts of a seeded order of the data's training prompts
        (a fresh permutation each time it runs out), by the generic sampler."""
        k, n, picks = self.options.responses_per_prompt, self.options.pairs_per_round, []
        while len(picks) < n:
            size = len(self.prompts)
            epoch, at = divmod(self.drawn, size)
            perm = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
            take = perm[at : at + n - len(picks)]
            picks, self.drawn = picks + take, self.drawn + len(take)
        prompts = [self.prompts[i] for i in picks for _ in range(k)]
        eos = tokenizer.eos_token_id
        drawn = sample_continuations(policy, prompts, self.sampler, self.options.max_new_tokens, eos,
                                     tokenizer.pad_token_id)
        return [Sample(p, (ids + [eos] if ended else ids)[: max_length - len(p)], "",
                       tokenizer.convert_ids_to_tokens(ids)) for p, (ids, ended) in zip(prompts, drawn)]

    def state_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self.COUNTERS + self.STATE}, "examples": self.examples,
                "epoch": self.epoch,
                "sampler": self.sampler.get_state(), "labels": self.labels.get_state(), "noise": self.noise.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.COUNTERS + self.STATE:
            setattr(self, name, state.get(name, 0))
        self.examples, self.epoch = state["examples"], state["epoch"]
        for name in ("sampler", "labels", "noise"):
            getattr(self, name).set_state(state[name])


def next_round(datamodule: Any) -> list[dict[str, Any]]:
    """The training examples for the epoch about to start (`PreferenceDataModule.train_dataloader`): on a resume,
    the round the checkpoint was in; otherwise a new round sampled from the policy as it is now. What rounds need is
    checked, and the reward made, before the first is drawn."""
    trainer, hp = datamodule.trainer, datamodule.hparams
    if datamodule.rounds is None:
        gold, online = datamodule.gold, datamodule.online
        loss = getattr(getattr(trainer, "lightning_module", None), "loss", None)
        on_policy = bool(getattr(loss, "on_policy", False))
        drawn = math.ceil(online.pairs_per_round / len(task.TRAIN_TOPICS)) * len(task.TRAIN_TOPICS) \
            if datamodule.builtin_task else online.pairs_per_round
        problems = [why for bad, why in (
            (not datamodule.builtin_task and online.reward == "gold", "scores real data's responses with a reward "
             "model's directory or module:function (the gold reward is the built-in task's): set data.online.reward"),
            (datamodule.train_rows is not None, "makes pairs from the prompts of a paired dataset (this one holds "
                                                "unpaired rows)"),
            (hp.extras != (online.responses_per_prompt > 2),
             "gives a loss further responses per prompt when it reads them: set responses_per_prompt to 3 or more for "
             "a loss that reads them (RLOO), 2 otherwise"),
            (gold.rejected_edits or gold.excluded_words, "takes the policy's responses as they are: set "
                                                         "data.gold.rejected_edits: 0 and excluded_words: []"),
            (trainer is None or trainer.reload_dataloaders_every_n_epochs != 1,
             "draws a round per epoch: set trainer.reload_dataloaders_every_n_epochs: 1"),
            (on_policy and (drawn > hp.batch_size or online.epochs_per_round > 1),
             f"trains an on-policy loss on rounds of one batch and one epoch at most (samples older than a step bias "
             f"its gradient): {drawn} prompts a round against data.batch_size {hp.batch_size}"),
        ) if bad]
        if problems:
            raise DataError("data.online " + "; it ".join(problems))
        labeler = Labeler(temperature=gold.label_temperature, label_flip=gold.label_flip, length_bias=gold.length_bias)
        reward = make_reward(online.reward, datamodule, trainer.lightning_module.device)
        prompts = None if datamodule.builtin_task else list(dict.fromkeys(
            tuple(e["prompt_ids"]) for e in datamodule.train_examples or datamodule.train_rows or []))
        datamodule.rounds = Rounds(online, labeler, hp.seed, reward, labels=hp.labels,
                                   prompts=None if prompts is None else [list(p) for p in prompts])
    rounds = datamodule.rounds
    if datamodule._resumed_round is not None:
        rounds.load_state_dict(datamodule._resumed_round)
        datamodule._resumed_round = None
    # Lightning asks for the dataloader more often than once an epoch (at the start of the fit and of its first
    # epoch, and once more after the last step): a round is drawn once per epoch, and never after the last step.
    done = 0 <= trainer.max_steps <= trainer.global_step
    epoch, every = trainer.current_epoch, datamodule.online.epochs_per_round
    if rounds.examples is not None and (rounds.epoch is not None and epoch < rounds.epoch + every or done):
        return rounds.examples
    rounds.epoch = epoch  # the round's first epoch
    return rounds.next_round(trainer.lightning_module.policy, datamodule.tokenizer, hp.max_length, hp.scores)
