"""The training loop: AdamW on the Q-Former adapter, nothing hidden.

Read ``train`` top to bottom: build model and LoRA, set precision, data, optimizer and
schedule, optional resume, then epochs of accumulation groups with a finite check
before every optimizer step, validation, metrics and checkpoints.

Choices that make runs comparable:
* The loss of an accumulation group is the summed token loss divided by the group's
  target count, so batch 8 x 1 and batch 2 x 4 give the same curve.
* The model runs in eval mode (no dropout in the frozen parts or the Q-Former) and the
  data order of epoch e is a permutation seeded by (seed, e), so resuming from a
  checkpoint replays exactly what an uninterrupted run would have done.
* Under ``torchrun`` (training/distributed.py) each of N processes takes its shard of that order and
  DDP averages the adapter gradients: batch 4 on 2 processes follows the curve of batch 8
  on one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import checkpoint, data, forward, lora, presets
from ..diagnostics import doctor, numerics
from . import distributed, feature_cache, step_options
from .run_config import ConfigError, TrainConfig  # the options; train.TrainConfig is what callers pass to train()

LOG_FILE = "metrics.jsonl"  # one JSON record a line: step, epoch, step_options and guard events

# Training produced a non-finite input, loss, gradient or parameter; ``.diagnosis`` says where.
NonFiniteError = numerics.NonFiniteError


# ----------------------------------------------------------------------------- set-up


def build_adapter_model(config: TrainConfig, device: str | torch.device = "cpu"):
    """Base model in the precision's weight dtype, LoRA in the chosen scope, adapters in fp32.

    ``device``: where the base model is built or loaded (a 4B model initialised on the CPU
    first takes minutes; doctor.reproduce builds full-size presets directly on the GPU)."""
    # (base weights, adapters, autocast) per precision: one table, shared with the doctor
    weight_dtype, adapter_dtype, _ = doctor.PRECISION_DTYPES[config.precision]
    if config.base_checkpoint:
        base = presets.load_model(config.base_checkpoint, device=device, dtype=weight_dtype)
    else:
        base = presets.build_model(config.preset, device=device, dtype=weight_dtype, seed=config.seed)
    torch.manual_seed(config.seed)  # LoRA's random A init
    spec = lora.LoraSpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                         targets=tuple(config.targets), scope=config.scope)
    model = lora.apply_lora(base, spec)
    # Adapters train in fp32 whatever peft's default is; fp16-pure deliberately does not.
    for param in lora.adapter_parameters(model):
        param.data = param.data.to(adapter_dtype)
    model.eval()  # no dropout anywhere: see the module docstring
    return model, spec


def autocast_context(precision: str, device: torch.device):
    if precision == "fp16-amp":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def linear_warmup_decay(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_loader(dataset, collator, batch_size: int, seed: int, epoch: int, shuffle: bool):
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    sampler = torch.utils.data.RandomSampler(dataset, generator=generator) if shuffle else None
    if shuffle and distributed.world_size() > 1:  # under torchrun: this process's shard of the same order
        return distributed.shard_loader(dataset, collator, batch_size, sampler)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator)


def groups_of(iterable, size: int):
    group = []
    for item in iterable:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, loader, precision: str, device, cache=None) -> dict:
    """Validation token loss and answer accuracy (all answer tokens right, teacher-forced)."""
    loss_sum, tokens, correct, total = 0.0, 0, 0, 0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast_context(precision, device):
            batch = feature_cache.attach_cached_features(model, batch, cache)
            out = forward.custom_forward(model, batch, reduction="sum")
        loss_sum += float(out.loss)
        tokens += forward.target_count(batch)
        correct_rows = answer_correct(model, out.logits, batch)
        correct += int(correct_rows.sum())
        total += len(correct_rows)
    return {"val_loss": loss_sum / max(tokens, 1), "val_accuracy": correct / max(total, 1)}


def answer_correct(model, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    labels = batch["labels"]
    if model.config.use_decoder_only_language_model:
        # logits at position i predict token i+1; text starts after the query positions
        text_logits = logits[:, -labels.shape[1]:, :]
        predictions, labels = text_logits[:, :-1].argmax(-1), labels[:, 1:]
    else:
        predictions = logits.argmax(-1)
    target = labels != forward.IGNORE_INDEX
    return ((predictions == labels) | ~target).all(dim=1)


def majority_baseline(samples) -> float:
    counts = Counter(s.answer.strip().lower() for s in samples)
    return counts.most_common(1)[0][1] / len(samples)


# ----------------------------------------------------------------------------- the loop


def _append_jsonl(path: Path, record: dict) -> None:
    if not distributed.is_main():  # under torchrun only rank 0 writes the log
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (an interrupted run's tail).

    A last line cut short (the process died while writing it) is dropped too; any other line
    that is not a log record is an error naming it.
    """
    if not path.exists() or not distributed.is_main():
        return
    lines, kept = path.read_text(encoding="utf-8").splitlines(), []
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError) as err:
            if number == len(lines) and isinstance(err, json.JSONDecodeError):
                break  # torn by the interruption this resume recovers from
            raise checkpoint.CheckpointError(f"{path}:{number}: not a log record ({err}); fix or delete the line")
        if not isinstance(step, int):
            raise checkpoint.CheckpointError(f"{path}:{number}: field 'step' is {step!r}, not an integer")
        if step <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _resume_point(run_dir: Path, resume) -> Path:
    """The checkpoint ``resume`` names ('latest': the run's newest), checked before anything is built."""
    path = checkpoint.latest_checkpoint(run_dir) if str(resume) == "latest" else Path(resume)
    if path is None:
        raise checkpoint.CheckpointError(f"{run_dir}: no checkpoint to resume from")
    if not path.is_dir():
        raise checkpoint.CheckpointError(f"{path}: no such checkpoint directory")
    return path


