"""Memory and speed of one LoRA training step against batch size, and what fits a budget.

Read top to bottom: a configuration (:class:`SweepPoint`), the GPU grid of them
(:func:`default_points`) -> one built model and one training step -> one measured batch
size (:func:`measure`). The step is the trainer's own (``training/step.py``: the same
forward, loss normalisation, clipping, finite check and optimizer step as ``qformer-lora
train``), so every speed figure is the trainer's. Then bench/sweep.py (many configurations and
batch sizes, the memory model of bench/capacity.py checked under a real memory cap),
bench/reporting.py (the seed's table, the step-option ratios) and bench/report_files.py.
Models are random-initialised from presets (no downloads); on a CPU the memory fields are
None and only times are measured.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch

from .. import compat, forward, lora, precision, presets, synthetic
from ..training import step_options, train
from ..training.feature_cache import FeatureCache
from ..training.run_config import TrainConfig
from ..training.step import StepParts, linear_warmup_decay, make_step, training_step
from .device import free_memory, is_oom, memory_stats

FORWARDS = ("custom", "native")
FULL_INSTRUCTBLIP, FULL_BLIP2 = "instructblip-flan-t5-xl", "blip2-flan-t5-xl"
# (row, preset, scope, what the seed reported on its card)
SEED_ROWS = (
    ("BLIP-2 Q-Former LoRA", FULL_BLIP2, "qformer", "24"),
    ("InstructBLIP Q-Former+LLM LoRA", FULL_INSTRUCTBLIP, "qformer+llm", "10"),
    ("InstructBLIP Q-Former-only LoRA", FULL_INSTRUCTBLIP, "qformer", "16-20 (expected)"),
)


# The step options a SweepPoint can turn on (its boolean fields), with their label words, in order.
STEP_OPTIONS = {
    "lm_activation_checkpointing": "lm-ckpt",
    "feature_cache": "feature-cache",
    "fused_optimizer": "fused",
    "compile_qformer": "compiled",
    "compile_frozen": "compiled-frozen",
}


@dataclass(frozen=True)
class SweepPoint:
    """One configuration; ``batch_sizes=None`` takes the sweep's list."""

    preset: str
    scope: str = "qformer"
    precision: str = "bf16"
    forward: str = "custom"
    lm_activation_checkpointing: bool = False
    family: str | None = None  # build the preset's config as another family
    batch_sizes: tuple[int, ...] | None = None
    r: int = 8
    validate_budget_gib: float | None = None  # check the fitted prediction under this cap (CUDA)
    feature_cache: bool = False  # vision features from a warm in-memory cache (hashing included)
    fused_optimizer: bool = False  # AdamW(fused=True) where available; False = torch's default
    compile_qformer: bool = False  # torch.compile the Q-Former in place
    compile_frozen: bool = False  # torch.compile each frozen vision / LM block in place

    def __post_init__(self):
        for name, value, allowed in (
            ("scope", self.scope, lora.SCOPES),
            ("precision", self.precision, precision.SAFE_NAMES),  # fp16-pure only reproduces a NaN
            ("forward", self.forward, FORWARDS),
        ):
            if value not in allowed:
                raise ValueError(f"SweepPoint.{name} is {value!r}; expected one of {sorted(allowed)}")
        if self.family is not None and self.family not in presets.FAMILIES:
            raise ValueError(f"SweepPoint.family is {self.family!r}; expected one of {sorted(presets.FAMILIES)}")
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise ValueError(f"SweepPoint.batch_sizes must be positive integers, got {self.batch_sizes}")
        if self.forward == "native" and (self.feature_cache or self.compile_qformer or self.compile_frozen):
            raise ValueError(
                "SweepPoint: feature_cache, compile_qformer and compile_frozen apply to the custom forward only"
            )

    @property
    def label(self) -> str:
        extras = [f"as {self.family}"] * bool(self.family) + [
            word for field, word in STEP_OPTIONS.items() if getattr(self, field)
        ]
        return " ".join([self.preset, self.scope, self.precision, self.forward, *extras])

    @property
    def build_key(self) -> tuple:
        # fp32 and fp16-amp share fp32 weights; forward, checkpointing, cache and optimizer are
        # switched per step, so all of these reuse one built model. Compiling changes the model.
        return (
            self.preset,
            self.family,
            precision.get(self.precision).weights,
            self.scope,
            self.r,
            self.compile_qformer,
            self.compile_frozen,
        )


