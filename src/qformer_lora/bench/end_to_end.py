"""The real training loop's speed: JPEG files on disk -> the trainer's data pipeline -> its own step.

bench/measurement.py times the step on a synthetic batch already on the device; a training run
also decodes and processes its images (about 7 ms per COCO-sized JPEG on one core:
training/loader.py), so this module times what ``qformer-lora train`` does. Read
:func:`run` first: it writes a JSONL manifest of ``batch_size x (warmup + steps)`` samples over
COCO-sized JPEG files (:func:`write_images`), builds the model, dataset, collator and loader as
training/train.py does (formats.read, data.ManifestDataset, inputs.Collator, EpochLoader with
its workers and pinned memory), then measures, for each forward,

* ``loop``: one epoch of the loader -> ``inputs.to_device`` -> ``training_step`` (what
  ``train_epoch`` runs), with the host's time blocked on the loader per batch;
* ``step``: the same batches collated and moved to the device beforehand, the step alone.

The forwards: ``custom`` is the trainer's step with the configuration's step options (LM
checkpointing, fused AdamW); ``native`` is the baseline, HF's own forward through the PeftModel
(``run_forward=`` of make_step, as the sweep's native points), without step options. Every
measurement starts from the same adapter weights with a fresh optimizer, so each sees the
same batches from the same state: the losses of ``loop`` and ``step`` are bitwise equal on a
CPU (tests/unit/test_end_to_end.py). The first ``warmup`` steps are not timed; the device is
synchronised before each clock read. Samples/s = timed samples / timed seconds.

Texts are padded to the token budgets (the collator's static shapes), so the step's work is
that of full-length rows whatever the tokenizer makes of the manifest's short texts: prompt
``max_prompt_tokens`` (the Q-Former instruction too) and answer ``max_answer_tokens``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import compat, data, formats, forward, inputs, lora, precision, synthetic
from ..training import step_options, train
from ..training.loader import EpochLoader, default_workers
from ..training.run_config import TrainConfig
from ..training.step import StepParts, linear_warmup_decay, make_step, read_steps, training_step
from . import flops
from .device import device_info, free_memory, is_oom, memory_stats
from .measurement import SequenceShape, synchronize
from .reporting import TARGETS

FORWARDS = ("custom", "native")
MODES = ("loop", "step")
# the run-config fields a report records (the rest do not change the measured step)
REPORTED_OPTIONS = (
    "preset",
    "precision",
    "batch_size",
    "lora_r",
    "scope",
    "lm_checkpointing",
    "fused_optimizer",
    "compile_optimizer",
    "compile_mode",
    "sync_every",
    "deterministic",
    "seed",
)
DISTINCT_IMAGES = 64  # JPEG files written; the manifest names them in turn (write_images)
SCHEDULE_STEPS = 1 << 30  # the warm-up/decay schedule's length: far beyond any benchmark


@dataclass
class Bench:
    """What every measurement shares, built once by :func:`prepare`."""

    config: TrainConfig
    device: torch.device
    model: torch.nn.Module  # the PeftModel
    loader: EpochLoader
    initial: list[torch.Tensor]  # the adapter weights before any step, restored before each measurement
    workers: int  # the loader's worker processes


def check_config(config: TrainConfig) -> None:
    """ValueError for the step options this benchmark does not measure.

    Compiling the model rewrites it in place, so the native baseline would run compiled modules
    too (the custom step's optimizer may be compiled: compile_optimizer); a feature cache is all
    misses in the single epoch measured here."""
    refused = [
        f"--{name.replace('_', '-')}"
        for name, off in (("compile_qformer", False), ("compile_frozen", False), ("feature_cache", "off"))
        if getattr(config, name) != off
    ]
    if refused:
        raise ValueError(f"the end-to-end benchmark measures the eager step; drop {', '.join(refused)}")


def configs(preset: str, precisions, batch_sizes, **fields) -> list[TrainConfig]:
    """One TrainConfig per precision x batch size: ``preset`` with random weights (no base
    checkpoint, nothing downloaded) and the other run-config ``fields`` as given."""
    return [
        TrainConfig(preset=preset, base_checkpoint=None, precision=name, batch_size=size, **fields)
        for name in precisions
        for size in batch_sizes
    ]


def write_images(directory: str | os.PathLike, count: int, seed: int = 0, distinct: int = DISTINCT_IMAGES) -> Path:
    """A JSONL manifest of ``count`` samples over at most ``distinct`` COCO-sized (640 x 480)
    photo-like JPEGs in ``directory`` (synthetic.write_photo_jpegs, deterministic for ``seed``),
    named in turn; returns the manifest's path.

    Every sample is decoded from its file whether or not another sample names the same file, so
    repeating files costs the loader the same; it saves writing them (60 ms each on one core:
    768 files, batch 64 x 12 steps, would take the GPU run 45 s)."""
    synthetic.write_photo_jpegs(directory, min(count, distinct), seed=seed)
    manifest = Path(directory) / "manifest.jsonl"
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    manifest.write_text("".join(lines[i % len(lines)] for i in range(count)), encoding="utf-8")
    return manifest


def prepare(config: TrainConfig, manifest: str | os.PathLike, device: torch.device) -> Bench:
    """The model, dataset, collator and loader for ``config``, built as training/train.py builds them."""
    torch.manual_seed(config.seed)
    model, _ = train.build_adapter_model(config, device)
    model.to(device)
    base_config = model.get_base_model().config
    family = "instructblip" if base_config.model_type == "instructblip" else "blip2"
    processor = data.build_processor(family, config.base_checkpoint, image_size=base_config.vision_config.image_size)
    collator = inputs.Collator.for_model(processor, base_config, config, static_shapes=True)
    samples = formats.read(manifest, config.data_format, config.image_root, split="train")
    draft_size = base_config.vision_config.image_size if config.image_decode == "draft" else None
    dataset = data.ManifestDataset(samples, draft_size=draft_size)
    workers = default_workers(device) if config.num_workers is None else config.num_workers
    loader = EpochLoader(
        dataset,
        collator,
        config.batch_size,
        config.seed,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    initial = [p.detach().clone() for p in lora.adapter_parameters(model)]
    return Bench(config, device, model, loader, initial, workers)


def native_forward(model, precision_name: str, device: torch.device):
    """HF's own forward through the PeftModel as the step's ``run_forward``: each batch converted
    (compat.native_inputs) and its mean token loss turned into the summed one the step divides."""
    unwrapped = compat.unwrap(model)

    def run_forward(batch):
        with precision.autocast(precision_name, device):
            out = model(**compat.native_inputs(unwrapped, batch))
        return forward.ForwardOutput(
            loss=out.loss * forward.target_count(batch),
            logits=out.logits,
            query_output=None,
            language_model_inputs=None,
        )

    return run_forward


def step_parts(bench: Bench, forward_name: str) -> tuple[StepParts, list]:
    """The step's pieces for one measurement, from the initial adapter weights with a fresh AdamW
    and schedule; returns them and the step options used (step_options.Choice). The custom step
    takes the configuration's deferred host reads (sync_every > 0), compiled optimizer step and the
    CUDA graphs of a model compiled beforehand (compile_mode; :func:`compile_model`)."""
    config, model = bench.config, bench.model
    params = lora.adapter_parameters(model)
    with torch.no_grad():
        for param, initial in zip(params, bench.initial):
            param.copy_(initial)
            param.grad = None
    custom = forward_name == "custom"
    checkpointing = step_options.set_lm_checkpointing(model, custom and config.lm_checkpointing)
    optimizer, choice = step_options.make_optimizer(
        params,
        lr=config.lr,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        fused=config.fused_optimizer if custom else False,
    )
    scheduler = linear_warmup_decay(optimizer, config.warmup_steps, SCHEDULE_STEPS)
    choices = [checkpointing, choice]
    if custom and config.compile_optimizer:
        choices.append(step_options.compile_optimizer_step(optimizer, True, mode=config.compile_mode))
    parts = make_step(
        model,
        optimizer,
        scheduler,
        precision_name=config.precision,
        device=bench.device,
        guard=config.guard,
        max_grad_norm=config.max_grad_norm,
        run_forward=None if custom else native_forward(model, config.precision, bench.device),
        deferred=custom and config.sync_every > 0,
        cudagraphs=custom and train.uses_cudagraphs(config, bench.device),
    )
    return parts, choices


def compile_model(bench: Bench, batch: dict) -> list:
    """The configuration's model compiles (compile_qformer, compile_frozen in compile_mode) on
    ``bench.model``, in place, probed on ``batch``; their Choices. Every later measurement of
    either forward runs them: :func:`run` refuses them for that reason, scripts/gpu_issue19.py
    measures them after the native baseline and undoes them (step_options.uncompile_step_modules)."""
    config, model = bench.config, bench.model

    def probe(_compiled):
        with precision.autocast(config.precision, bench.device):
            forward.custom_forward(model, batch, reduction="sum").loss.backward()
        for param in lora.adapter_parameters(model):
            param.grad = None

    return step_options.compile_step_modules(
        model,
        qformer=config.compile_qformer,
        frozen=config.compile_frozen,
        mode=config.compile_mode,
        probe=probe,
        device_type=bench.device.type,
    )


@dataclass
class Results:
    """The results of a measurement's steps, in order: a deferred step's are read every ``sync_every``
    steps and at the end (:meth:`finish`), as train_epoch reads them (step.read_steps)."""

    parts: StepParts
    sync_every: int
    done: list = field(default_factory=list)  # StepResults, in step order
    pending: list = field(default_factory=list)  # PendingSteps not read yet
    host_reads: int = 0  # read_steps calls (deferred steps only)

    def add(self, result) -> None:
        if not self.parts.deferred:
            self.done.append(result)
            return
        self.pending.append(result)
        if len(self.pending) >= self.sync_every:
            self.finish()

    def finish(self) -> None:
        if self.pending:
            self.done += read_steps(self.parts, self.pending)
            self.pending, self.host_reads = [], self.host_reads + 1


def _timing(results: Results, warmup: int, elapsed: float, steps: int, waits: list | None, device) -> dict:
    samples = sum(r.samples for r in results.done[warmup:])
    return {
        "samples": samples,
        "elapsed_s": elapsed,
        "samples_per_s": samples / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "loader_wait_ms_per_batch": None if waits is None else 1000 * sum(waits) / len(waits),
        "losses": [r.loss for r in results.done],  # per step, warm-up included: same batches, same losses
        "actions": dict(Counter(r.action for r in results.done)),
        "host_reads": results.host_reads if results.parts.deferred else None,  # None: every step reads
        **memory_stats(device),
    }


def time_loop(bench: Bench, parts: StepParts, warmup: int, steps: int) -> dict:
    """One epoch of the loader through the step, as train_epoch runs it (deferred steps read every
    sync_every steps and at the end); the first ``warmup`` steps untimed."""
    device, waits, results = bench.device, [], Results(parts, bench.config.sync_every)
    batches = iter(bench.loader.epoch(1))
    started = time.perf_counter()
    for index in range(warmup + steps):
        if index == warmup:
            synchronize(device)
            started = time.perf_counter()
        asked = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - asked
        results.add(training_step(parts, [inputs.to_device(batch, device)], index))
        if index >= warmup:
            waits.append(waited)
    results.finish()
    synchronize(device)
    elapsed = time.perf_counter() - started
    for _ in batches:  # the epoch holds exactly warmup + steps batches; ends the workers' epoch cleanly
        pass
    return _timing(results, warmup, elapsed, steps, waits, device)


def collated(bench: Bench) -> list[dict]:
    """The loop's batches, in its order, collated and on the device before any step runs."""
    batches = [inputs.to_device(b, bench.device) for b in bench.loader.epoch(1)]
    synchronize(bench.device)
    return batches


def time_step(bench: Bench, parts: StepParts, batches: list[dict], warmup: int, steps: int) -> dict:
    """The step alone on ``batches`` (already on the device), deferred steps read as in
    :func:`time_loop`; the first ``warmup`` steps untimed."""
    device, results = bench.device, Results(parts, bench.config.sync_every)
    started = time.perf_counter()
    for index, batch in enumerate(batches[: warmup + steps]):
        if index == warmup:
            synchronize(device)
            started = time.perf_counter()
        results.add(training_step(parts, [batch], index))
    results.finish()
    synchronize(device)
    return _timing(results, warmup, time.perf_counter() - started, steps, None, device)


def measure(bench: Bench, forward_name: str, mode: str, warmup: int, steps: int, batches=None) -> dict:
    """One measurement (``mode`` loop or step) of one forward; out of memory or any other error is
    recorded as its result (``{"error": ...}``): a GPU run is one-shot, and one failure must not
    lose the other measurements."""
    try:
        parts, choices = step_parts(bench, forward_name)
        if bench.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(bench.device)
        if mode == "loop":
            timing = time_loop(bench, parts, warmup, steps)
        else:
            timing = time_step(bench, parts, batches if batches is not None else collated(bench), warmup, steps)
        return timing | {"step_options": [c.as_dict() for c in choices]}
    except Exception as err:  # noqa: BLE001 - recorded in the report
        message = f"{type(err).__name__}: {str(err).strip()[:300]}"
        oom = is_oom(err)
    free_memory()  # outside the except block: the traceback no longer holds the step's tensors
    return {"error": message, "oom": oom}


def _flops_per_sample(bench: Bench) -> tuple[float | None, str | None]:
    """The plain custom step's counted FLOPs per sample (bench/flops.py; LM checkpointing off, so the
    recompute is not counted), or None and why not."""
    step_options.set_lm_checkpointing(bench.model, False)
    config = bench.config
    shape = SequenceShape(config.max_prompt_tokens, config.max_answer_tokens, config.max_prompt_tokens)
    try:  # as the sweep counts them: outside autocast (the weights are in the precision's dtype)
        return flops.step_flops_per_sample(bench.model, shape, bench.device), None
    except Exception as err:  # noqa: BLE001 - recorded; the timings still count
        return None, f"{type(err).__name__}: {str(err).strip()[:300]}"


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """torch's deterministic mode for the run when ``enabled`` (train's default), as train sets it."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def run(
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    steps: int = 3,
    warmup: int = 1,
    image_dir: str | os.PathLike | None = None,
    forwards: tuple[str, ...] = FORWARDS,
    count_flops: bool = True,
) -> dict:
    """Every measurement of ``forwards`` x (loop, step) for ``config`` (its preset, precision,
    batch size, workers, LM checkpointing, fused AdamW, token budgets, seed); returns a JSON-ready
    report. ``image_dir``: where the JPEGs go (default: a temporary directory, removed after).

    Raises ValueError for steps < 1, warmup < 0, an unknown forward or a step option not measured
    here (:func:`check_config`)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if not forwards or set(forwards) - set(FORWARDS):
        raise ValueError(f"forwards {forwards!r}: expected some of {FORWARDS}")
    check_config(config)
    device = torch.device(device)
    count = config.batch_size * (warmup + steps)
    with contextlib.ExitStack() as stack:
        directory = image_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="qformer-lora-e2e-"))
        stack.enter_context(_deterministic(config.deterministic))
        manifest = write_images(directory, count, seed=config.seed)
        bench = prepare(config, manifest, device)
        flops_per_sample, flops_error = _flops_per_sample(bench) if count_flops else (None, "not counted")
        batches = collated(bench)  # for the step-alone measurements: the loop's own batches
        results = {
            name: {mode: measure(bench, name, mode, warmup, steps, batches) for mode in MODES} for name in forwards
        }
        report = _report(bench, results, warmup, steps, count)
    report["flops_per_sample"], report["flops_error"] = flops_per_sample, flops_error
    return summarise(report)


