"""Precision doctor: refuse dtype / optimizer combinations known to fail, before training starts.

``qformer-lora doctor --preset X --precision Y`` prints the findings of :func:`examine`;
``train.train`` runs the same checks first and refuses fatal findings unless
``allow_unsafe`` is set. Each finding carries a severity, what is wrong and a fix.
The seed's NaN (see :mod:`qformer_lora.diagnostics.numerics`) is finding ``adapters-fp16`` +
``eps-underflow``.

:func:`run_steps` / :func:`reproduce` are trial runs that show a finding happen: a few
optimizer steps taken like ``train.train`` takes them, on in-memory batches (the
stability tests on tiny presets, tests/gpu/test_gpu_nan.py on full-size ones).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .numerics import Guard, clip_gradients, localise

FATAL, WARNING = "fatal", "warning"
FP16 = torch.float16

# precision -> (base weights, adapters + AdamW state, autocast dtype); train.build_adapter_model
# produces exactly these (tests/unit/test_numerics.py checks it).
PRECISION_DTYPES = {
    "fp32": (torch.float32, torch.float32, None),
    "bf16": (torch.bfloat16, torch.float32, None),
    "fp16-amp": (torch.float32, torch.float32, torch.float16),
    "fp16-pure": (torch.float16, torch.float16, None),
}
FIX_PRECISION = "use --precision bf16 (or fp16-amp on GPUs without bf16), which keep adapters and AdamW state in fp32"


@dataclass(frozen=True)
class Finding:
    severity: str  # fatal | warning
    code: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.code}: {self.message}\n    fix: {self.fix}"


class UnsafePrecisionError(ValueError):
    """train.train refused a configuration with fatal doctor findings (listed in the message)."""

    def __init__(self, findings: list[Finding]):
        self.findings = findings
        listed = "\n".join(str(f) for f in findings)
        super().__init__(f"refusing to train: {len(findings)} fatal precision finding(s) "
                         f"(set allow_unsafe = true / --allow-unsafe true to train anyway):\n{listed}")


def _eps_findings(eps: float, lr: float, weight_decay: float, dtype: torch.dtype, fused: bool) -> list[Finding]:
    """Optimizer hyperparameters that do not survive being stored or computed in ``dtype``."""
    if dtype not in (torch.float16, torch.bfloat16):
        return []
    name = str(dtype).removeprefix("torch.")
    info = torch.finfo(dtype)
    smallest = info.smallest_normal * info.eps  # smallest subnormal: 2**-24 in fp16
    findings = []
    if not fused and eps != 0 and float(torch.tensor(eps, dtype=dtype)) == 0.0:
        findings.append(Finding(
            FATAL, "eps-underflow",
            f"AdamW eps={eps:g} rounds to 0 in {name} (smallest subnormal {smallest:.3g}); LoRA's lora_B starts "
            f"at zero, so lora_A's first gradient and both moments are exactly 0 and the update is "
            f"0/(0+0) = NaN after the first optimizer step (the seed's NaN)",
            FIX_PRECISION + f"; or at least an eps >= {smallest:.3g} / AdamW(fused=True), which computes in fp32"))
    if lr != 0 and float(torch.tensor(lr, dtype=dtype)) == 0.0:
        findings.append(Finding(WARNING, "lr-underflow", f"lr={lr:g} rounds to 0 in {name}: updates vanish",
                                FIX_PRECISION))
    if weight_decay and lr * weight_decay < info.eps / 2:
        findings.append(Finding(
            WARNING, "weight-decay-lost",
            f"weight decay lr*wd={lr * weight_decay:.3g} is below {name}'s relative precision {info.eps / 2:.3g}: "
            f"param*(1-lr*wd) rounds back to param, decay has no effect", FIX_PRECISION))
    return findings


def check_config(precision: str, *, lr: float, adam_eps: float, weight_decay: float = 0.0,
                 text_model_type: str | None = None, device: str | torch.device = "cpu",
                 fused: bool = False) -> list[Finding]:
    """Findings that follow from the settings alone (no model needed)."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISION_DTYPES)}")
    base_dtype, adapter_dtype, autocast_dtype = PRECISION_DTYPES[precision]
    findings = []
    if adapter_dtype == FP16:
        findings.append(Finding(
            FATAL, "adapters-fp16",
            f"precision {precision!r} keeps LoRA adapters and AdamW state in fp16: eps underflows and "
            f"exp_avg_sq = 1e-3*g**2 flushes to 0 for |g| < 5.5e-3, giving NaN/inf updates",
            FIX_PRECISION + "; with peft < 0.12 / model.half() after get_peft_model, cast the lora_ "
                            "parameters back to fp32"))
    if adam_eps <= 0:  # in any precision: the same 0/(0+0) as an eps that underflows
        findings.append(Finding(
            FATAL, "eps-zero",
            f"AdamW eps={adam_eps:g}: LoRA's lora_B starts at zero, so lora_A's first gradient and both moments "
            f"are exactly 0 and the update is 0/(0+0) = NaN after the first optimizer step",
            "use an eps > 0 (the default is 1e-8)"))
    findings += _eps_findings(adam_eps, lr, weight_decay, adapter_dtype, fused)
    if text_model_type == "t5" and FP16 in (base_dtype, autocast_dtype):
        findings.append(Finding(
            WARNING, "t5-fp16",
            "T5 language models overflow fp16: feed-forward activations exceed 65504 (FlanT5 was trained in "
            "bf16); transformers keeps T5's `wo` in fp32 only when loading with from_pretrained(torch_dtype="
            "float16) (_keep_in_fp32_modules), not for models built or cast with .half()",
            "use --precision bf16; with fp16, load the checkpoint with from_pretrained(torch_dtype=float16) "
            "and check that every T5 `wo` weight is fp32"))
    device = torch.device(device)
    if precision == "bf16" and device.type == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        findings.append(Finding(
            FATAL, "bf16-unsupported", f"bf16 requested but {torch.cuda.get_device_name(device)} has no bf16 "
                                       f"support (torch.cuda.is_bf16_supported() is False)",
            "use --precision fp16-amp (autocast + GradScaler, fp32 adapters) or fp32"))
    return findings