@dataclass(frozen=True)
class SequenceShape:
    prompt_len: int = 32
    answer_len: int = 16
    instruction_len: int = 32  # InstructBLIP's Q-Former reads the instruction, as long as the prompt

    def random_batch(self, model, batch_size: int, device) -> dict:
        """A synthetic batch of this shape for ``model`` (synthetic.random_batch)."""
        return synthetic.random_batch(
            model,
            batch_size=batch_size,
            prompt_len=self.prompt_len,
            answer_len=self.answer_len,
            instruction_len=self.instruction_len,
            device=device,
        )


def default_points(
    instructblip: str = FULL_INSTRUCTBLIP, blip2: str = FULL_BLIP2, options_batch: int | None = None
) -> list[SweepPoint]:
    """The GPU grid: every seed-table row in fp32 and bf16, plus fp16-amp, checkpointing, native,
    and each step option at OPTIONS_BATCH against the native forward (option_points).

    Ordered so that consecutive points share a built model (8 builds: each compiled set is its own).
    The compiled points come last: their compile time is the least predictable part of the run,
    and the reports are rewritten after every configuration, so a run cut short by its time
    limit still has the seed table.
    """
    small, large, options_batch = (1, 4, 8), (1, 4, 8, 16), options_batch or OPTIONS_BATCH
    options = option_points(instructblip, options_batch)
    compiled = [p for p in options if p.compile_qformer or p.compile_frozen]
    return [
        SweepPoint(
            instructblip, "qformer", "bf16", batch_sizes=tuple(sorted({*large, options_batch})), validate_budget_gib=24
        ),
        *[p for p in options if p not in compiled],
        SweepPoint(instructblip, "qformer", "fp32", batch_sizes=small),
        SweepPoint(instructblip, "qformer", "fp16-amp", batch_sizes=small),
        SweepPoint(instructblip, "qformer+llm", "fp32", batch_sizes=small),
        SweepPoint(instructblip, "qformer+llm", "bf16", batch_sizes=large),
        SweepPoint(blip2, "qformer", "bf16", batch_sizes=large),
        SweepPoint(blip2, "qformer", "fp32", batch_sizes=small),
        *compiled,
    ]


OPTIONS_BATCH = 64


def option_points(preset: str, batch_size: int = OPTIONS_BATCH) -> list[SweepPoint]:
    """bf16 Q-Former LoRA at one batch size: the native forward, then each step option alone,
    then the fastest exact combinations and all of them; the plain custom point is the default
    grid's first point. The compiled points come last because they need their own builds: the
    frozen blocks compiled with cache and fused AdamW (compile_frozen's effect), then with the
    Q-Former compiled too (the whole model), then that with LM checkpointing (every option).
    No compiled point stands alone: each compile costs a minute or more of the GPU run's
    8-minute budget, and a failing Q-Former compile still leaves compile_frozen measured."""
    # the native forward also at batch 8, the custom/native comparison's batch since the first sweeps
    base = SweepPoint(preset, "qformer", "bf16", batch_sizes=tuple(sorted({min(8, batch_size), batch_size})))
    one = dataclasses.replace(base, batch_sizes=(batch_size,))
    return [
        dataclasses.replace(base, forward="native"),
        dataclasses.replace(base, lm_activation_checkpointing=True, batch_sizes=tuple(sorted({4, 16, batch_size}))),
        dataclasses.replace(one, feature_cache=True),
        dataclasses.replace(one, fused_optimizer=True),
        dataclasses.replace(one, feature_cache=True, fused_optimizer=True, compile_frozen=True),
        dataclasses.replace(one, feature_cache=True, fused_optimizer=True, compile_frozen=True, compile_qformer=True),
        dataclasses.replace(
            one,
            feature_cache=True,
            fused_optimizer=True,
            compile_frozen=True,
            compile_qformer=True,
            lm_activation_checkpointing=True,
        ),
    ]


