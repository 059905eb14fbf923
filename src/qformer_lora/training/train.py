"""The training recipe: :func:`setup` builds everything, :func:`run_epochs` is the loop.

Read :func:`train` first (four lines), then :func:`setup` (checks, model and LoRA, data,
optimizer and schedule, step options, resume, the step's pieces), then the loop: epochs of
accumulation groups, each through the one training step (training/step.py), then
validation, metrics and checkpoints.

Choices that make runs comparable:
* The loss of an accumulation group is the summed token loss divided by the group's
  target count, so batch 8 x 1 and batch 2 x 4 give the same curve.
* The model runs in eval mode (no dropout in the frozen parts or the Q-Former) and the
  data order of epoch e is a permutation seeded by (seed, e), so resuming from a
  checkpoint replays exactly what an uninterrupted run would have done.
* Under ``torchrun`` (training/distributed.py) each of N processes takes its shard of that
  order and DDP averages the adapter gradients: batch 4 on 2 processes follows the curve
  of batch 8 on one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import (
    checkpoint,
    data,
    formats,
    forward,
    inputs,
    known_warnings,
    lora,
    pause_points,
    precision,
    presets,
    quantization,
    tasks,
)
from ..diagnostics import doctor
from . import auto_batch, distributed, feature_cache, metrics_log, run_dir, run_lock, step_options, validation
from .loader import EpochLoader, default_workers
from .run_config import TrainConfig  # the options; what callers pass to train()
from .step import StepParts, linear_warmup_decay, make_step, read_steps, training_step

# ----------------------------------------------------------------------------- set-up

GUARD_COUNTERS = ("rollbacks", "skipped")  # numerics.Guard's state a checkpoint carries


def adapter_model(base, spec: lora.LoraSpec, precision_name: str):
    """``base`` with LoRA per ``spec``, adapters in the precision's adapter dtype, in eval mode."""
    model = lora.apply_lora(base, spec)
    # Adapters train in fp32 whatever peft's default is; fp16-pure deliberately does not.
    for param in lora.adapter_parameters(model):
        param.data = param.data.to(precision.get(precision_name).adapters)
    return model.eval()  # no dropout anywhere: see the module docstring


def build_adapter_model(config: TrainConfig, device: str | torch.device = "cpu"):
    """Base model in the precision's weight dtype (its language model quantized per
    ``config.quantize_language_model``), LoRA in the chosen scope, adapters per the precision table.

    ``device``: where the base model is built or loaded (a 4B model initialised on the CPU
    first takes minutes; the trial runs build full-size presets directly on the GPU)."""
    weights = precision.get(config.precision).weights
    if config.base_checkpoint:
        base = presets.load_model(config.base_checkpoint, device=device, dtype=weights)
    else:
        base = presets.build_model(config.preset, device=device, dtype=weights, seed=config.seed)
    quantization.quantize_language_model(base, config.quantize_language_model, compute_dtype=weights)
    torch.manual_seed(config.seed)  # LoRA's random A init
    spec = lora.LoraSpec(
        r=config.lora_r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        targets=tuple(config.targets),
        scope=config.scope,
        exclude_untrainable=config.exclude_untrainable,
    )
    return adapter_model(base, spec, config.precision), spec


def groups_of(iterable, size: int):
    group = []
    for item in iterable:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


@dataclass
class Run:
    """What :func:`setup` built and the loop uses; ``global_step`` advances as it trains."""

    config: TrainConfig
    device: torch.device
    log: metrics_log.MetricsLog  # metrics.jsonl (+ TensorBoard with --log tensorboard)
    model: torch.nn.Module
    collator: inputs.Collator
    train_set: data.ManifestDataset
    val_set: data.ManifestDataset
    train_loader: EpochLoader
    val_loader: EpochLoader
    baseline: float  # majority-answer accuracy of the validation set
    parts: StepParts
    cache: object  # feature_cache.FeatureCache or None
    steps_per_epoch: int
    start_epoch: int = 1
    global_step: int = 0
    position: dict | None = None  # resumed from a step checkpoint: where in start_epoch (checkpoint.save)
    train_samples: int = 0  # samples of the optimizer steps taken by this process's run (all ranks)
    train_s: float = 0.0  # seconds spent in those epochs' steps (no validation, no checkpoints)


