"""Precision doctor: refuse dtype / optimizer combinations known to fail, before training starts.

``qformer-lora doctor --preset X --precision Y`` prints the findings of :func:`examine`;
``train.train`` runs the same checks first and refuses fatal findings unless
``allow_unsafe`` is set. Each finding carries a severity, what is wrong and a fix.
The seed's NaN (see :mod:`qformer_lora.diagnostics.numerics`) is finding ``adapters-fp16`` +
``eps-underflow``. What each precision means comes from the one table in ``precision.py``.
Trial runs that show a finding happen are in ``repro/trials.py``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import base_weights, compat, precision, presets

FATAL, WARNING = "fatal", "warning"
FP16 = torch.float16

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
        super().__init__(
            f"refusing to train: {len(findings)} fatal precision finding(s) "
            f"(set allow_unsafe = true / --allow-unsafe true to train anyway):\n{listed}"
        )


def _eps_findings(eps: float, lr: float, weight_decay: float, dtype: torch.dtype, fused: bool) -> list[Finding]:
    """Optimizer hyperparameters that do not survive being stored or computed in ``dtype``."""
    if dtype not in (torch.float16, torch.bfloat16):
        return []
    name = str(dtype).removeprefix("torch.")
    info = torch.finfo(dtype)
    smallest = info.smallest_normal * info.eps  # smallest subnormal: 2**-24 in fp16
    findings = []
    if not fused and eps != 0 and float(torch.tensor(eps, dtype=dtype)) == 0.0:
        findings.append(
            Finding(
                FATAL,
                "eps-underflow",
                f"AdamW eps={eps:g} rounds to 0 in {name} (smallest subnormal {smallest:.3g}); LoRA's lora_B starts "
                f"at zero, so lora_A's first gradient and both moments are exactly 0 and the update is "
                f"0/(0+0) = NaN after the first optimizer step (the seed's NaN)",
                FIX_PRECISION + f"; or at least an eps >= {smallest:.3g} / AdamW(fused=True), which computes in fp32",
            )
        )
    if lr != 0 and float(torch.tensor(lr, dtype=dtype)) == 0.0:
        findings.append(
            Finding(WARNING, "lr-underflow", f"lr={lr:g} rounds to 0 in {name}: updates vanish", FIX_PRECISION)
        )
    if weight_decay and lr * weight_decay < info.eps / 2:
        findings.append(
            Finding(
                WARNING,
                "weight-decay-lost",
                f"weight decay lr*wd={lr * weight_decay:.3g} is below {name}'s relative precision {info.eps / 2:.3g}: "
                f"param*(1-lr*wd) rounds back to param, decay has no effect",
                FIX_PRECISION,
            )
        )
    return findings


def check_config(
    precision_name: str,
    *,
    lr: float,
    adam_eps: float,
    weight_decay: float = 0.0,
    text_model_type: str | None = None,
    device: str | torch.device = "cpu",
    fused: bool = False,
) -> list[Finding]:
    """Findings that follow from the settings alone (no model needed)."""
    row = precision.get(precision_name)  # ValueError naming the known precisions
    adapter_dtype = row.adapters
    findings = []
    if adapter_dtype == FP16:
        findings.append(
            Finding(
                FATAL,
                "adapters-fp16",
                f"precision {precision_name!r} keeps LoRA adapters and AdamW state in fp16: eps underflows and "
                f"exp_avg_sq = 1e-3*g**2 flushes to 0 for |g| < 5.5e-3, giving NaN/inf updates",
                FIX_PRECISION + "; with peft < 0.12 / model.half() after get_peft_model, cast the lora_ "
                "parameters back to fp32",
            )
        )
    if adam_eps <= 0:  # in any precision: the same 0/(0+0) as an eps that underflows
        findings.append(
            Finding(
                FATAL,
                "eps-zero",
                f"AdamW eps={adam_eps:g}: LoRA's lora_B starts at zero, so lora_A's first gradient and both moments "
                f"are exactly 0 and the update is 0/(0+0) = NaN after the first optimizer step",
                "use an eps > 0 (the default is 1e-8)",
            )
        )
    findings += _eps_findings(adam_eps, lr, weight_decay, adapter_dtype, fused)
    return findings + _model_and_device_findings(precision_name, text_model_type, device)


def _model_and_device_findings(precision_name: str, text_model_type: str | None, device) -> list[Finding]:
    """T5 in fp16 (overflows) and bf16 on a card without it."""
    row, findings = precision.get(precision_name), []
    if text_model_type == "t5" and FP16 in (row.weights, row.autocast):
        findings.append(
            Finding(
                WARNING,
                "t5-fp16",
                "T5 language models overflow fp16: feed-forward activations exceed 65504 (FlanT5 was trained in "
                "bf16); transformers keeps T5's `wo` in fp32 only when loading with from_pretrained(torch_dtype="
                "float16) (_keep_in_fp32_modules), not for models built or cast with .half()",
                "use --precision bf16; with fp16, load the checkpoint with from_pretrained(torch_dtype=float16) "
                "and check that every T5 `wo` weight is fp32",
            )
        )
    device = torch.device(device)
    if (
        precision_name == "bf16"
        and device.type == "cuda"
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        findings.append(
            Finding(
                FATAL,
                "bf16-unsupported",
                f"bf16 requested but {torch.cuda.get_device_name(device)} has no bf16 "
                f"support (torch.cuda.is_bf16_supported() is False)",
                "use --precision fp16-amp (autocast + GradScaler, fp32 adapters) or fp32",
            )
        )
    return findings


def check_model(model, optimizer=None) -> list[Finding]:
    """Findings from a built model and optimizer: the dtypes really in use."""
    findings = []
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fp16 = [n for n, p in trainable if p.dtype == FP16]
    if fp16:
        findings.append(
            Finding(
                FATAL,
                "adapters-fp16",
                f"{len(fp16)} of {len(trainable)} trainable parameters are fp16, "
                f"e.g. {fp16[0]}; AdamW on fp16 adapters produces NaN/inf updates",
                "cast them to fp32 (for p in adapter params: p.data = p.data.float()); " + FIX_PRECISION,
            )
        )
    if optimizer is not None:
        for group in optimizer.param_groups:
            dtypes = {p.dtype for p in group["params"]}
            for dtype in dtypes:
                findings += _eps_findings(
                    group.get("eps", 0.0), group["lr"], group.get("weight_decay", 0.0), dtype, bool(group.get("fused"))
                )
    base = compat.unwrap(model)
    text_config = getattr(getattr(base, "config", None), "text_config", None)
    if getattr(text_config, "model_type", None) == "t5":
        wo = [n for n, p in base.language_model.named_parameters() if n.endswith("wo.weight") and p.dtype == FP16]
        if wo:
            findings.append(
                Finding(
                    WARNING,
                    "t5-fp16",
                    f"{len(wo)} T5 `wo` weights are fp16 (e.g. language_model.{wo[0]}); T5's "
                    f"feed-forward output overflows fp16 (> 65504)",
                    "keep `wo` in fp32 (from_pretrained(torch_dtype=float16) does) or use --precision bf16",
                )
            )
    return _unique(findings)


def examine(config, model=None, optimizer=None, device: str | torch.device = "cpu") -> list[Finding]:
    """All findings for a TrainConfig-like object (and the built model / optimizer when given)."""
    if getattr(config, "base_checkpoint", None):
        config_file = Path(config.base_checkpoint) / "config.json"
        if not config_file.is_file():  # checked silently, it dropped the T5 findings of a mistyped path
            raise presets.PresetError(
                f"{config.base_checkpoint}: no config.json; expected a saved InstructBLIP / BLIP-2 checkpoint directory"
            )
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        text_model_type = saved.get("text_config", {}).get("model_type")
    else:
        text_model_type = presets.load_preset(config.preset).text_model_type
    findings = check_config(
        config.precision,
        lr=config.lr,
        adam_eps=config.adam_eps,
        weight_decay=config.weight_decay,
        text_model_type=text_model_type,
        device=device,
    )
    if model is not None:
        findings += check_model(model, optimizer)
    return _unique(findings)


def checkpoint_findings(directory) -> list[Finding]:
    """What a base checkpoint's files mean here (`doctor --base-checkpoint`): weights that will not be
    loaded (fatal, base_weights.check_loadable's reason), ``.bin`` weights (read with weights_only=True),
    a config from before the image placeholder token that the library's own forward needs."""
    try:
        found = base_weights.check_loadable(directory)
    except base_weights.WeightsError as err:
        fix = "give a checkpoint directory with safetensors weights, or convert these: " + (
            base_weights.CONVERT_COMMAND.format(src=directory)
        )
        return [Finding(FATAL, "weights-refused", str(err), fix)]
    findings = []
    if found["format"] == "bin":
        findings.append(Finding(
            WARNING, "bin-weights",
            f"{directory}: .bin weights ({len(found['files'])} file(s)) are pickles; they are read with "
            f"weights_only=True (tensors only, anything else refused)",
            "convert them once to safetensors (no unpickler): " + base_weights.CONVERT_COMMAND.format(src=directory),
        ))  # fmt: skip
    saved = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    if saved.get("image_token_index") is None and compat.native_forward_needs_image_token():
        findings.append(Finding(
            WARNING, "no-image-token",
            f"{directory}/config.json has no image_token_index (saved by transformers "
            f"{saved.get('transformers_version')}): this transformers' own forward and processor(text=...) "
            f"fail on it; training here uses its own forward and is unaffected",
            "nothing for training; `qformer-lora export` adds the image token to the merged model it writes",
        ))  # fmt: skip
    return findings


def _unique(findings: list[Finding]) -> list[Finding]:
    seen, kept = set(), []
    for finding in findings:
        if finding.code not in seen:
            seen.add(finding.code)
            kept.append(finding)
    return kept


def enforce(findings: list[Finding], allow_unsafe: bool = False) -> None:
    """Warn about every finding; raise UnsafePrecisionError on fatal ones unless ``allow_unsafe``."""
    fatal = [f for f in findings if f.severity == FATAL]
    if fatal and not allow_unsafe:
        raise UnsafePrecisionError(fatal)
    for finding in findings:
        warnings.warn(f"precision doctor: {finding}", RuntimeWarning, stacklevel=3)


def as_json(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]


def summary(config, device, findings: list[Finding]) -> dict:
    """What `qformer-lora doctor` reports: the setting checked, the fatal count and the findings (JSON-ready)."""
    names = ("preset", "base_checkpoint", "precision", "lr", "adam_eps", "weight_decay")
    fatal = sum(f.severity == FATAL for f in findings)
    return {name: getattr(config, name) for name in names} | {
        "device": str(device),
        "fatal": fatal,
        "findings": as_json(findings),
    }


def _checked_model(report: dict) -> str:
    """What the findings are about: the base checkpoint when one is set (it wins over the preset)."""
    checkpoint = report.get("base_checkpoint")
    return f"base checkpoint {checkpoint}" if checkpoint else f"preset {report['preset']}"


def format_summary(report: dict) -> str:
    """:func:`summary` as the text `qformer-lora doctor` prints."""
    lines = [
        f"precision doctor: {_checked_model(report)}, precision {report['precision']}, lr {report['lr']:g}, "
        f"eps {report['adam_eps']:g}, weight decay {report['weight_decay']:g}, device {report['device']}"
    ]
    lines += [str(Finding(**f)) for f in report["findings"]]
    count = len(report["findings"])
    lines.append(f"{report['fatal']} fatal, {count - report['fatal']} warning(s)" if count else "no findings")
    return "\n".join(lines)