def options_grid(preset: str, batch_size: int = OPTIONS_BATCH) -> list[SweepPoint]:
    """The plain custom point at ``batch_size`` (the FLOP count for MFU) then option_points: the
    step-option table alone, without the seed-table rows, for repeating it with more steps."""
    return [SweepPoint(preset, "qformer", "bf16", batch_sizes=(batch_size,)), *option_points(preset, batch_size)]


def is_plain(point: SweepPoint) -> bool:
    """The custom forward with no step option: the step whose FLOPs define MFU."""
    return point.forward == "custom" and not any(getattr(point, field) for field in STEP_OPTIONS)


def ran(result: dict) -> bool:
    """A measured result (not out of memory, not failed, not skipped)."""
    return "error" not in result


def grid(
    preset: str,
    *,
    scopes=("qformer",),
    precisions=("bf16",),
    forwards=("custom",),
    lm_activation_checkpointing: bool = False,
    family: str | None = None,
    validate_budget_gib: float | None = None,
    **step_options_on,
) -> list[SweepPoint]:
    """Every combination for one preset, ordered so that points sharing a model are consecutive;
    the first point carries the validation request. ``step_options_on``: feature_cache,
    fused_optimizer, compile_qformer (custom forward only)."""
    by_weights = sorted(precisions, key=lambda p: str(precision.get(p).weights) if p in precision.SAFE_NAMES else p)
    points = [
        SweepPoint(preset, scope, name, how, lm_activation_checkpointing, family, **step_options_on)
        for scope in scopes
        for name in by_weights
        for how in forwards
    ]
    return [dataclasses.replace(points[0], validate_budget_gib=validate_budget_gib)] + points[1:]


# ----------------------------------------------------------------------------- one step


def build(point: SweepPoint, device: str | torch.device):
    """The preset on ``device`` in the point's weight dtype, with LoRA, as training builds it (eval mode)."""
    preset = presets.load_preset(point.preset)
    if point.family:
        preset = dataclasses.replace(preset, family=point.family)
    model = presets.build_model(preset, device=device, dtype=precision.get(point.precision).weights)
    peft_model = train.adapter_model(model, lora.LoraSpec(r=point.r, scope=point.scope), point.precision)
    choices = []
    if point.compile_qformer:
        # Compiled lazily, at the warm-up step of each batch size, with static shapes: on the
        # H200 run (torch 2.11) a batch-1 probe followed by batch 64 made dynamo recompile with
        # dynamic shapes and inductor failed (AssertionError), costing ~3 minutes. A failure at
        # the warm-up step is recorded for that batch by the sweep (bench/sweep._measure_or_error).
        choices.append(step_options.maybe_compile(compat.unwrap(peft_model).qformer, True, dynamic=False)[1])
    if point.compile_frozen:  # the same, lazily, for each block of the frozen vision encoder and LM
        choices.append(step_options.compile_frozen_blocks(peft_model, True, dynamic=False))
    # kept for every result of this build: where compile is unavailable the option falls back
    # to eager, and a "compiled" row must then say so rather than report eager figures
    peft_model._bench_build_choices = tuple(choices)
    return peft_model


@dataclass
class StepState:
    """One configuration at one batch size, ready to step: the training step's pieces and its batch."""

    point: SweepPoint
    batch: dict
    parts: StepParts
    choices: tuple = ()  # step_options.Choice records: what was used, and why not what was asked
    skipped_steps: int = 0  # fp16-amp: optimizer steps GradScaler skipped for inf/NaN gradients

    @property
    def batch_size(self) -> int:
        return self.batch["input_ids"].shape[0]