# What a resumed run takes from its checkpoint: the adapter's shape (another one cannot load)
# and the optimizer settings its restored state carries (another --lr was silently overridden).
RESUME_KEEPS = ("preset", "base_checkpoint", "scope", "targets", "lora_r", "lora_alpha", "lr", "weight_decay",
                "adam_eps")


def _check_resume_options(path: Path, config: TrainConfig) -> None:
    state_file = path / checkpoint.STATE_FILE
    if not state_file.is_file():
        return  # checkpoint.restore names what is missing
    saved = json.loads(state_file.read_text(encoding="utf-8")).get("config", {})

    def same(name: str) -> bool:
        old, new = saved[name], getattr(config, name)
        if name == "targets":
            return list(old) == list(new)
        if name == "base_checkpoint" and old and new:
            return old == new or Path(old).resolve() == Path(new).resolve()
        return old == new

    differ = [f"{name}={saved[name]!r} (this run: {getattr(config, name)!r})" for name in RESUME_KEEPS
              if name in saved and not same(name)]
    if differ:
        raise checkpoint.CheckpointError(f"{path} was trained with {', '.join(differ)}; a resumed run keeps the "
                                         f"checkpoint's values: leave these options out, or start a new run")


def _earlier_run(run_dir: Path) -> list[str]:
    """What in ``run_dir`` an earlier run left: its log and its checkpoints."""
    return ([LOG_FILE] if (run_dir / LOG_FILE).exists() else []) + [
        f"checkpoints/{p.name}" for p in checkpoint.list_checkpoints(run_dir)]


def _refuse_earlier_run(run_dir: Path) -> None:
    # a fresh run here would replace the log but keep the old checkpoints, and pruning
    # (keep_last) would then delete the new run's own checkpoints before the old ones
    earlier = _earlier_run(run_dir)
    if earlier:
        raise ConfigError(f"{run_dir}: holds an earlier run ({', '.join(earlier)}); continue it with --resume, "
                          f"start afresh with --overwrite true, or choose another --output-dir")


def _clear_earlier_run(run_dir: Path) -> None:
    if distributed.is_main():
        (run_dir / LOG_FILE).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def train(config: TrainConfig, resume: str | os.PathLike | None = None, device: str | None = None) -> dict:
    """Run training; returns the final metrics. ``resume``: a checkpoint dir or 'latest'."""
    # deterministic mode is process-wide in torch: restore the caller's setting afterwards
    previous = torch.are_deterministic_algorithms_enabled()
    device, started = distributed.setup(device)  # a process group under torchrun, nothing otherwise
    try:
        return _run(config, resume, device)
    finally:
        distributed.teardown(started)
        torch.use_deterministic_algorithms(previous)


