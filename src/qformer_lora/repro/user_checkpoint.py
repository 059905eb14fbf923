"""`qformer-lora reproduce --base-checkpoint DIR`: the reproduction items on the user's own checkpoint.

Each item of reproduce.py runs again on the local checkpoint ``DIR`` with the installed releases:
the kwarg conflict through each PEFT task wrapper; LoRA scope and exact counts of that model; NaN
under the chosen precision (and the seed's fp16-pure beside it); the checkpoint round trip (train,
stop, resume, reload the saved adapter on the base); peak memory where a CUDA device is given.
What needs no values runs on the meta device from config.json alone (the scope and counts of any
size of model); what needs values runs on ``--device`` when the model fits there (CPU: up to
CPU_PARAMETER_LIMIT parameters; CUDA: three times its fp32 weights free), and is otherwise
reported as "not run". Each item says where it ran ("ran_on": meta, cpu, cuda or "not run").

The report names the checkpoint by path and by the sha256 of its config.json in canonical form
(keys sorted, no whitespace), and the releases (reproduce.environment).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .. import base_weights, checkpoint, compat, data, jsonio, known_warnings, lora, presets, synthetic
from ..inference import generate
from ..training import train
from ..training.run_config import TrainConfig
from . import probes, reproduce, trials

# A 4B-parameter model takes minutes a step and 16 GB in fp32 on a CPU; the value items skip it there.
CPU_PARAMETER_LIMIT = 300_000_000
CUDA_HEADROOM = 3  # weights + gradients of the adapter + activations of a small batch, as a multiple of the weights
SEED_PRECISION = "fp16-pure"  # the seed's setting, the one that turns NaN after step 0
MEMORY_BATCH_SIZES = (1, 4)


@dataclass(frozen=True)
class Target:
    """The checkpoint under test and where its value items run (``where`` None: they do not)."""

    directory: Path
    device: torch.device
    precision: str
    info: dict
    where: str | None
    why: str


def config_sha256(directory: str | Path) -> str:
    """sha256 of config.json in canonical form (sorted keys, compact separators, UTF-8)."""
    config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    canonical = jsonio.dumps(config, sort_keys=True, compact=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def describe(directory: str | Path) -> dict:
    """What the report says about the checkpoint: path, config hash, family, size and file layout."""
    directory = Path(directory).resolve()
    family = presets.family_of_checkpoint(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    model = presets.build_from_checkpoint_config(directory)  # meta: counts without memory
    return {
        "path": str(directory),
        "config_sha256": config_sha256(directory),
        "family": family,
        "text_model_type": config.get("text_config", {}).get("model_type"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "saved_by_transformers": config.get("transformers_version"),
        "image_token_index": config.get("image_token_index"),
        "processor_config_json": (directory / "processor_config.json").is_file(),
        "weights": base_weights.layout(directory),
    }


def placement(parameters: int, device: torch.device) -> tuple[str | None, str]:
    """(device type the value items run on, or None; why)."""
    fp32_gib = parameters * 4 / 2**30
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] / 2**30
        if fp32_gib * CUDA_HEADROOM <= free:
            return "cuda", f"{parameters:,} parameters ({fp32_gib:.2f} GiB in fp32) fit {free:.1f} GiB free on {device}"
        return None, f"{fp32_gib:.2f} GiB of fp32 weights x {CUDA_HEADROOM} exceed {free:.1f} GiB free on {device}"
    if parameters <= CPU_PARAMETER_LIMIT:
        return "cpu", f"{parameters:,} parameters: small enough for the CPU"
    return None, f"{parameters:,} parameters exceed the CPU limit of {CPU_PARAMETER_LIMIT:,}; give --device cuda"


def _not_run(t: Target) -> dict:
    return {
        "status": "not run",
        "fix_holds": True,
        "why": f"meta: not run ({t.why})",
        "evidence": {},
        "ran_on": "not run",
    }


def _device(t: Target) -> torch.device:
    return t.device if t.where == "cuda" else torch.device("cpu")


def item_kwarg_conflict(t: Target) -> dict:
    """The library's forward through each PEFT task wrapper on the checkpoint, and the custom forward."""
    if t.where is None:
        return _not_run(t)
    model = presets.load_model(t.directory, device=_device(t))
    cases = {str(task): probes.kwarg_conflict_on(model, task) for task in probes.TASK_TYPES}
    failures = {k: v["native"] for k, v in cases.items() if v["native"]["status"] != "ok"}
    # the inputs_embeds TypeError (either message) is the conflict; a config without an image token fails
    # otherwise (compat.native_inputs)
    conflicts = sorted(k for k, v in failures.items() if reproduce.is_kwarg_conflict(v))
    seed_like = [k for k in conflicts if reproduce.SEED_TYPEERROR in failures[k]["message"]]
    fix_holds = all(v["custom"] == {"status": "ok", "loss_finite": True} for v in cases.values())
    return {
        "status": reproduce._status(bool(conflicts), fix_holds),
        "fix_holds": fix_holds,
        "why": f"the library's own forward fails in {len(failures)} of {len(cases)} wrapper cases on this checkpoint "
        f"({len(conflicts)} with the wrappers' inputs_embeds conflict, {len(seed_like)} of them in the seed's "
        f"TypeError); the custom forward works in {sum(v['custom'].get('loss_finite', False) for v in cases.values())}",
        "evidence": {
            "cases": cases,
            "native_failures": failures,
            "kwarg_conflict_cases": conflicts,
            "seed_typeerror_cases": seed_like,
        },
        "ran_on": t.where,
    }


