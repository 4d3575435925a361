"""The LightningModule: a trainable policy, a frozen reference, and one registered loss.

A training step reads as score -> loss -> log: the scorer (`prefopt.fast.scorer`, configured by `model.scoring`)
turns the batch into the record the loss reads, the loss's declared running state (`prefopt.losses.state`) updates
it, and the loss maps it to per-example losses. The module asks the loss's metadata (`paired`, `reads`, `state`) and
never its name, and never looks inside a batch.

The reference is frozen (eval mode, no gradients, not in the optimizer) and is not a registered submodule, so it is
neither in the optimizer nor in checkpoints: it is reloaded from its source, which is what a resumed run needs. For
reference-free losses it is loaded for validation only, so that every loss is measured by the same
reference-based metrics (reward margin, accuracy, KL to the reference).

With LoRA (`lora`, `prefopt.train.lora`) the policy trains adapter weights only and the reference is a view of the same
model (adapters disabled, or a frozen copy of the adapter training started from): no second copy of the weights.
Checkpoints then hold the trainable adapter weights only; the base is reloaded from its source on resume.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel

from prefopt.fast.allocator import keep_freed_host_memory
from prefopt.fast.prefix_sharing import MASK_BACKENDS
from prefopt.fast.reference_cache import compute_reference_logps, load_or_compute
from prefopt.fast.scorer import Scorer, ScoringOptions
from prefopt.losses import LossConfig
from prefopt.losses.state import SingleProcess
from prefopt.metrics import PAIR_METRICS, MeanMetrics, pair_metrics
from prefopt.train.lora import LoraOptions, attach_lora, trainable_keys
from prefopt.train.optim import adamw, describe_optimizer, lr_factor
from prefopt.train.builtin import BUILTIN
from prefopt.train.models import enable_gradient_checkpointing, freeze, load_causal_lm
from prefopt.train.reference import ReferenceUpdate, mix_into, rescore_pays


LEGACY_BUFFERS = {"logratio_sum": "total", "logratio_count": "count"}  # old module buffer -> loss-state buffer


class PreferenceModule(L.LightningModule):
    def __init__(
        self,
        model: str = BUILTIN,
        loss: LossConfig = LossConfig("dpo"),
        optimizer: OptimizerCallable = adamw,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "linear", "cosine"] = "constant",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora: LoraOptions | None = None,
        scoring: ScoringOptions = ScoringOptions(),
        sft_steps: int = 0,
        reference_update: ReferenceUpdate = ReferenceUpdate(),
    ) -> None:
        """
        Args:
            model: the policy's starting point and the reference: "gold" (the built-in task's reference), a hub
                name, or a local `save_pretrained` directory.
            loss: the loss and its hyperparameters, e.g. `{name: dpo, beta: 0.1}` (see docs/losses.md).
            optimizer: the optimizer over the policy's parameters (class_path/init_args in YAML).
            warmup_steps: linear learning-rate warmup from 0, in optimizer steps.
            lr_schedule: after warmup: constant, linear decay to 0, or cosine decay to 0 at the last step.
            dtype: parameter dtype of policy and reference.
            lora: train LoRA adapters only (needs peft), e.g. `{r: 16, alpha: 32}`; `{adapter: DIR}` continues a
                trained adapter, which is then also the reference. null: train every weight.
            scoring: the speed and memory switches (prompt sharing, reference cache, chunked head, trimmed layer,
                compile, attention backend, gradient checkpointing, host memory, finite-loss checks): how a batch
                becomes a record, never what the record holds (`prefopt.fast.scorer.ScoringOptions`).
            sft_steps: the first N optimizer steps fit the chosen responses (the registered `sft` loss), then the
                reference becomes a frozen copy of the policy and `loss` trains the remaining steps with a fresh
                optimizer state and its own warmup: SFT, then the preference loss from the SFT model, as two runs
                would do, in one run of a fixed total of steps (scenario S8). 0: the reference is the starting model
                throughout.
            reference_update: TR-DPO's moving reference (`prefopt.train.reference`): every `every` optimizer steps
                of the preference stage, reference <- alpha * policy + (1 - alpha) * reference (alpha 1: the hard
                update). every 0: the reference stays.
        """
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if sft_steps < 0:
            raise ValueError(f"sft_steps must be >= 0, got {sft_steps}")
        if sft_steps and (lora is not None or not loss.paired):
            raise ValueError("model.sft_steps needs full fine-tuning (no model.lora: the reference is then a view of "
                             f"the policy) and a paired loss (SFT fits the chosen responses), not {loss.name!r}"
                             + (" with lora" if lora is not None else ""))
        if reference_update.every and lora is not None:
            raise ValueError("model.reference_update needs full fine-tuning: with model.lora the reference is a view "
                             "of the policy")
        self.reference_update = reference_update
        self._sft = LossConfig("sft") if sft_steps else None
        self._reference_moved = False  # the reference is no longer its source's (reset after SFT, TR-DPO updates)
        self._moved_at: int | None = None  # the optimizer step before which it last moved
        self._pending_reference: dict[str, Tensor] | None = None
        self._nonfinite: Tensor | None = None  # losses not yet checked: any non-finite? (a device flag)
        self._total_steps = 1  # the run's optimizer steps, set by configure_optimizers: the loss state's progress
        self._unchecked_steps = 0
        self.loss = loss
        self.scorer = Scorer(scoring, loss)  # refuses a loss that reads what these settings cannot produce
        self.optimizer_factory = optimizer
        # hparams.yaml and TensorBoard's HPARAMS view tell runs apart by the loss and the optimizer: saved as plain
        # values (save_hyperparameters reads the arguments' current values, so these names are rebound first).
        loss, optimizer, scoring = loss.to_dict(), describe_optimizer(optimizer), dataclasses.asdict(scoring)  # noqa: F841
        reference_update = dataclasses.asdict(reference_update)
        self.save_hyperparameters()
        self.lora = lora
        self.strict_loading = lora is None  # LoRA checkpoints hold the adapter only (see on_load_checkpoint)
        self.policy: PreTrainedModel | None = None
        self._reference: list[PreTrainedModel] = []  # a list, so that nn.Module does not register it
        # The running state the loss declares (BCO's mean log-ratio, KTO's global batch): buffers, so a resumed run
        # restores them.
        self.loss_state = torch.nn.ModuleList([factory() for factory in self.loss.state])
        self.train_metrics = MeanMetrics(("loss", *PAIR_METRICS))
        self.val_metrics = MeanMetrics(("loss", "kl_per_token", *PAIR_METRICS))

    # ---------------------------------------------------------------- models
    def setup(self, stage: str) -> None:
        """Refuse, before any model loads, an on-policy loss (RLOO) on data that are not the policy's samples."""
        datamodule = getattr(self._trainer, "datamodule", None)
        if stage == "fit" and self.loss.on_policy and not getattr(datamodule, "pairs_change", False):
            raise ValueError(f"loss {self.loss.name!r} trains on samples of the policy being trained: set data.online "
                             "(experiments/online/rloo_gold.yaml)")

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        options = self.scorer.options
        self._check_attention()
        if options.keep_freed_host_memory:
            keep_freed_host_memory()
        kwargs = {"dtype": self.hparams.dtype, "attn_implementation": options.attn_implementation,
                  "device": self._load_device()}
        policy = load_causal_lm(self.hparams.model, **kwargs)
        if options.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        if self.lora is None:
            self.policy = policy.train()
            self._reference = [freeze(load_causal_lm(self.hparams.model, **kwargs))]
        else:  # the reference is a view of the policy (adapters disabled, or a frozen starting adapter)
            self.policy, reference = attach_lora(policy, self.lora)
            self.policy.train()
            self._reference = [reference]
        self.scorer.prepare(self.policy, self._reference[0])
        if self._pending_reference is not None:  # loaded from a checkpoint before the models were
            self.reset_reference(self._pending_reference)

    def reset_reference(self, state_dict: dict[str, Tensor] | None = None) -> None:
        """The frozen reference takes the policy's weights as they are now (or `state_dict`'s), in place: it keeps its
        scorer levers and device. The cached table of the training pairs' reference log-probs is dropped: the caller
        recomputes it (`on_train_batch_start`, `on_fit_start`), so the old reference's table is never read again."""
        if state_dict is None:
            mix_into(self.reference, self.policy, 1.0)
        else:
            self.reference.load_state_dict(state_dict)
        self.scorer.use_reference_table(None)
        self._reference_moved = True

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Move the reference where the run says so (the end of the SFT stage, TR-DPO's updates), once per optimizer
        step: with gradient accumulation, the step's micro-batches share one reference."""
        step, sft = self.global_step, self.hparams.sft_steps
        if step == self._moved_at:
            return
        if self._sft is not None and step == sft:
            self.reset_reference()
            for optimizer in self.trainer.optimizers:  # the preference stage starts as a run of its own would
                optimizer.state.clear()
        elif self.reference_update.due(step, sft):
            mix_into(self.reference, self.policy, self.reference_update.alpha)
            self._reference_moved = True
        else:
            return
        self._moved_at = step
        self._refresh_reference_table()

    def _refresh_reference_table(self) -> None:
        """After the reference moved: the training pairs' reference log-probs rescored in memory (never cached on
        disk: this run's own reference) when the reference stays put long enough to pay for it, else read live."""
        if not self._caches_reference:
            return
        until = self.reference_update.every or max(1, self._total_steps - self.global_step)
        datamodule = self.trainer.datamodule
        pays = rescore_pays(until, datamodule.hparams.batch_size, len(datamodule.train_examples))
        self.scorer.use_reference_table(self._reference_table(cache=False) if pays else None)

    def _check_attention(self) -> None:
        """Attention settings that would fail only at the first step, refused before any model is loaded."""
        attn, trainer = self.scorer.options.attn_implementation, self._trainer
        if attn not in (None, *MASK_BACKENDS) and self.scorer.shares_prompt:
            raise ValueError(f"model.scoring.share_prompt needs model.scoring.attn_implementation "
                             f"{' / '.join(MASK_BACKENDS)} (a custom attention mask), not {attn!r}; or set "
                             "model.scoring.share_prompt: false")
        if attn == "flex_attention" and trainer is not None:
            if trainer.state.fn == "fit" and trainer.strategy.root_device.type == "cpu":
                raise ValueError("model.scoring.attn_implementation=flex_attention cannot train on the CPU (torch has "
                                 "no flex_attention backward there): use sdpa, or a GPU")

    def _load_device(self) -> torch.device | None:
        """The accelerator to load both models onto directly, where the strategy keeps whole models (one device,
        DDP); None (the CPU, then moved by Lightning) otherwise: loaded on the host, both full copies would sit
        there first (benchmarks/README.md, host memory)."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        strategy = getattr(self._trainer, "strategy", None)
        whole = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)
        return strategy.root_device if whole and strategy.root_device.type != "cpu" else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """With LoRA, keep the trainable adapter weights and the buffers; the base reloads from its source."""
        if self.lora is not None:
            keep = trainable_keys(self) | {name for name, _ in self.named_buffers()}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        if self._reference_moved:  # not recoverable from its source: a resumed run needs it
            checkpoint["reference_state_dict"] = self._reference[0].state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "reference_state_dict" in checkpoint:  # a reset reference (sft_steps): set up once the policy is loaded
            self._pending_reference = checkpoint["reference_state_dict"]
            if self.policy is not None:
                self.reset_reference(self._pending_reference)
        state_dict = checkpoint["state_dict"]
        for old, new in LEGACY_BUFFERS.items():  # checkpoints from before the loss-state modules
            value = state_dict.pop(old, None)
            for i, state in enumerate(self.loss_state):
                if value is not None and hasattr(state, new):
                    state_dict[f"loss_state.{i}.{new}"] = value
        if self.lora is not None and self.policy is not None:  # loading is not strict: check the adapter is there
            missing = sorted(trainable_keys(self) - set(checkpoint["state_dict"]))
            if missing:
                raise KeyError(f"checkpoint lacks {len(missing)} adapter weights, e.g. {missing[0]}: was it saved "
                               "with other lora settings?")

    @property
    def reference(self) -> PreTrainedModel:
        """The frozen reference, moved to the policy's device on first use."""
        ref = self._reference[0]
        if ref.device != self.device:
            ref.to(self.device)
        return ref

    def on_fit_start(self) -> None:
        self.scorer.use_reference_table(None)
        if not self._caches_reference:
            return
        if self._reference_moved:  # resumed after the reference moved: this run's own, kept in memory only
            self._refresh_reference_table()
            return
        # Rank 0 computes (or reads) and writes the cache entry; the other ranks wait, then read it.
        table = self._reference_table() if self.trainer.is_global_zero else None
        self.trainer.strategy.barrier("reference_cache")
        self.scorer.use_reference_table(self._reference_table() if table is None else table)

    @property
    def _caches_reference(self) -> bool:
        """The training pairs' reference log-probs are read from a table: not when the pairs change every round
        (`data.online`), whose positions the table is keyed by."""
        return self.scorer.caches_reference and not getattr(self.trainer.datamodule, "pairs_change", False)

    def _reference_table(self, cache: bool = True) -> dict[str, Tensor]:
        """The training pairs' reference log-probs, in the run's precision context (autocast under *-mixed), one
        training batch at a time; read from or written to the disk cache, or (cache=False) computed in memory."""
        datamodule, precision = self.trainer.datamodule, str(self.trainer.precision)
        args = (self.reference, datamodule.train_examples, datamodule.collate_pairs)
        with self.trainer.precision_plugin.forward_context():
            if not cache:
                return compute_reference_logps(*args, batch_size=datamodule.hparams.batch_size)
            return load_or_compute(*args, batch_size=datamodule.hparams.batch_size, tag=f"precision={precision}")[0]

    def on_train_end(self) -> None:
        """Free the gradients and the optimizer state once training is over (a `save_last` checkpoint is written
        before this hook): Lightning's teardown then copies the module and the optimizers' state to the host, the
        largest host-memory peak of a GPU run (benchmarks/README.md). A checkpoint saved by hand after `fit` therefore
        holds no optimizer state."""
        self.policy.zero_grad(set_to_none=True)
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()

    # ---------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | float]:
        record = self.scorer.score(self.policy, self.reference if self.scorer.live_reference else None, batch)
        if self._sft is not None and self.global_step < self.hparams.sft_steps:  # the SFT stage
            loss = self._sft(record).mean()
        else:
            collective = self._collective()
            for state in self.loss_state:
                state.set_progress(self.global_step, self._total_steps)
                record = state.update(record, collective)
            loss = self.loss(record).mean()
        self._check_finite(loss.detach())
        # Step metrics are only written on logging steps (trainer.log_every_n_steps): computed only there.
        logs = self.loss.paired and self._logs_this_step()
        values = pair_metrics(record, self.loss.reward_scale) if logs else {}
        values["loss"] = loss.detach()
        for name, value in values.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss")
        return {"loss": loss, "pairs": record.num_pairs}

    def _collective(self):
        """Cross-rank sums and gathers for the loss's running state (the identity in a single process)."""
        if self._trainer is None or self._trainer.world_size == 1:
            return SingleProcess()
        return _StrategyCollective(self)

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's metrics to the loggers (always, outside a Trainer).

        Lightning's own rule, from public attributes: every `log_every_n_steps` optimizer steps (counted from 1; one
        optimizer here, so global_step counts them), and when the trainer is stopping (`should_stop`, e.g. early
        stopping; reaching max_steps does not set it); never when log_every_n_steps is 0.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)

    def _check_finite(self, loss: Tensor) -> None:
        """Raise on a non-finite loss; the host waits for the device only every `check_finite_every_n_steps`."""
        every = self.scorer.options.check_finite_every_n_steps
        if every == 0:
            return
        bad = ~torch.isfinite(loss)
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
        self._unchecked_steps += 1
        if self._unchecked_steps < every:
            return
        nonfinite, steps = bool(self._nonfinite), self._unchecked_steps
        self._nonfinite, self._unchecked_steps = None, 0
        if nonfinite:
            what, where = ((loss.item(), f"at training step {self.global_step}") if steps == 1 else
                           ("non-finite", f"within training steps {self.global_step - steps + 1}-{self.global_step}"))
            raise FloatingPointError(f"loss {self.loss} became {what} {where} (epoch {self.current_epoch})")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Validation metrics are logged at the optimizer steps done (as metrics.json counts), not Lightning's
        count of batches before this one (one less, inside a training step): a logged `step` is the x-axis."""
        if self._trainer is not None and not self.trainer.sanity_checking:
            self.log("step", float(self.global_step), on_step=False, on_epoch=True)
            rounds = getattr(self.trainer.datamodule, "rounds", None)
            for name, value in rounds.counters().items() if rounds is not None else ():  # the budgets spent
                self.log(f"val/online/{name}", value, on_step=False, on_epoch=True)

    def on_validation_end(self) -> None:
        """Drop that `step` once every callback has seen it (module hooks run after callbacks'): left in
        `callback_metrics`, it would name later checkpoints (`step=N.ckpt`) by the last validation's step."""
        if self._trainer is not None:
            self.trainer.callback_metrics.pop("step", None)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        """Validation batches are always pairs: the same metrics for every loss, reference-free ones included."""
        record, kl_sum, tokens = self.scorer.evaluate(self.policy, self.reference, batch)
        for state in self.loss_state:
            record = state.read(record)
        values = pair_metrics(record, self.loss.reward_scale)
        if self.loss.paired and not self.loss.on_policy:  # unpaired: needs its batches' mismatched KL rows;
            # on-policy (RLOO): has a value on the policy's own samples only
            values["loss"] = self.loss(record).mean()
        batch_size = record.policy_chosen_logps.shape[0]
        self.val_metrics.update(values, weight=batch_size)
        self.val_metrics.update({"kl_per_token": kl_sum / tokens}, weight=tokens)
        for name, metric in self.val_metrics.items():
            if name in values or name == "kl_per_token":
                self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=batch_size)

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        total = self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        factor = functools.partial(lr_factor, warmup=self.hparams.warmup_steps, total=total,
                                   schedule=self.hparams.lr_schedule, restart=self.hparams.sft_steps)
        scheduler = LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _StrategyCollective:
    """The trainer's strategy as a `prefopt.losses.state.Collective` (sums and gathers over every rank)."""

    def __init__(self, module: L.LightningModule) -> None:
        self.module = module

    def sum(self, tensor: Tensor) -> Tensor:
        return self.module.trainer.strategy.reduce(tensor, reduce_op="sum")

    def gather(self, tensor: Tensor) -> Tensor:
        return self.module.all_gather(tensor).reshape(-1, *tensor.shape[1:])