def check_model(model, optimizer=None) -> list[Finding]:
    """Findings from a built model and optimizer: the dtypes really in use."""
    from .. import compat

    findings = []
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fp16 = [n for n, p in trainable if p.dtype == FP16]
    if fp16:
        findings.append(Finding(
            FATAL, "adapters-fp16", f"{len(fp16)} of {len(trainable)} trainable parameters are fp16, "
                                    f"e.g. {fp16[0]}; AdamW on fp16 adapters produces NaN/inf updates",
            "cast them to fp32 (for p in adapter params: p.data = p.data.float()); " + FIX_PRECISION))
    if optimizer is not None:
        for group in optimizer.param_groups:
            dtypes = {p.dtype for p in group["params"]}
            for dtype in dtypes:
                findings += _eps_findings(group.get("eps", 0.0), group["lr"], group.get("weight_decay", 0.0),
                                          dtype, bool(group.get("fused")))
    base = compat.unwrap(model)
    text_config = getattr(getattr(base, "config", None), "text_config", None)
    if getattr(text_config, "model_type", None) == "t5":
        wo = [n for n, p in base.language_model.named_parameters() if n.endswith("wo.weight") and p.dtype == FP16]
        if wo:
            findings.append(Finding(
                WARNING, "t5-fp16", f"{len(wo)} T5 `wo` weights are fp16 (e.g. language_model.{wo[0]}); T5's "
                                    f"feed-forward output overflows fp16 (> 65504)",
                "keep `wo` in fp32 (from_pretrained(torch_dtype=float16) does) or use --precision bf16"))
    return _unique(findings)


def examine(config, model=None, optimizer=None, device: str | torch.device = "cpu") -> list[Finding]:
    """All findings for a TrainConfig-like object (and the built model / optimizer when given)."""
    from .. import presets

    if getattr(config, "base_checkpoint", None):
        import json
        from pathlib import Path

        config_file = Path(config.base_checkpoint) / "config.json"
        if not config_file.is_file():  # checked silently, it dropped the T5 findings of a mistyped path
            raise presets.PresetError(f"{config.base_checkpoint}: no config.json; expected a saved "
                                      f"InstructBLIP / BLIP-2 checkpoint directory")
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        text_model_type = saved.get("text_config", {}).get("model_type")
    else:
        text_model_type = presets.load_preset(config.preset).text_model_type
    findings = check_config(config.precision, lr=config.lr, adam_eps=config.adam_eps,
                            weight_decay=config.weight_decay, text_model_type=text_model_type, device=device)
    if model is not None:
        findings += check_model(model, optimizer)
    return _unique(findings)


def _unique(findings: list[Finding]) -> list[Finding]:
    seen, kept = set(), []
    for finding in findings:
        if finding.code not in seen:
            seen.add(finding.code)
            kept.append(finding)
    return kept


def enforce(findings: list[Finding], allow_unsafe: bool = False) -> None:
    """Warn about every finding; raise UnsafePrecisionError on fatal ones unless ``allow_unsafe``."""
    import warnings

    fatal = [f for f in findings if f.severity == FATAL]
    if fatal and not allow_unsafe:
        raise UnsafePrecisionError(fatal)
    for finding in findings:
        warnings.warn(f"precision doctor: {finding}", RuntimeWarning, stacklevel=3)


def as_json(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]


# ----------------------------------------------------------------------------- trial runs