def _report(bench: Bench, results: dict, warmup: int, steps: int, images: int) -> dict:
    config = bench.config
    return {
        "schema": 1,
        "kind": "end-to-end",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_info(bench.device),
        "versions": compat.versions(),
        "config": {name: getattr(config, name) for name in REPORTED_OPTIONS}
        | {"num_workers": bench.workers, "pin_memory": bench.device.type == "cuda"},
        "sequence": {
            "prompt_len": config.max_prompt_tokens,
            "answer_len": config.max_answer_tokens,
            "instruction_len": config.max_prompt_tokens,
        },
        "images": {
            "samples": images,
            "files": min(images, DISTINCT_IMAGES),
            "width": synthetic.COCO_SIZE[0],
            "height": synthetic.COCO_SIZE[1],
        },
        "settings": {"warmup_steps": warmup, "measured_steps": steps},
        "results": results,
    }


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def summarise(report: dict) -> dict:
    """MFU of every measurement, the custom/native ratios (speed-up: samples/s over native's; memory
    ratio: peak allocated over native's, None off CUDA), whether the loop meets the targets (None
    where a figure is missing) and a one-paragraph summary, from the measured numbers."""
    peak = flops.peak_flops(report["device"]["name"], report["config"]["precision"])
    for modes in report["results"].values():
        for timing in modes.values():
            if "error" not in timing:
                timing["mfu"] = flops.mfu(timing["samples_per_s"], report.get("flops_per_sample"), peak)
    custom, native = report["results"].get("custom", {}), report["results"].get("native", {})
    ratios = {}
    for mode in MODES:
        c, n = custom.get(mode, {}), native.get(mode, {})
        ratios[mode] = {
            "speedup": _ratio(c.get("samples_per_s"), n.get("samples_per_s")),
            "memory_ratio": _ratio(c.get("peak_allocated_bytes"), n.get("peak_allocated_bytes")),
        }
    report["custom_vs_native"] = ratios
    loop = ratios["loop"]
    report["targets"] = dict(TARGETS) | {  # issue 19: the loop >= 2x native at <= 0.5x its peak memory
        "met": None
        if loop["speedup"] is None or loop["memory_ratio"] is None
        else loop["speedup"] >= TARGETS["speedup"] and loop["memory_ratio"] <= TARGETS["memory_ratio"]
    }
    report["paragraph"] = paragraph(report)
    return report