def _scope_figures(model, scope: str) -> tuple[dict, object]:
    spec = lora.LoraSpec(r=8, alpha=16, scope=scope)
    peft_model = lora.apply_lora(model, spec)
    report = lora.scope_report(peft_model, spec)
    figures = {k: report[k] for k in ("lora_tensors", "trainable_parameters", "total_parameters")}
    figures["trainable_by_component"] = {c: v["trainable"] for c, v in report["components"].items()}
    return figures, peft_model


def item_lora_scope(t: Target) -> dict:
    """LoRA scope and exact counts of the checkpoint's model, at r=8, on the meta device; a leak refused."""
    model = presets.build_from_checkpoint_config(t.directory)
    figures = {}
    for scope in ("qformer", "qformer+llm"):
        figures[scope], peft_model = _scope_figures(model, scope)
        model = compat.unload(peft_model)
    _, leaky = _scope_figures(model, "qformer")
    leak_refused = reproduce.refuses_a_leak(leaky)
    outside = {c: n for c, n in figures["qformer"]["trainable_by_component"].items() if c != "qformer" and n}
    fix_holds = not outside and figures["qformer"]["lora_tensors"] > 0 and leak_refused
    q = figures["qformer"]
    return {
        "status": "fixed" if fix_holds else "fix broken",
        "fix_holds": fix_holds,
        "why": f"Q-Former scope: {q['lora_tensors']} LoRA tensors, {q['trainable_parameters']:,} trainable of "
        f"{q['total_parameters']:,}, none outside the Q-Former; a trainable parameter outside it is refused",
        "evidence": figures | {"outside_qformer": outside, "leak_refused": leak_refused},
        "ran_on": "meta",
    }


def _trial(t: Target, precision_name: str, batch_size: int = 2, steps: int = 4) -> dict:
    """``steps`` training steps of the checkpoint with LoRA (r=4, as the seed) on synthetic batches."""
    config = TrainConfig(base_checkpoint=str(t.directory), precision=precision_name, lora_r=4, lora_dropout=0.0, seed=0)
    model, _ = train.build_adapter_model(config, device=_device(t))
    batches = [
        synthetic.random_batch(model, batch_size=batch_size, prompt_len=8, answer_len=4, seed=i, device=_device(t))
        for i in range(2)
    ]
    return trials.run_steps(model, batches, precision=precision_name, steps=steps)


def item_nan(t: Target) -> dict:
    """A few steps under the chosen precision, and under the seed's fp16-pure, on the checkpoint."""
    if t.where is None:
        return _not_run(t)
    runs = {name: _trial(t, name) for name in dict.fromkeys((t.precision, SEED_PRECISION))}
    seed = runs[SEED_PRECISION]["finite"]
    seed_pattern = seed[0] and not any(seed[1:])
    chosen = runs[t.precision]["finite"]
    fix_holds = all(chosen) or t.precision == SEED_PRECISION
    return {
        "status": reproduce._status(seed_pattern, fix_holds),
        "fix_holds": fix_holds,
        "why": f"{t.precision}: finite at every step {chosen}; the seed's {SEED_PRECISION}: {seed}"
        + (" (finite at step 0, NaN after: the seed's pattern)" if seed_pattern else ""),
        "evidence": {
            name: {k: run[k] for k in ("finite", "losses", "adapter_dtypes", "diagnosis")} for name, run in runs.items()
        },
        "ran_on": t.where,
    }


def _train_twice(t: Target, tmp: Path) -> tuple[Path, Path]:
    """2 epochs straight, and 1 epoch then a resume, on 8 shapes samples (seconds on the tiny base)."""
    common = dict(
        epochs=2,
        save_every=1,
        keep_last=0,
        batch_size=4,
        progress=False,
        train_manifest=str(data.shapes_subset(tmp, "train", 8)),
        val_manifest=str(data.shapes_subset(tmp, "val", 4)),
        image_root=str(data.SHAPES_DIR),
        base_checkpoint=str(t.directory),
        precision=t.precision,
    )
    straight, resumed = tmp / "straight", tmp / "resumed"
    device = str(_device(t))
    train.train(TrainConfig(output_dir=str(straight), **common), device=device)
    train.train(TrainConfig(output_dir=str(resumed), stop_after_epochs=1, **common), device=device)
    train.train(TrainConfig(output_dir=str(resumed), **common), resume="latest", device=device)
    return straight, resumed