def _run(config: TrainConfig, resume, device) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    main = distributed.is_main()
    run_dir = Path(config.output_dir)
    # both checked before anything is built or written
    resume_from = _resume_point(run_dir, resume) if resume is not None else None
    if resume_from is not None:
        _check_resume_options(resume_from, config)
    if resume is None and not config.overwrite:
        _refuse_earlier_run(run_dir)
    findings = doctor.examine(config, device=device)  # refuse known-bad precision before building anything
    doctor.enforce(findings, config.allow_unsafe)
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)

    model, spec = build_adapter_model(config)
    model.to(device)
    lora.check_trainable_scope(model, spec.scope)  # refuse to train anything outside the scope
    choices = [step_options.set_lm_checkpointing(model, config.lm_checkpointing)]
    compiling = config.compile_qformer or config.compile_frozen
    preset_family = model.get_base_model().config.model_type
    family = "instructblip" if preset_family == "instructblip" else "blip2"
    decoder_only = model.get_base_model().config.use_decoder_only_language_model
    image_size = model.get_base_model().config.vision_config.image_size

    processor = data.build_processor(family, config.base_checkpoint, image_size=image_size)
    collator = data.Collator(processor, family=family, decoder_only=decoder_only,
                             max_prompt_tokens=config.max_prompt_tokens, max_answer_tokens=config.max_answer_tokens,
                             static_shapes=compiling)
    train_samples = data.read_manifest(config.train_manifest, config.image_root)
    val_samples = data.read_manifest(config.val_manifest, config.image_root)
    train_set, val_set = data.ManifestDataset(train_samples), data.ManifestDataset(val_samples)

    params = lora.adapter_parameters(model)
    optimizer, choice = step_options.make_optimizer(params, lr=config.lr, eps=config.adam_eps,
                                                    weight_decay=config.weight_decay, fused=config.fused_optimizer)
    choices.append(choice)
    global_batch = config.batch_size * distributed.world_size()
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / global_batch) / config.grad_accum)
    scheduler = linear_warmup_decay(optimizer, config.warmup_steps, steps_per_epoch * config.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16-amp")

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / LOG_FILE
    cache = step_options.build_feature_cache(model, config.feature_cache,
                                             config.feature_cache_dir or run_dir / "feature_cache")
    if compiling:
        # the probe compiles forward and backward on one batch; its gradients are dropped
        probe_batch = to_device(next(iter(make_loader(train_set, collator, config.batch_size, config.seed, 0,
                                                      shuffle=False))), device)

        def probe(_compiled):
            with autocast_context(config.precision, device):
                forward.custom_forward(model, probe_batch, reduction="sum").loss.backward()
            optimizer.zero_grad(set_to_none=True)

        # static shapes: the collator pads every text to one length; a smaller last batch
        # compiles once more. Dynamic-shape recompiles failed in inductor (torch 2.11, H200).
        if config.compile_qformer:
            choices.append(step_options.maybe_compile(model.get_base_model().qformer, True, probe=probe,
                                                      dynamic=False)[1])
        if config.compile_frozen:
            choices.append(step_options.compile_frozen_blocks(model, True, probe=probe, dynamic=False))
    start_epoch, global_step = 1, 0
    if resume_from is not None:
        state = checkpoint.restore(resume_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        _truncate_log(log_path, global_step)
    else:
        _clear_earlier_run(run_dir)  # only --overwrite gets here with one: a fresh run starts fresh

    reported = {f.code for f in findings}
    doctor.enforce([f for f in doctor.check_model(model, optimizer) if f.code not in reported], config.allow_unsafe)

    trainer = distributed.wrap(model, device)  # custom_forward as a module; in DDP under torchrun

    def run_forward(batch):  # the localiser re-runs a failing batch exactly like the loop does
        with autocast_context(config.precision, device):  # cached features: same autocast as the forward
            batch = feature_cache.attach_cached_features(model, batch, cache)
            return trainer(batch, reduction="sum")

    guard = numerics.Guard(config.guard, model, optimizer, scheduler, run_forward=run_forward,
                           max_rollbacks=config.max_rollbacks, rollback_lr_factor=config.rollback_lr_factor,
                           on_event=lambda record: _append_jsonl(log_path, record))
    baseline = majority_baseline(val_samples)
    _append_jsonl(log_path, {"type": "step_options", "step": global_step, "choices": [c.as_dict() for c in choices]})
    if start_epoch == 1:  # where the run starts from, so "how much did it learn" has a reference
        val_loader = make_loader(val_set, collator, config.batch_size, config.seed, 0, shuffle=False)
        _append_jsonl(log_path, {"type": "epoch", "epoch": 0, "step": 0,
                                 **evaluate(model, val_loader, config.precision, device, cache),
                                 "majority_baseline": baseline})
    last_epoch = config.epochs if config.stop_after_epochs is None else min(config.epochs, config.stop_after_epochs)
    metrics: dict = {}
    for epoch in range(start_epoch, last_epoch + 1):
        loader = make_loader(train_set, collator, config.batch_size, config.seed, epoch, shuffle=True)
        bar = tqdm(groups_of(loader, config.grad_accum), total=steps_per_epoch,
                   disable=not (config.progress and main), desc=f"epoch {epoch}/{config.epochs}", leave=False)
        epoch_loss, epoch_tokens = 0.0, 0
        for group in bar:
            started = time.perf_counter()
            if cache is not None:  # hash the pixels on the CPU copy, before the transfer
                for b in group:
                    b["image_keys"] = feature_cache.pixel_keys(b["pixel_values"])
            group = [to_device(b, device) for b in group]
            inputs_ok = guard.inputs_ok(group, global_step)  # one isfinite per batch on pixel_values
            # totals over all processes under torchrun (one all-reduce): every rank skips the same
            # groups, and the loss is normalised by the global target count
            bad_inputs, group_tokens, samples = distributed.all_sum(
                [int(not inputs_ok), sum(forward.target_count(b) for b in group),
                 sum(distributed.sample_count(b) for b in group)], device)
            if bad_inputs:
                continue
            batch_losses = []
            for i, batch in enumerate(group):
                with distributed.accumulating(trainer, last=i == len(group) - 1):
                    out = run_forward(batch)
                    # x processes: DDP averages the ranks' gradients, this makes the average their sum
                    loss = out.loss / group_tokens * distributed.world_size()
                    scaler.scale(loss).backward()
                batch_losses.append(float(out.loss.detach()))
            group_loss, = distributed.all_sum([sum(batch_losses)], device)
            scaler.unscale_(optimizer)
            # leaves non-finite gradients as they are, so the localiser can name the first one
            grad_norm = numerics.clip_gradients(params, config.max_grad_norm)
            finite = math.isfinite(group_loss) and bool(torch.isfinite(grad_norm))
            if not finite:
                if _on_non_finite(guard, global_step, group, batch_losses, grad_norm, scaler) == "skip":
                    optimizer.zero_grad(set_to_none=True)
                    continue
            else:
                guard.healthy()  # rollback's snapshot: the state this finite step was computed from
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            record = {"type": "step", "epoch": epoch, "step": global_step, "loss": group_loss / group_tokens,
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "samples_per_s": samples / (time.perf_counter() - started)}
            _append_jsonl(log_path, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            sps=f"{record['samples_per_s']:.1f}")
            epoch_loss += group_loss
            epoch_tokens += group_tokens
        guard.check_parameters(global_step)  # never evaluate or checkpoint a non-finite adapter
        val_loader = make_loader(val_set, collator, config.batch_size, config.seed, epoch, shuffle=False)
        metrics = {"type": "epoch", "epoch": epoch, "step": global_step,
                   "train_loss": epoch_loss / max(epoch_tokens, 1),
                   **evaluate(model, val_loader, config.precision, device, cache), "majority_baseline": baseline}
        if cache is not None:
            metrics["feature_cache_hit_rate"] = cache.stats.hit_rate
        _append_jsonl(log_path, metrics)
        if config.progress and main:
            tqdm.write(f"epoch {epoch}: train loss {metrics['train_loss']:.4f}  val loss {metrics['val_loss']:.4f}  "
                       f"val accuracy {metrics['val_accuracy']:.3f} (majority answer {baseline:.3f})")
        if main and checkpoint.should_save(epoch, config.epochs, config.save_every):
            checkpoint.save(run_dir, epoch, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                            global_step=global_step, config=asdict(config), keep_last=config.keep_last or None,
                            metrics=metrics)
    return metrics


def _on_non_finite(guard: numerics.Guard, step: int, group: list[dict], losses: list[float],
                   grad_norm: torch.Tensor, scaler) -> str:
    """Called only when the cheap check fired: localise, then apply config.guard (numerics.Guard).

    Returns "skip" (drop this group's gradients) or "scaler": an fp16-amp gradient overflow
    with finite loss and parameters, which GradScaler handles itself (skips the step,
    lowers the scale). Raises NonFiniteError carrying the Diagnosis otherwise.
    """
    return guard.non_finite(step, group, losses, grad_norm, scaler_enabled=scaler.is_enabled())