def _check_before_building(config: TrainConfig, resume, device: torch.device):
    """Resume point, run directory and precision, all checked before anything is built or written."""
    resume_from = run_dir.resume_point(Path(config.output_dir), resume) if resume is not None else None
    if resume_from is not None:
        run_dir.check_resume_options(resume_from, config)
    if resume is None and not config.overwrite:
        run_dir.refuse_earlier_run(Path(config.output_dir))
    metrics_log.summary_writer(config.log)  # --log tensorboard without its package: say so before building
    findings = doctor.examine(config, device=device)  # refuse known-bad precision before building anything
    doctor.enforce(findings, config.allow_unsafe)
    return resume_from, findings


def _datasets(config: TrainConfig, model):
    """Collator and the training / validation datasets for ``model``'s family and image size."""
    base_config = model.get_base_model().config
    family = "instructblip" if base_config.model_type == "instructblip" else "blip2"
    processor = data.build_processor(family, config.base_checkpoint, image_size=base_config.vision_config.image_size)
    collator = inputs.Collator.for_model(
        processor, base_config, config, static_shapes=config.compile_qformer or config.compile_frozen
    )
    # any format (formats.read); a source of several splits gives its train and its val split
    train_samples = formats.read(config.train_manifest, config.data_format, config.image_root, split="train")
    val_samples = formats.read(config.val_manifest, config.data_format, config.image_root, split="val")
    draft_size = base_config.vision_config.image_size if config.image_decode == "draft" else None
    datasets = (data.ManifestDataset(samples, draft_size=draft_size) for samples in (train_samples, val_samples))
    return collator, *datasets


def _compile(config: TrainConfig, model, optimizer, probe_batch: dict | None, device: torch.device) -> list:
    """The compile step options (compile_mode's Choice first); the model's probe compiles forward and
    backward on one batch (gradients dropped), the optimizer's one step on zero gradients (undone)."""

    def probe(_compiled):
        with precision.autocast(config.precision, device):
            forward.custom_forward(model, probe_batch, reduction="sum").loss.backward()
        optimizer.zero_grad(set_to_none=True)

    choices = step_options.compile_step_modules(
        model,
        qformer=config.compile_qformer,
        frozen=config.compile_frozen,
        mode=config.compile_mode,
        probe=probe,
        device_type=device.type,
    )
    if config.compile_optimizer:
        if not choices:  # the mode's Choice, once
            choices.append(step_options.compile_mode_kwargs(config.compile_mode, device.type)[1])
        choices.append(step_options.compile_optimizer_step(optimizer, True, mode=config.compile_mode))
    return choices


def uses_cudagraphs(config: TrainConfig, device: torch.device) -> bool:
    """Whether the step runs CUDA graphs: compile_mode reduce-overhead with something compiled, on CUDA."""
    compiled = config.compile_qformer or config.compile_frozen or config.compile_optimizer
    return compiled and device.type == "cuda" and config.compile_mode == "reduce-overhead"


def _optimizer(config: TrainConfig, model, train_samples: int, choices: list):
    """AdamW over the adapter (its implementation appended to ``choices``) and the warm-up/decay schedule."""
    optimizer, choice = step_options.make_optimizer(
        lora.adapter_parameters(model),
        lr=config.lr,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        fused=config.fused_optimizer,
    )
    choices.append(choice)
    global_batch = config.batch_size * distributed.world_size()
    steps_per_epoch = math.ceil(math.ceil(train_samples / global_batch) / config.grad_accum)
    scheduler = linear_warmup_decay(optimizer, config.warmup_steps, steps_per_epoch * config.epochs)
    return optimizer, scheduler, steps_per_epoch


def _check_model(findings, model, optimizer, allow_unsafe: bool) -> None:
    """The doctor again, on the built model and optimizer (the dtypes really in use); new findings only."""
    reported = {f.code for f in findings}
    doctor.enforce([f for f in doctor.check_model(model, optimizer) if f.code not in reported], allow_unsafe)


def _seeded_model(config: TrainConfig, device: torch.device) -> tuple:
    """(the adapter model on ``device``, seeded and scope-checked; [its LM checkpointing choice])."""
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)
    model, spec = build_adapter_model(config)
    model.to(device)
    lora.check_trainable_scope(model, spec.scope)  # refuse to train anything outside the scope
    return model, [step_options.set_lm_checkpointing(model, config.lm_checkpointing)]