def _native_forward(model, batch: dict, precision_name: str, device: torch.device):
    """The library's own forward through the plain PeftModel, as a summed token loss (the step divides by
    the token count): the baseline. Its inputs are converted once, not per step."""
    kwargs, tokens = compat.native_inputs(compat.unwrap(model), batch), forward.target_count(batch)

    def run_forward(_batch):
        with precision.autocast(precision_name, device):
            out = model(**kwargs)
        return forward.ForwardOutput(
            loss=out.loss * tokens, logits=out.logits, query_output=None, language_model_inputs=None
        )

    return run_forward


def prepare_step(model, point: SweepPoint, batch_size: int, device, shape: SequenceShape) -> StepState:
    """The training step's pieces for ``point`` at ``batch_size`` on one synthetic batch (train's defaults
    for clipping and the guard; AdamW lr 1e-4, weight decay 0.01)."""
    device = torch.device(device)
    # step_options' wrapper also removes the input-embedding hook transformers leaves after disabling
    checkpointing = step_options.set_lm_checkpointing(model, point.lm_activation_checkpointing)
    batch = shape.random_batch(model, batch_size, device)
    params = lora.adapter_parameters(model)
    for param in params:  # a step cut short by OOM leaves gradients behind
        param.grad = None
    optimizer, choice = step_options.make_optimizer(params, lr=1e-4, weight_decay=0.01, fused=point.fused_optimizer)
    native = _native_forward(model, batch, point.precision, device) if point.forward == "native" else None
    parts = make_step(
        model,
        optimizer,
        linear_warmup_decay(optimizer, 0, 1 << 30),
        precision_name=point.precision,
        device=device,
        max_grad_norm=TrainConfig.max_grad_norm,
        run_forward=native,
        cache=_feature_cache(model) if point.feature_cache else None,
    )  # filled by the warm-up step
    return StepState(point, batch, parts, (checkpointing, choice, *getattr(model, "_bench_build_choices", ())))


def _feature_cache(model) -> FeatureCache:
    """One cache per built model: its fingerprint reads every vision weight (~2 GB for ViT-g)."""
    cache = getattr(model, "_bench_feature_cache", None)
    if cache is None:
        cache = model._bench_feature_cache = FeatureCache(model)
    return cache


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(state: StepState) -> float:
    """The training step (training/step.py) on the state's batch; returns its loss per answer token
    once the device has finished."""
    result = training_step(state.parts, [state.batch], 0)
    state.skipped_steps += result.scaler_skipped
    synchronize(state.parts.device)
    return result.loss


def measure(
    point: SweepPoint,
    batch_size: int,
    device="cuda",
    *,
    model=None,
    shape: SequenceShape = SequenceShape(),
    warmup: int = 1,
    steps: int = 3,
) -> dict:
    """Peak memory and median step time of ``steps`` synchronised steps after ``warmup`` steps.

    Out of memory is a result (``{"oom": True, ...}``), not an error. ``model`` is
    reused when given (building a 4B model takes a while), else built and released.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    owns_model, state, oom_message = model is None, None, None
    try:
        if model is None:
            model = build(point, device)
        state = prepare_step(model, point, batch_size, device, shape)
        for _ in range(warmup):
            timed_step(state)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, loss, state.skipped_steps = [], math.nan, 0
        for _ in range(steps):
            start = time.perf_counter()
            loss = timed_step(state)
            times.append(time.perf_counter() - start)
        memory = memory_stats(device)
        skipped = state.skipped_steps if state.parts.scaler.is_enabled() else None
        choices = state.choices
    except RuntimeError as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_oom(err):
            raise
        oom_message = str(err).strip().splitlines()[0][:300]  # keep no reference to the traceback's tensors
    finally:
        del state
        if owns_model:
            del model
        free_memory(collect=owns_model or oom_message is not None)
    if oom_message is not None:
        return {"batch_size": batch_size, "oom": True, "error": oom_message}
    median = statistics.median(times)
    return {
        "batch_size": batch_size,
        "oom": False,
        **memory,
        "step_time_s": median,
        "step_times_s": times,
        "samples_per_s": batch_size / median,
        "loss": loss,
        "skipped_steps": skipped,
        "step_options": [c.as_dict() for c in choices],
    }