def _figure(timing: dict | None, key: str, spec: str) -> str:
    if not timing:
        return "not measured"
    if "error" in timing:
        return f"failed ({timing['error']})"
    return format(timing[key], spec)


def paragraph(report: dict) -> str:
    """One paragraph: the loop's and the step's samples/s, the loader's share and the ratio to native."""
    config, results = report["config"], report["results"]
    custom, native = results.get("custom", {}), results.get("native", {})
    speedup = report["custom_vs_native"]["loop"]["speedup"]
    wait = (custom.get("loop") or {}).get("loader_wait_ms_per_batch")
    images = report["images"]
    loop, step = (
        _figure(custom.get("loop"), "samples_per_s", ".1f"),
        _figure(custom.get("step"), "samples_per_s", ".1f"),
    )
    return (
        f"{config['preset']}, {config['precision']}, batch {config['batch_size']}, {config['num_workers']} loader "
        f"workers, from {images['samples']} samples of {images['files']} JPEG files of {images['width']}x"
        f"{images['height']}: the trainer's loop ran at {loop} samples/s and its step alone at {step} samples/s; "
        f"the host waited {'-' if wait is None else format(wait, '.1f')} ms per batch for the loader. HF's forward "
        f"through PEFT: {_figure(native.get('loop'), 'samples_per_s', '.1f')} samples/s in the same loop"
        + ("." if speedup is None else f", so the trainer's loop is {speedup:.2f}x native.")
    )