def item_checkpoints(t: Target) -> dict:
    """Train on the checkpoint (its own processor files), save, resume; reload the adapter on the base."""
    if t.where is None:
        return _not_run(t)
    with tempfile.TemporaryDirectory() as tmp:
        straight, resumed = _train_twice(t, Path(tmp))
        saved = [p.name for p in checkpoint.list_checkpoints(straight)]
        adapter_dir = checkpoint.latest_checkpoint(straight) / checkpoint.ADAPTER_DIR
        files = [
            load_file(str(checkpoint.latest_checkpoint(run) / checkpoint.ADAPTER_DIR / "adapter_model.safetensors"))
            for run in (straight, resumed)
        ]
        identical = files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])
        model, _, _, _ = generate.load_adapter(adapter_dir, t.directory)
        reloaded = peft.get_peft_model_state_dict(model)
        round_trip = reloaded.keys() == files[0].keys() and all(
            torch.equal(reloaded[k].cpu(), files[0][k]) for k in files[0]
        )
    fix_holds = saved == ["epoch-0001", "epoch-0002"] and identical and round_trip
    return {
        "status": "fixed" if fix_holds else "fix broken",
        "fix_holds": fix_holds,
        "why": "trained on this checkpoint with its own processor files: checkpoints every epoch, 1 epoch + resume "
        "gives bitwise the adapter of 2 epochs straight, and the saved adapter reloads onto the base bitwise",
        "evidence": {
            "checkpoints": saved,
            "resume_bitwise_identical": identical,
            "adapter_reload_bitwise_identical": round_trip,
            "adapter_tensors": len(files[0]),
        },
        "ran_on": t.where,
    }


def item_memory(t: Target) -> dict:
    """Peak CUDA memory of LoRA training steps on the checkpoint, per batch size; CUDA only."""
    if t.device.type != "cuda":
        return {"status": "skipped", "fix_holds": True, "why": "skipped: no accelerator (--device cpu)",
                "evidence": {}, "ran_on": "not run"}  # fmt: skip
    if t.where is None:
        return _not_run(t)
    peaks = {}
    for batch_size in MEMORY_BATCH_SIZES:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(t.device)
        run = _trial(t, t.precision, batch_size=batch_size, steps=2)
        peaks[batch_size] = {"peak_gib": torch.cuda.max_memory_allocated(t.device) / 2**30, "finite": run["finite"]}
    return {
        "status": "measured",
        "fix_holds": True,
        "why": f"peak memory of 2 {t.precision} steps on {torch.cuda.get_device_name(t.device)}: "
        + ", ".join(f"batch {b}: {v['peak_gib']:.2f} GiB" for b, v in peaks.items()),
        "evidence": {"peak_by_batch_size": peaks, "prompt_tokens": 8, "answer_tokens": 4},
        "ran_on": t.where,
    }


ITEMS = {
    "kwarg-conflict": item_kwarg_conflict,
    "lora-scope": item_lora_scope,
    "nan": item_nan,
    "checkpoints": item_checkpoints,
    "memory": item_memory,
}


def run(directory, device: str | torch.device = "cpu", precision_name: str = "fp32", only=None) -> dict:
    """Every item (or ``only`` these) on the checkpoint in ``directory``; the report as reproduce.run's,
    with "checkpoint" (describe) and "placement" added."""
    names = only or list(ITEMS)
    unknown = [n for n in names if n not in ITEMS]
    if unknown:
        raise ValueError(f"unknown item(s) {unknown} for --base-checkpoint; choose from {list(ITEMS)}")
    info = describe(directory)
    device = torch.device(device)
    where, why = placement(info["parameters"], device)
    target = Target(Path(info["path"]), device, precision_name, info, where, why)
    results = {}
    with known_warnings.Recorder() as hidden, tqdm(names, desc="reproduce", unit="item") as bar:
        for name in bar:
            bar.set_postfix_str(name)
            results[name] = ITEMS[name](target)
    return {
        "date": datetime.date.today().isoformat(),
        "environment": reproduce.environment(),
        "checkpoint": info,
        "placement": {"device": str(device), "values_on": where or "not run", "why": why, "precision": precision_name},
        "items": results,
        "all_fixes_hold": all(r["fix_holds"] for r in results.values()),
        "hidden_warnings": hidden.records,
    }


def report_stem(report: dict) -> str:
    """File name stem of a checkpoint's report: REPRODUCTION-<directory name>-<config hash, 12 hex>."""
    info = report["checkpoint"]
    return f"REPRODUCTION-{Path(info['path']).name}-{info['config_sha256'][:12]}"