def setup(config: TrainConfig, resume, device: torch.device) -> Run:
    """Everything the loop needs, built in order; nothing is written before the checks pass."""
    resume_from, findings = _check_before_building(config, resume, device)
    model, choices = _seeded_model(config, device)
    collator, train_set, val_set = _datasets(config, model)
    config, auto_record = auto_batch.resolve(config, model, collator, train_set, device, resume_from)  # auto: a number

    optimizer, scheduler, steps_per_epoch = _optimizer(config, model, len(train_set), choices)
    scaler = precision.grad_scaler(config.precision, device)

    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = metrics_log.MetricsLog(out_dir, config.log)
    cache = step_options.build_feature_cache(
        model, config.feature_cache, config.feature_cache_dir or out_dir / "feature_cache"
    )
    probe_batch = None
    if config.compile_qformer or config.compile_frozen:
        first = EpochLoader(train_set, collator, config.batch_size, config.seed, shuffle=False).epoch(0)
        probe_batch = inputs.to_device(next(iter(first)), device)
    choices += _compile(config, model, optimizer, probe_batch, device)
    start_epoch, global_step, state = 1, 0, {}
    if resume_from is not None:
        state = checkpoint.restore(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        # a step checkpoint continues inside its epoch, an epoch's checkpoint with the next one
        start_epoch, global_step = state["epoch"] + ("position" not in state), state["global_step"]
        log.resume_after(global_step, epochs_done=start_epoch - 1)
    else:
        run_dir.clear_earlier_run(out_dir)  # only --overwrite gets here with one: a fresh run starts fresh
    _check_model(findings, model, optimizer, config.allow_unsafe)

    parts = make_step(
        model,
        optimizer,
        scheduler,
        precision_name=config.precision,
        device=device,
        guard=config.guard,
        max_grad_norm=config.max_grad_norm,
        cache=cache,
        scaler=scaler,
        max_rollbacks=config.max_rollbacks,
        rollback_lr_factor=config.rollback_lr_factor,
        on_event=log.record,
        deferred=config.sync_every > 0,
        cudagraphs=uses_cudagraphs(config, device),
    )
    for name, count in (state.get("guard") or {}).items():  # the guard's counters go on where they stood
        setattr(parts.guard, name, count)
    log.record({"type": "step_options", "step": global_step, "choices": [c.as_dict() for c in choices]})
    if auto_record is not None:  # what --batch-size auto chose, and why
        log.record(auto_record | {"step": global_step})
    baseline = validation.majority_baseline(val_set.samples)
    sets = (collator, train_set, val_set, *_loaders(config, train_set, val_set, collator, device), baseline)
    position = state.get("position")
    return Run(config, device, log, model, *sets, parts, cache, steps_per_epoch, start_epoch, global_step, position)


def _loaders(config: TrainConfig, train_set, val_set, collator, device: torch.device) -> tuple:
    """The run's training and validation loaders (training/loader.py): workers and pinned memory."""
    workers = default_workers(device) if config.num_workers is None else config.num_workers
    options = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    return (
        EpochLoader(train_set, collator, config.batch_size, config.seed, shuffle=True, **options),
        EpochLoader(val_set, collator, config.batch_size, config.seed, shuffle=False, **options),
    )


# ----------------------------------------------------------------------------- the loop


def train(config: TrainConfig, resume: str | os.PathLike | None = None, device: str | None = None) -> dict:
    """Run training; returns the final metrics. ``resume``: a checkpoint dir or 'latest'.

    metrics.jsonl gets, besides the step and epoch records, one ``warning`` record per known
    upstream warning (known_warnings.py: kept off the terminal) and a closing ``end`` record:
    wall time of this call, training samples and seconds, samples/s (training/summary.py)."""
    # deterministic mode is process-wide in torch: restore the caller's setting afterwards
    previous = torch.are_deterministic_algorithms_enabled()
    wall_start = time.perf_counter()
    device, started = distributed.setup(device)  # a process group under torchrun, nothing otherwise
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # one writer per run directory (training/run_lock.py): rank 0 holds it, released on errors too
        lock = run_lock.RunLock(config.output_dir) if distributed.is_main() else contextlib.nullcontext()
        with lock, known_warnings.Recorder() as hidden:
            run = setup(config, resume, device)
            hidden.attach(lambda record: run.log.record({"type": "warning", "step": run.global_step, **record}))
            with run.log:  # the TensorBoard event file is flushed and closed on errors too
                metrics = run_epochs(run)
                run.log.record(_end_record(run, time.perf_counter() - wall_start))
                return metrics
    finally:
        distributed.teardown(started)
        torch.use_deterministic_algorithms(previous)


def _end_record(run: Run, wall_s: float) -> dict:
    """The run's closing log record: what the summary needs that the step records do not hold."""
    return {
        "type": "end",
        "step": run.global_step,
        "wall_s": wall_s,
        "train_samples": run.train_samples,
        "train_s": run.train_s,
        "samples_per_s": run.train_samples / run.train_s if run.train_s > 0 else None,
    }


def run_epochs(run: Run) -> dict:
    """The epochs from ``run.start_epoch``; returns the last epoch's metrics."""
    config = run.config
    if run.start_epoch == 1 and run.position is None:  # the start, so "how much did it learn" has a reference
        run.log.record({"type": "epoch", "epoch": 0, "step": 0, **_validate(run, 0), **_task_metrics(run, 0)})
    last_epoch = config.epochs if config.stop_after_epochs is None else min(config.epochs, config.stop_after_epochs)
    metrics: dict = {}
    for epoch in range(run.start_epoch, last_epoch + 1):
        loss_sum, tokens = train_epoch(run, epoch)
        metrics = end_epoch(run, epoch, loss_sum, tokens)
    return metrics


def train_epoch(run: Run, epoch: int) -> tuple[float, int]:
    """One epoch of optimizer steps; returns the summed answer-token loss and the token count."""
    config = run.config
    # resumed from a step checkpoint: skip the micro-batches it had consumed (never loaded) and
    # go on with the epoch's running totals
    position, run.position = dict(run.position or {"batches": 0, "loss_sum": 0.0, "tokens": 0}), None
    loader = run.train_loader.epoch(epoch, skip_batches=position["batches"])
    bar = tqdm(
        groups_of(loader, config.grad_accum),
        total=run.steps_per_epoch,
        initial=position["batches"] // config.grad_accum,
        disable=not (config.progress and distributed.is_main()),
        desc=f"epoch {epoch}/{config.epochs}",
        leave=False,
    )
    epoch_started = time.perf_counter()
    pending, interval_started = [], epoch_started  # deferred host reads: steps not read yet
    for group in bar:
        position["batches"] += len(group)
        started = time.perf_counter()
        if run.cache is not None:  # hash the pixels on the CPU copy, before the transfer
            for b in group:
                b["image_keys"] = feature_cache.pixel_keys(b["pixel_values"])
        result = training_step(run.parts, [inputs.to_device(b, run.device) for b in group], run.global_step)
        if run.parts.deferred:  # the schedule counted it; its results are read once per interval
            run.global_step += 1
            pause_points.reached("step")
            pending.append(result)
            if len(pending) < config.sync_every and not _save_due(run):
                continue
            _read_pending(run, epoch, bar, position, pending, interval_started)
            pending, interval_started = [], time.perf_counter()
        elif result.stepped:
            run.global_step += 1
            pause_points.reached("step")
            lr = run.parts.scheduler.get_last_lr()[0]
            sps = result.samples / (time.perf_counter() - started)
            _log_step(run, epoch, bar, position, result, run.global_step, lr, sps)
        else:
            continue
        if _save_due(run):  # never with unread deferred steps: they were read above
            _save(run, epoch, position=dict(position))
    _read_pending(run, epoch, bar, position, pending, interval_started)
    run.train_s += time.perf_counter() - epoch_started
    return position["loss_sum"], position["tokens"]


def _save_due(run: Run) -> bool:
    """A step checkpoint is taken after this optimizer step (--save-steps)."""
    return bool(run.config.save_steps) and run.global_step % run.config.save_steps == 0 and distributed.is_main()


def _log_step(run: Run, epoch: int, bar, position: dict, result, step: int, lr: float, samples_per_s: float) -> None:
    """Optimizer step ``step``'s log record, the progress bar, and the epoch's running totals."""
    record = {
        "type": "step",
        "epoch": epoch,
        "step": step,
        "loss": result.loss,
        "lr": lr,
        "grad_norm": float(result.grad_norm),
        "samples_per_s": samples_per_s,
    }
    run.log.record(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=f"{record['samples_per_s']:.1f}")
    position["loss_sum"] += result.loss_sum
    position["tokens"] += result.tokens
    run.train_samples += result.samples


def _read_pending(run: Run, epoch: int, bar, position: dict, pending: list, started: float) -> None:
    """Deferred host reads: the interval's steps read at once (step.read_steps, where the guard acts)
    and logged as training_step's would be, each at its own step number; samples/s is the interval's."""
    results = read_steps(run.parts, pending)
    samples_per_s = sum(r.samples for r in results) / max(time.perf_counter() - started, 1e-9)
    for step, result in zip(pending, results):
        if result.stepped:  # numbered as the schedule counts: step.index + 1
            _log_step(run, epoch, bar, position, result, step.index + 1, step.lr, samples_per_s)


def _save(run: Run, epoch: int, **where) -> None:
    """A checkpoint of the run now (checkpoint.save): ``where`` gives metrics and keep (an epoch's
    end) or position (a step checkpoint)."""
    checkpoint.save(
        Path(run.config.output_dir),
        epoch,
        model=run.model,
        optimizer=run.parts.optimizer,
        scheduler=run.parts.scheduler,
        scaler=run.parts.scaler,
        global_step=run.global_step,
        config=asdict(run.config),
        keep_last=run.config.keep_last or None,
        guard={name: getattr(run.parts.guard, name) for name in GUARD_COUNTERS if hasattr(run.parts.guard, name)},
        **where,
    )


def _task_metrics(run: Run, epoch: int) -> dict:
    """With --eval-every N: the validation data's task metrics (tasks.evaluate, by generation) as
    eval_<metric>, at epoch 0 (zero-shot), every N epochs and at the last; {} otherwise."""
    config = run.config
    if not config.eval_every or not (epoch == 0 or epoch % config.eval_every == 0 or epoch == config.epochs):
        return {}
    data_format = config.data_format
    if data_format == formats.AUTO:
        data_format = formats.detect(config.val_manifest)
    task = tasks.task_of(run.val_set.samples, data_format)
    options = tasks.GenerationOptions(batch_size=config.batch_size)
    with precision.autocast(config.precision, run.device):
        results, _ = tasks.evaluate(run.model, run.collator, run.val_set.samples, task, options, progress=False)
    return {f"eval_{name}": value for name, value in results.items() if isinstance(value, float)}


def _best_epoch(run: Run, metrics: dict) -> int | None:
    """The epoch best by --best-metric among the logged epochs 1.. and ``metrics`` (this epoch's);
    read back from metrics.jsonl, which a resume truncates to its checkpoint, so it resumes too."""
    name = run.config.best_metric
    if name is None:
        return None
    sign = -1 if name == "val_loss" else 1  # val_loss falls as the model improves, the others rise
    logged = run_dir.epoch_records(run.log.path) + [metrics]
    scored = [(sign * r[name], -r["epoch"], r["epoch"]) for r in logged if r["epoch"] >= 1 and name in r]
    return max(scored)[2] if scored else None  # a tie goes to the earlier epoch


def _validate(run: Run, epoch: int) -> dict:
    loader = run.val_loader.epoch(epoch)
    return {
        **validation.evaluate(run.model, loader, run.config.precision, run.device, run.cache),
        "majority_baseline": run.baseline,
    }


def end_epoch(run: Run, epoch: int, loss_sum: float, tokens: int) -> dict:
    """Validation, the epoch's log record and, on the cadence, a checkpoint; returns the record."""
    config = run.config
    run.parts.guard.check_parameters(run.global_step)  # never evaluate or checkpoint a non-finite adapter
    metrics = {
        "type": "epoch",
        "epoch": epoch,
        "step": run.global_step,
        "train_loss": loss_sum / max(tokens, 1),
        **_validate(run, epoch),
        **_task_metrics(run, epoch),
    }
    if run.cache is not None:
        metrics["feature_cache_hit_rate"] = run.cache.stats.hit_rate
    best = _best_epoch(run, metrics)
    if best is not None:
        metrics["best_epoch"] = best
    run.log.record(metrics)
    main = distributed.is_main()
    if config.progress and main:
        tqdm.write(
            f"epoch {epoch}: train loss {metrics['train_loss']:.4f}  val loss {metrics['val_loss']:.4f}  "
            f"val accuracy {metrics['val_accuracy']:.3f} (majority answer {run.baseline:.3f})"
        )
    if main and (checkpoint.should_save(epoch, config.epochs, config.save_every) or best == epoch):
        _save(run, epoch, metrics=metrics, keep=best)
    return metrics
