"""The LightningModule: a trainable policy, a frozen reference, and one registered loss.

Each training step runs one concatenated forward of the 2B rows per model (policy always; reference only when the
loss's metadata says it needs one; with `data.share_prompt`, one forward of B rows prompt + chosen + rejected,
`prefopt.fast.prefix_sharing`), turns the per-token log-probs into one record (`prefopt.logps`), and hands the
record to the loss. The module asks the loss's metadata (`needs_reference`, `paired`) and never its name.

The reference is frozen (eval mode, no gradients, not in the optimizer) and is not a registered submodule, so it is
neither in the optimizer nor in checkpoints: it is reloaded from its source, which is what a resumed run needs. For
reference-free losses it is loaded for validation only, so that every loss is measured by the same
reference-based metrics (reward margin, accuracy, KL to the reference).

With LoRA (`lora`, `prefopt.train.lora`) the policy trains adapter weights only and the reference is a view of the same
model (adapters disabled, or a frozen copy of the adapter training started from): no second copy of the weights.
Checkpoints then hold the trainable adapter weights only; the base is reloaded from its source on resume.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel

from prefopt.logps import (
    completion_token_logps, decoder_and_head, forward_logits, pair_logps, token_kl, token_logps, unpaired_logps,
)
from prefopt.fast.allocator import keep_freed_host_memory
from prefopt.fast.prefix_sharing import MASK_BACKENDS, shared_token_logps, trim_last_layer
from prefopt.losses import LossConfig
from prefopt.metrics import PAIR_METRICS, MeanMetrics, pair_metrics
from prefopt.train.lora import LoraOptions, attach_lora, trainable_keys
from prefopt.train.models import BUILTIN, enable_gradient_checkpointing, freeze, load_causal_lm
from prefopt.fast.reference_cache import load_or_compute


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=5e-4)


def describe_optimizer(factory) -> dict:
    """The optimizer's class path and plain-valued settings, from the factory the CLI builds (a partial)."""
    if isinstance(factory, functools.partial):
        cls = next((a for a in reversed(factory.args) if isinstance(a, type)), factory.func)
        plain = {k: v for k, v in factory.keywords.items() if isinstance(v, (int, float, str, bool)) or v is None}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", **plain}
    return {"class_path": f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"}


class PreferenceModule(L.LightningModule):
    def __init__(
        self,
        model: str = BUILTIN,
        loss: LossConfig = LossConfig("dpo"),
        optimizer: OptimizerCallable = _adamw,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "linear", "cosine"] = "constant",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        attn_implementation: str | None = None,
        reference_cache: bool = True,
        gradient_checkpointing: bool = False,
        lora: LoraOptions | None = None,
        logps_chunk_size: int | None = None,
        check_finite_every_n_steps: int = 1,
        compile: bool = False,
        trim_last_layer: bool = False,
        keep_freed_host_memory: bool = False,
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
            attn_implementation: transformers attention backend ("sdpa", "eager", "flex_attention", ...); None: its
                default. With prompt sharing on a GPU, "flex_attention" skips the masked tiles (benchmarks/README.md).
            reference_cache: compute the reference's log-probs of the training pairs once, store them on disk keyed
                by the reference weights and the tokenized data, and reuse them (every run of a grid shares them).
                Paired losses only; false: a live reference forward every step.
            gradient_checkpointing: recompute the policy's activations in the backward pass (less memory, ~25% more
                time per step).
            lora: train LoRA adapters only (needs peft), e.g. `{r: 16, alpha: 32}`; `{adapter: DIR}` continues a
                trained adapter, which is then also the reference. null: train every weight.
            logps_chunk_size: training log-probs run the LM head on completion positions only, this many at a time,
                recomputing each chunk's logits in the backward (never more than chunk x vocabulary logits: for
                large vocabularies). null: full logits of every row, one piece (prompt-shared batches: one piece
                over the completion positions).
            check_finite_every_n_steps: stop on a non-finite training loss, checked every N training steps (the
                check waits for the device: N > 1 keeps it off most GPU steps; the error then names the step
                range). 0: never.
            compile: `torch.compile` the decoder stacks of policy and reference (dynamic shapes): fuses the
                element-wise work between matmuls. Pays on CPU from ~1M parameters once a run has more than a few
                dozen steps (compiling takes ~15-60 s); needs a C++ compiler. Not yet for GPU runs: a first try on a
                0.5B model had not finished its warm-up after 500 s (benchmarks/README.md).
            trim_last_layer: with prompt-shared batches, the last decoder layer runs its MLP only at the positions
                whose log-probs are read, not at the prompt or padding (Llama-structured layers; others unchanged;
                `prefopt.fast.prefix_sharing.trim_last_layer`).
            keep_freed_host_memory: host memory freed during training stays in the process for the next step
                instead of going back to the OS and being page-faulted in again (glibc's malloc thresholds, set
                for the whole process when the models are configured; `prefopt.fast.allocator`). Pays on CPU runs with
                batches of varying shapes; the process then does not shrink after its peak.
        """
        super().__init__()
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if check_finite_every_n_steps < 0 or (logps_chunk_size is not None and logps_chunk_size < 1):
            raise ValueError("check_finite_every_n_steps must be >= 0 and logps_chunk_size >= 1 (or null)")
        self._nonfinite: Tensor | None = None  # losses not yet checked: any non-finite? (a device flag)
        self._unchecked_steps = 0
        self.loss = loss
        self.optimizer_factory = optimizer
        # hparams.yaml and TensorBoard's HPARAMS view tell runs apart by the loss and the optimizer: saved as plain
        # values (save_hyperparameters reads the arguments' current values, so these names are rebound first).
        loss, optimizer = loss.to_dict(), describe_optimizer(optimizer)  # noqa: F841
        self.save_hyperparameters()
        self.lora = lora
        self.strict_loading = lora is None  # LoRA checkpoints hold the adapter only (see on_load_checkpoint)
        self.policy: PreTrainedModel | None = None
        self._reference: list[PreTrainedModel] = []  # a list, so that nn.Module does not register it
        # Running mean of all training log-ratios (BCO's reward shift); buffers, so a resumed run restores them.
        self.register_buffer("logratio_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("logratio_count", torch.zeros((), dtype=torch.float64))
        self.train_metrics = MeanMetrics(("loss", *PAIR_METRICS))
        self.val_metrics = MeanMetrics(("loss", "kl_per_token", *PAIR_METRICS))

    # ---------------------------------------------------------------- models
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self._check_attention()
        if self.hparams.keep_freed_host_memory:
            keep_freed_host_memory()
        kwargs = {"dtype": self.hparams.dtype, "attn_implementation": self.hparams.attn_implementation,
                  "device": self._load_device()}
        policy = load_causal_lm(self.hparams.model, **kwargs)
        if self.hparams.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        if self.lora is None:
            self.policy = policy.train()
            self._reference = [freeze(load_causal_lm(self.hparams.model, **kwargs))]
        else:  # the reference is a view of the policy (adapters disabled, or a frozen starting adapter)
            self.policy, reference = attach_lora(policy, self.lora)
            self.policy.train()
            self._reference = [reference]
        if self.hparams.trim_last_layer:  # before compiling, which then traces the trimmed layer
            for model in (self.policy, self._reference[0]):
                trim_last_layer(model)
        if self.hparams.compile:  # in place: the decoder stacks (a LoRA reference view shares the policy's)
            for model in (self.policy, self._reference[0]):
                if isinstance(model, torch.nn.Module):
                    parts = decoder_and_head(model)
                    (model if parts is None else parts[0]).compile(dynamic=True)

    def _check_attention(self) -> None:
        """Attention settings that would fail only at the first step, refused before any model is loaded."""
        attn, trainer = self.hparams.attn_implementation, self._trainer
        shared = getattr(getattr(trainer, "datamodule", None), "shares_prompts", False)
        if attn not in (None, *MASK_BACKENDS) and shared:
            raise ValueError(f"data.share_prompt needs model.attn_implementation {' / '.join(MASK_BACKENDS)} (a "
                             f"custom attention mask), not {attn!r}; or set data.share_prompt: false")
        if attn == "flex_attention" and trainer is not None:
            if trainer.state.fn == "fit" and trainer.strategy.root_device.type == "cpu":
                raise ValueError("model.attn_implementation=flex_attention cannot train on the CPU (torch has no "
                                 "flex_attention backward there): use sdpa, or a GPU")

    def _load_device(self) -> torch.device | None:
        """The accelerator to load both models onto directly, where the strategy keeps whole models (one device,
        DDP); None (the CPU, then moved by Lightning) otherwise. Loaded on the host, both fp32 copies would sit
        there first (4 GB for two 0.5B models); loaded directly, a 0.5B GPU run held 1.3 GB of host memory when
        training started (benchmarks/README.md)."""
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

        strategy = getattr(self._trainer, "strategy", None)
        whole = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(strategy, DeepSpeedStrategy)
        return strategy.root_device if whole and strategy.root_device.type != "cpu" else None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """With LoRA, keep the trainable adapter weights and the buffers; the base reloads from its source."""
        if self.lora is not None:
            keep = trainable_keys(self) | {name for name, _ in self.named_buffers()}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
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
        datamodule = self.trainer.datamodule
        if not (self.hparams.reference_cache and self.loss.needs_reference and self.loss.paired):
            datamodule.set_reference_logps(None)
            return
        precision = str(self.trainer.precision)

        def compute():  # in the run's precision context (autocast under *-mixed), one training batch at a time
            with self.trainer.precision_plugin.forward_context():
                return load_or_compute(self.reference, datamodule.train_examples, datamodule.collate_pairs,
                                       batch_size=datamodule.hparams.batch_size, tag=f"precision={precision}")

        # Rank 0 computes (or reads) and writes the cache entry; the other ranks wait, then read it.
        table = compute()[0] if self.trainer.is_global_zero else None
        self.trainer.strategy.barrier("reference_cache")
        datamodule.set_reference_logps(compute()[0] if table is None else table)

    def on_train_end(self) -> None:
        """Free the gradients and the optimizer state once training is over (a `save_last` checkpoint is written
        before this hook). Lightning's teardown then copies the module and the optimizers' state to the host: on a
        GPU run of a 0.5B model that copy made the process's host memory jump from 2.2 to 9.7 GB at the very end
        (benchmarks/README.md). A checkpoint saved by hand after `fit` therefore holds no optimizer state."""
        self.policy.zero_grad(set_to_none=True)
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()

    # ---------------------------------------------------------------- steps
    def _token_logps(self, batch: dict[str, Tensor], with_reference: bool) -> tuple[Tensor, Tensor | None]:
        """Per-token completion log-probs of policy and (optionally) reference, aligned with completion_mask[:, 1:]."""
        chunk = self.hparams.logps_chunk_size

        def compute(model) -> Tensor:
            if "pred_index" in batch:  # prompt-shared layout (data.share_prompt)
                return shared_token_logps(model, batch, chunk)
            if chunk is not None:
                return completion_token_logps(model, batch, chunk)
            return token_logps(forward_logits(model, batch), batch["input_ids"], batch["completion_mask"])

        policy = compute(self.policy)
        if not with_reference:
            return policy, None
        with torch.no_grad():
            return policy, compute(self.reference)

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self._trainer.world_size > 1

    def _running_logratio_mean(self) -> Tensor:
        return (self.logratio_sum / self.logratio_count.clamp(min=1)).float()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        cached = batch.get("ref_logps")  # (B, 4) reference sums from the cache, when enabled
        policy, ref = self._token_logps(batch, with_reference=self.loss.needs_reference and cached is None)
        if self.loss.paired:
            lp = pair_logps(policy, batch["completion_mask"], ref, ref_sums=cached)
            if lp.has_reference:  # running mean of every chosen and rejected log-ratio so far (BCO's shift)
                logratios = torch.cat([lp.chosen_logratios(), lp.rejected_logratios()]).detach()
                total = torch.stack([logratios.sum().double(), logratios.new_tensor(logratios.numel()).double()])
                if self._distributed:  # the same running mean on every rank
                    total = self.trainer.strategy.reduce(total, reduce_op="sum")
                self.logratio_sum += total[0]
                self.logratio_count += total[1]
                lp = lp.replace(running_logratio_mean=self._running_logratio_mean())
            # Step metrics are only written on logging steps (trainer.log_every_n_steps): computed only there.
            values = pair_metrics(lp, self.loss.reward_scale) if self._logs_this_step() else {}
        else:
            lp = unpaired_logps(policy, batch["completion_mask"], batch["desirable"], ref)
            if self._distributed and lp.ref_kl_logps is not None:
                # KTO's reference point z0 is a batch mean of the mismatched rows' log-ratios: take it over the
                # global batch (all ranks' rows). It is detached in the loss, so gathering without gradient is exact.
                gather = lambda x: self.all_gather(x.detach()).reshape(-1)  # noqa: E731
                lp = lp.replace(policy_kl_logps=gather(lp.policy_kl_logps), ref_kl_logps=gather(lp.ref_kl_logps))
            values = {}
        loss = self.loss(lp).mean()
        self._check_finite(loss.detach())
        values["loss"] = loss.detach()
        for name, value in values.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, prog_bar=name == "loss")
        return {"loss": loss, "pairs": lp.num_pairs}

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
        every = self.hparams.check_finite_every_n_steps
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

    def on_validation_end(self) -> None:
        """Drop that `step` once every callback has seen it (module hooks run after callbacks'): left in
        `callback_metrics`, it would name later checkpoints (`step=N.ckpt`) by the last validation's step."""
        if self._trainer is not None:
            self.trainer.callback_metrics.pop("step", None)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        """Validation batches are always pairs: the same metrics for every loss, reference-free ones included."""
        ids, mask = batch["input_ids"], batch["completion_mask"]
        policy_logits = forward_logits(self.policy, batch)
        ref_logits = forward_logits(self.reference, batch)
        lp = pair_logps(token_logps(policy_logits, ids, mask), mask, token_logps(ref_logits, ids, mask),
                        self._running_logratio_mean())
        values = pair_metrics(lp, self.loss.reward_scale)
        if self.loss.paired:  # an unpaired loss's value needs the mismatched KL rows of its own batches
            values["loss"] = self.loss(lp).mean()
        batch_size = lp.policy_chosen_logps.shape[0]
        self.val_metrics.update(values, weight=batch_size)
        kl_sum, tokens = token_kl(policy_logits, ref_logits, mask)
        self.val_metrics.update({"kl_per_token": kl_sum / tokens}, weight=tokens)
        for name, metric in self.val_metrics.items():
            if name in values or name == "kl_per_token":
                self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=batch_size)

    # ---------------------------------------------------------------- optimization
    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.policy.parameters() if p.requires_grad])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup, schedule = self.hparams.warmup_steps, self.hparams.lr_schedule

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if schedule == "linear":
                return 1.0 - progress
            if schedule == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            return 1.0

        scheduler = LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
