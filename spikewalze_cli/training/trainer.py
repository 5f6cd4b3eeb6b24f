"""The training loop: one object that owns the model, optimizer, data position and curriculum."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from spikewalze_cli.checkpoint import (
    BEST,
    load_optimizer,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    step_name,
)
from spikewalze_cli.config import Config, config_to_dict
from spikewalze_cli.console import console
from spikewalze_cli.errors import UserError
from spikewalze_cli.training.batches import TrainBatches, validation_batches
from spikewalze_cli.training.curriculum import Curriculum
from spikewalze_cli.training.display import Display
from spikewalze_cli.training.inputs import RunInputs
from spikewalze_cli.training.metrics import MetricsLog, bits_per_byte, measure_peak_flops, plot_run, unigram_bits_per_byte
from spikewalze_cli.training.optim import build_optimizer, learning_rate
from spikewalze_cli.training.runtime import Runtime, StopSignal, rng_state, set_rng_state

log = logging.getLogger(__name__)

VALIDATION_SEED = 20170701  # fixed, so every run and every resume validates on the same sequences


class Trainer:
    """Trains `config.model` on the token store of `inputs` into `run_dir` (written by rank 0 only)."""

    def __init__(self, config: Config, run_dir: Path, inputs: RunInputs, runtime: Runtime):
        from spikewalze_cli.model import build_model

        self.config = config
        self.run_dir = run_dir
        self.inputs = inputs
        self.runtime = runtime
        train = config.train
        context = config.model.context

        # Batch geometry: batch_tokens = micro_batch_size * context * accumulation * world.
        per_micro_step = train.micro_batch_size * context * runtime.world
        self.accumulation = train.batch_tokens // per_micro_step
        if self.accumulation < 1 or train.batch_tokens % per_micro_step != 0:
            raise UserError(
                f"train.batch_tokens ({train.batch_tokens}) must be a positive multiple of micro_batch_size * context * processes "
                f"= {train.micro_batch_size} * {context} * {runtime.world} = {per_micro_step}; "
                f"for example --set train.batch_tokens={max(1, round(train.batch_tokens / per_micro_step)) * per_micro_step}"
            )

        torch.manual_seed(train.seed)
        self.model = build_model(config.model, inputs.tokens.vocab_size).to(runtime.device)
        self.optimizer = build_optimizer(self.model, train)
        self.forward_model: torch.nn.Module = self.model
        if train.compile:
            # NOTE: torch.compile recompiles when a Python attribute it guards on changes; how often
            # that happens with the annealed gate temperature depends on the model.
            self.forward_model = torch.compile(self.model)
        if runtime.distributed:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(
                self.forward_model,
                device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                find_unused_parameters=config.model.arch == "spikewalze",
            )

        self.curriculum = Curriculum(config.curriculum, len(inputs.tokens.stages))
        self.batches = TrainBatches(inputs.tokens, self.curriculum, context, seed=train.seed)
        if train.batch_tokens > self.batches.pool.total_tokens:
            raise UserError(
                f"train.batch_tokens ({train.batch_tokens}) is larger than the whole training split "
                f"({self.batches.pool.total_tokens} tokens); lower train.batch_tokens or prepare more data"
            )
        validation = validation_batches(inputs.tokens, context, train.micro_batch_size, train.eval_batches, VALIDATION_SEED)
        self.validation = validation[runtime.rank :: runtime.world]  # disjoint share per rank
        self.stages = inputs.tokens.stages
        self.unigram_bpb = unigram_bits_per_byte(inputs.tokens) if runtime.is_main else None
        self.last_validation: dict[str, Any] | None = None

        self.autocast = torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16")
        self.step = 0
        self.best_loss: float | None = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_saved_step: int | None = None

    # ----------------------------------------------------------------------- checkpoint state

    def state(self) -> dict[str, Any]:
        """Everything besides weights and optimizer tensors that an exact resume needs, as JSON."""
        return {
            "format": 1,
            "step": self.step,
            "config": config_to_dict(self.config),
            "tokenizer_dir": str(self.inputs.tokenizer_dir),
            "tokenizer_sha256": self.inputs.tokenizer_sha256,
            "data_dir": str(self.inputs.data_dir),
            "data_manifest_sha256": self.inputs.data_manifest_sha256,
            "world_size": self.runtime.world,
            "learning_rate": learning_rate(max(self.step - 1, 0), self.config.train),
            "rng": rng_state(),
            "data": self.batches.state(),
            "curriculum": self.curriculum.state,
            "best_validation_loss": self.best_loss,
            "nonfinite": {"in_a_row": self.nonfinite_in_a_row, "total": self.nonfinite_total},
        }

    def load(self, checkpoint_dir: Path, state: dict[str, Any]) -> None:
        """Restore the state written by `save` (weights, optimizer, RNGs, data, curriculum)."""
        load_weights(self.model, checkpoint_dir)
        load_optimizer(self.optimizer, checkpoint_dir, state)
        self.step = int(state["step"])
        self.batches.load_state(state["data"])
        self.curriculum.load_state(state["curriculum"])
        self.best_loss = state.get("best_validation_loss")
        self.nonfinite_in_a_row = int(state["nonfinite"]["in_a_row"])
        self.nonfinite_total = int(state["nonfinite"]["total"])
        set_rng_state(state["rng"])
        self.last_saved_step = self.step

    def save(self, name: str | None = None) -> Path | None:
        """Write a checkpoint on rank 0 (all ranks wait) and prune old ones; return its path on rank 0."""
        path = None
        # When rank 0 fails to write (UserError), the other ranks wait at the barrier below until
        # torchrun, seeing rank 0 exit, stops them.
        if self.runtime.is_main:
            path = save_checkpoint(self.run_dir, name or step_name(self.step), self.model, self.optimizer, self.state())
            if name is None:
                prune_checkpoints(self.run_dir, self.config.train.keep_checkpoints)
        if name is None:
            self.last_saved_step = self.step
        self.runtime.barrier()
        return path

    # ----------------------------------------------------------------------- one optimizer step

    def train_step(self) -> dict[str, Any]:
        """Run forward/backward over the micro-batches of one step and update; return its metrics."""
        train = self.config.train
        progress = self.step / train.max_steps
        self._set_temperature(progress)
        lr = learning_rate(self.step, train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        batch = self.batches.next_step(progress, train.micro_batch_size, self.accumulation, self.runtime.rank, self.runtime.world)
        n_layer = self.config.model.n_layer
        sums = torch.zeros(2 + n_layer, device=self.runtime.device)  # loss, aux_loss, mean gate per layer
        has_gates = False
        for index, (inputs, targets) in enumerate(batch.micro_batches):
            last = index == len(batch.micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.runtime.distributed else self.forward_model.no_sync()
            with sync:
                with self.autocast:
                    out = self.forward_model(inputs.to(self.runtime.device), targets.to(self.runtime.device))
                    objective = (out.loss + out.aux_loss) / self.accumulation
                objective.backward()
            sums[0] += out.loss.detach().float()
            sums[1] += out.aux_loss.detach().float()
            if out.gates is not None:
                has_gates = True
                sums[2:] += out.gates.detach().float().mean(dim=(1, 2))

        # Mean over micro-steps and ranks: every micro-batch has the same number of targets.
        sums = self.runtime.all_reduce_sum(sums) / (self.accumulation * self.runtime.world)
        loss, aux_loss = float(sums[0]), float(sums[1])
        finite = math.isfinite(loss) and math.isfinite(aux_loss)

        grad_norm = None
        if finite:
            if train.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), train.grad_clip))
            self.optimizer.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            log.warning("step %d: non-finite loss (%s); skipped the update (%d in a row)", self.step + 1, loss, self.nonfinite_in_a_row)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

        gate_means = [float(value) for value in sums[2:]] if has_gates else None
        return {
            "kind": "train",
            "step": self.step,
            "loss": loss if finite else None,
            "aux_loss": aux_loss if finite else None,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": not finite,
            "spike_rate": sum(gate_means) / len(gate_means) if gate_means else None,
            "spike_rate_per_layer": gate_means,
            "target_rate": self.config.model.spike.target_rate if has_gates else None,
            "unit_score": batch.mean_unit_score,
            "stage_mix": batch.stage_mix,
            "tokens": self.step * train.batch_tokens,
        }

    def _set_temperature(self, progress: float) -> None:
        from spikewalze_cli.model import gate_temperature

        if hasattr(self.model, "set_temperature"):
            self.model.set_temperature(gate_temperature(self.config.model.spike, progress))

    # ----------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Loss, bits per byte and spike rate on the fixed validation set, overall and per stage."""
        n_layer = self.config.model.n_layer
        # Per stage: summed nats, targets, bytes, hard spikes, then the soft gate sum of each layer.
        sums = torch.zeros(len(self.stages), 4 + n_layer, dtype=torch.float64)
        has_gates = False
        self.model.eval()
        for batch in self.validation:
            row = sums[self.stages.index(batch.stage)]
            with self.autocast:
                out = self.model(batch.inputs.to(self.runtime.device), batch.targets.to(self.runtime.device))
            targets = batch.targets.numel()
            row[0] += float(out.loss) * targets
            row[1] += targets
            row[2] += batch.target_bytes
            if out.gates is not None:
                has_gates = True
                # A gate value of at least 0.5 is a spike, as in the hard gate mode of the model.
                row[3] += float((out.gates >= 0.5).float().sum()) / n_layer
                row[4:] += out.gates.float().sum(dim=(1, 2)).double().cpu()
        self.model.train()
        sums = self.runtime.all_reduce_sum(sums.to(self.runtime.device)).cpu()

        stages = {}
        for stage, row in zip(self.stages, sums):
            if row[1] == 0:
                continue
            stages[stage] = {
                "loss": float(row[0] / row[1]),
                "bpb": bits_per_byte(float(row[0] / row[1]), float(row[1]), float(row[2])),
                "spike_rate": float(row[3] / row[1]) if has_gates else None,
            }
        total = sums.sum(dim=0)
        loss = float(total[0] / total[1])
        return {
            "kind": "validation",
            "step": self.step,
            "loss": loss,
            "bpb": bits_per_byte(loss, float(total[1]), float(total[2])),
            "spike_rate": float(total[3] / total[1]) if has_gates else None,
            "gate_mean": float(total[4:].mean() / total[1]) if has_gates else None,
            "gate_mean_per_layer": [float(value / total[1]) for value in total[4:]] if has_gates else None,
            "target_rate": self.config.model.spike.target_rate if has_gates else None,
            "stages": stages,
        }

    # ----------------------------------------------------------------------- the loop

    def fit(self) -> Path:
        """Train until train.max_steps, validating, checkpointing and logging on the way."""
        train = self.config.train
        metrics = MetricsLog(self.run_dir, train.tensorboard) if self.runtime.is_main else None
        if metrics is not None:
            metrics.truncate_after(self.step)
        flops_per_token, peak = self._mfu_inputs()

        if self.step >= train.max_steps:
            log.info("the run is already at step %d of train.max_steps=%d; raise it with --set train.max_steps=N", self.step, train.max_steps)
        elif self.runtime.is_main:
            log.info(
                "training %s (%.2fM parameters) for steps %d..%d: %d tokens per step (%d x %d x %d accumulation x %d processes), curriculum %s",
                self.config.model.arch, self.model.num_parameters() / 1e6, self.step + 1, train.max_steps,
                train.batch_tokens, train.micro_batch_size, self.config.model.context, self.accumulation,
                self.runtime.world, self.config.curriculum.schedule,
            )

        display = Display(self.runtime.is_main, self.step, train.max_steps)
        window_start, window_tokens = time.perf_counter(), 0
        mfu_warned = False
        with StopSignal() as stop, display:
            while self.step < train.max_steps:
                record = self.train_step()
                window_tokens += train.batch_tokens
                stop_requested = self.runtime.any(stop.received is not None)

                if self.step % train.log_interval == 0 or self.step == train.max_steps:
                    elapsed = time.perf_counter() - window_start
                    record["tokens_per_s"] = window_tokens / elapsed
                    if flops_per_token is not None and peak:
                        record["mfu"] = 3 * flops_per_token * record["tokens_per_s"] / (peak * self.runtime.world)
                        if record["mfu"] > 1.0 and not mfu_warned:
                            mfu_warned = True
                            log.warning(
                                "MFU above 100%%: the peak of %.3g FLOP/s is too low, probably measured while other jobs "
                                "used the cores; set train.peak_flops or delete ~/.cache/spikewalze/peak_flops.json",
                                peak,
                            )
                    window_start, window_tokens = time.perf_counter(), 0
                if metrics is not None:
                    metrics.write(record)
                display.update(record)

                if self.nonfinite_in_a_row >= train.max_nonfinite_steps:
                    path = self.save()
                    raise UserError(
                        f"training stopped: the loss was non-finite in {self.nonfinite_in_a_row} steps in a row (up to step {self.step}); "
                        f"the last good weights are saved in {path}; lower train.lr or raise train.warmup_steps and run "
                        f"`{self.runtime.launcher()} resume {self.run_dir} --set train.lr=...`"
                    )

                if self.step % train.eval_interval == 0 or self.step == train.max_steps:
                    self._validate_and_keep_best(metrics, display)
                if self.step % train.checkpoint_interval == 0 or self.step == train.max_steps or stop_requested:
                    self.save()

                if stop_requested:
                    display.close()
                    if self.runtime.is_main:
                        console.print(
                            f"[yellow]{stop.received or 'stop signal'}: stopped after step {self.step}, checkpoint saved.[/] "
                            f"Resume with:\n  {self.runtime.launcher()} resume {escape(str(self.run_dir))}",
                            highlight=False,
                            soft_wrap=True,
                        )
                    raise KeyboardInterrupt

        if self.last_saved_step != self.step:
            self.save()
        if metrics is not None:
            metrics.close()
            plot = plot_run(self.run_dir)
            log.info("done: step %d, checkpoints in %s, curves in %s", self.step, self.run_dir / "checkpoints", plot)
            if self.last_validation is not None:
                log.info(
                    "validation: %.4f bits per byte (a unigram model of the training tokens: %.4f)",
                    self.last_validation["bpb"], self.unigram_bpb,
                )
        return self.run_dir

    def _validate_and_keep_best(self, metrics: MetricsLog | None, display: Display) -> None:
        record = self.validate()
        self.last_validation = record
        admitted = self.curriculum.observe_validation({s: v["loss"] for s, v in record["stages"].items()}, self.stages)
        record["curriculum"] = dict(self.curriculum.state)
        if admitted is not None:
            log.info("step %d: curriculum admits stage %s", self.step, admitted)
        if metrics is not None:
            metrics.write(record)
        display.validation(record)
        if self.best_loss is None or record["loss"] < self.best_loss:
            self.best_loss = record["loss"]
            self.save(BEST)

    def _mfu_inputs(self) -> tuple[float | None, float | None]:
        """Return forward FLOPs per token and the peak FLOP/s, if known.

        Training uses the soft gate, which runs the expert for every token whatever the gate value,
        so the count is the dense one (spike_rate=None; no expert at all with spike.mode never).
        """
        try:
            from spikewalze_cli.model.flops import forward_flops_per_token

            flops = forward_flops_per_token(self.config.model, self.inputs.tokens.vocab_size, self.config.model.context, spike_rate=None)
            per_token = float(flops.actual)
        except (ImportError, AttributeError) as error:
            log.debug("no FLOP count for MFU: %s", error)
            return None, None
        peak = self.config.train.peak_flops
        if peak is None and self.runtime.is_main:
            dtype = torch.bfloat16 if self.config.train.precision == "bf16" else torch.float32
            peak = measure_peak_flops(self.runtime.device, dtype)
        return per_token, peak