def run_steps(model, batches: list[dict], *, precision: str, steps: int, lr: float = 1e-4, eps: float = 1e-8,
              weight_decay: float = 0.0, max_grad_norm: float | None = None, warmup_steps: int = 0,
              total_steps: int = 100, fused: bool | None = None, optimizer=None, guard: str | None = None,
              max_rollbacks: int = 3, rollback_lr_factor: float = 0.5) -> dict:
    """``steps`` optimizer steps the way ``train.train`` takes them, on in-memory batches.

    Same pieces as the loop (autocast, GradScaler for fp16-amp, clipping, warm-up schedule,
    finite check, numerics.Guard), no files. ``guard`` is a policy name. Without one the
    loop behaves like the seed's: the first failure is localised and recorded, a batch
    with a non-finite loss is skipped ("Forward pass returned None") and every other step
    is taken, even with a non-finite gradient norm, so the trace shows every later step.
    ``optimizer``: an AdamW over the adapter parameters to use (tests inspect its state).
    Returns a JSON-ready trace (the Guard's events under "guard_events").
    """
    from .. import forward  # train imports this module (circular at import time)
    from ..training import train

    device = next(p for p in model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay, fused=fused)
    scheduler = train.linear_warmup_decay(optimizer, warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16-amp")

    def run_forward(batch):
        with train.autocast_context(precision, device):
            return forward.custom_forward(model, batch, reduction="sum")

    if guard is not None:
        guard = Guard(guard, model, optimizer, scheduler, run_forward=run_forward,
                      max_rollbacks=max_rollbacks, rollback_lr_factor=rollback_lr_factor)
    trace = {"precision": precision, "lr": lr, "eps": eps, "max_grad_norm": max_grad_norm,
             "warmup_steps": warmup_steps, "fused": fused, "losses": [], "grad_norms": [],
             "optimizer_steps": 0, "scaler_skipped": 0, "diagnosis": None,
             "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params})}
    for step in range(steps):
        batch = batches[step % len(batches)]
        if guard is not None and not guard.inputs_ok([batch], step):
            continue
        out = run_forward(batch)
        tokens = forward.target_count(batch)
        scaler.scale(out.loss / tokens).backward()
        loss_sum = float(out.loss.detach())
        loss = loss_sum / tokens
        scaler.unscale_(optimizer)
        grad_norm = clip_gradients(params, max_grad_norm)
        trace["losses"].append(loss)
        trace["grad_norms"].append(float(grad_norm))
        if not (math.isfinite(loss) and bool(torch.isfinite(grad_norm))):
            if guard is not None:
                action = guard.non_finite(step, [batch], [loss_sum], grad_norm, scaler.is_enabled())
            elif scaler.is_enabled() and math.isfinite(loss):
                action = "scaler"  # a gradient overflow: GradScaler skips the step and lowers its scale
            else:  # the seed's loop: skip a batch whose output is NaN, step whatever the gradient norm
                action = "step" if math.isfinite(loss) else "skip"
                if trace["diagnosis"] is None:
                    trace["diagnosis"] = asdict(localise(model, [batch], step, run_forward,
                                                         losses=[loss_sum], grad_norm=grad_norm))
            if action == "skip":
                optimizer.zero_grad(set_to_none=True)
                continue
        elif guard is not None:
            guard.healthy()
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        skipped = scale is not None and scaler.get_scale() < scale  # GradScaler halves its scale when it skips
        trace["scaler_skipped"] += skipped
        trace["optimizer_steps"] += not skipped
    trace["finite"] = [math.isfinite(v) for v in trace["losses"]]
    trace["guard_events"] = guard.events if guard is not None else []
    return trace


def reproduce(preset: str, precision: str, *, steps: int = 4, device: str = "cpu", batch_size: int = 2,
              r: int = 4, seed: int = 0, **kwargs) -> dict:
    """Build ``preset`` (random init) with ``train.build_adapter_model`` for ``precision`` directly
    on ``device``, and run :func:`run_steps` on synthetic batches: the CPU tests on tiny presets
    and tests/gpu/test_gpu_nan.py on full-size ones. Defaults: the seed's r=4, alpha=8."""
    from .. import synthetic  # train imports this module (circular at import time)
    from ..training import run_config, train

    config = run_config.TrainConfig(preset=preset, base_checkpoint=None, precision=precision, lora_r=r,
                                    lora_alpha=2 * r, lora_dropout=0.0, seed=seed)
    model, _ = train.build_adapter_model(config, device=device)
    batches = [synthetic.random_batch(model, batch_size=batch_size, prompt_len=8, answer_len=4,
                                      seed=seed + i, device=device) for i in range(2)]
    return {"preset": preset, "device": str(device), "batch_size": batch_size, "r": r} | run_steps(
        model, batches, precision=precision, steps=steps, **kwargs)
