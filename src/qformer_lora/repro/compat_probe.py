"""What the installed transformers / peft pair does, written to one JSON file per pair.

``python -m qformer_lora.repro.compat_probe --out reports/compat/<transformers>-<peft>.json``
(the ``compat`` nox session runs it). Every section is observed, never assumed: an
exception is recorded with its class and message instead of stopping the probe, so a
pair that breaks the project still yields a report that says where. The tests pin the
same behaviour per release (resources/expectations/); ``nox -s compat_report`` turns the
JSON files into reports/COMPAT.md.

Sections:
  presets      per tiny preset: the native input convention, the custom forward, the
               library's own forward (unwrapped) and its loss difference from the custom
               one, and the library's own forward through PEFT wrappers per task type
  lora_counts  LoRA tensors / trainable / total for the tiny presets and the full-size
               default preset (meta device), with the parameter-count regime
  adapter_dtype  dtype of the LoRA weights get_peft_model gives on an fp16 base by default
  nan_default  the seed's NaN recipe under default settings: fp16 base, default
               get_peft_model, AdamW(eps=1e-8), 3 steps of the custom forward
  attention    per tiny preset: the attention implementation the vision tower, Q-Former and
               language model run by default (constructor and from_pretrained), and with
               attn_implementation="eager" / "sdpa" (or the release's refusal); the loss and
               LoRA-gradient difference between the two (probes.attention, transformers#40952)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from .. import jsonio

SCHEMA = 1
TINY_PRESETS = ("tiny-instructblip-flan-t5", "tiny-instructblip-vicuna", "tiny-blip2-flan-t5", "tiny-blip2-opt")
FULL_PRESET = "instructblip-flan-t5-xl"
NAN_PRESET = "tiny-instructblip-flan-t5"  # the seed's family
NEIGHBOURS = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "huggingface-hub",
    "tokenizers",
    "safetensors",
    "numpy",
    "pytest",
    "hypothesis",
)


def _error(err: BaseException) -> dict:
    from .probes import normalise_message

    return {"status": "error", "exception": type(err).__name__, "message": normalise_message(str(err))}


def _section(fn, *args):
    """Run one probe section; an exception becomes data (with the innermost frame for context)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - the point is to record it
        frame = traceback.extract_tb(err.__traceback__)[-1]
        return _error(err) | {"where": f"{Path(frame.filename).name}:{frame.lineno}"}


def installed_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in NEIGHBOURS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _loss_outcome(call) -> tuple[dict, float | None]:
    try:
        with torch.no_grad():
            output = call()
    except Exception as err:  # noqa: BLE001
        return _error(err), None
    loss = getattr(output, "loss", None)
    if loss is None:
        return {"status": "ok-no-loss"}, None
    return {"status": "ok", "loss_finite": bool(torch.isfinite(loss).item())}, float(loss)


def probe_preset(name: str) -> dict:
    from .. import compat, forward, presets, synthetic
    from . import probes

    model = presets.build_model(name, seed=0)
    batch = synthetic.random_batch(model, seed=0)
    custom, custom_loss = _loss_outcome(lambda: forward.custom_forward(model, batch))
    native, native_loss = _loss_outcome(lambda: model(**compat.native_inputs(model, batch)))
    result = {
        "native_convention": compat.native_convention(model.config),
        "custom_forward": custom,
        "native_forward": native,
        "loss_difference": (
            abs(custom_loss - native_loss) if custom_loss is not None and native_loss is not None else None
        ),
        "peft_task_types": {},
    }
    for task_type in probes.TASK_TYPES:
        observed = _section(probes.kwarg_conflict, name, task_type)
        if "native" in observed:
            observed = {
                "wrapper": observed["wrapper"],
                **observed["native"],
                "custom_ok": observed["custom"] == {"status": "ok", "loss_finite": True},
                "loss_difference": observed.get("loss_difference"),
            }
        result["peft_task_types"][str(task_type)] = observed
    return result


def _lora_report(model, r: int = 8) -> dict:
    from .. import compat, lora

    spec = lora.LoraSpec(r=r, alpha=2 * r)
    peft_model = lora.apply_lora(model, spec)
    report = lora.scope_report(peft_model, spec)
    compat.unload(peft_model)
    return {
        "lora_tensors": report["lora_tensors"],
        "trainable_parameters": report["trainable_parameters"],
        "total_parameters": report["total_parameters"],
        "base_parameters": report["total_parameters"] - report["trainable_parameters"],
        "trainable_percent": round(report["trainable_percent"], 4),
        "trainable_outside_qformer": sum(v["trainable"] for c, v in report["components"].items() if c != "qformer"),
    }


def probe_lora_counts() -> dict:
    from .. import compat, presets

    out = {name: _section(lambda n=name: _lora_report(presets.build_model(n, seed=0))) for name in TINY_PRESETS}
    full = presets.load_preset(FULL_PRESET)

    def full_size() -> dict:
        model = presets.build_model(full, device="meta")
        constructed = sum(p.numel() for p in model.parameters())
        compat.finish_meta_model(model)  # ties what construction on meta left untied (5.0.0)
        return _lora_report(model) | {"base_parameters_as_constructed_on_meta": constructed}

    out[FULL_PRESET] = _section(full_size)
    out["parameter_count_regime"] = {
        "t5": compat.parameter_count_regime("t5"),
        "opt": compat.parameter_count_regime("opt"),
        "llama": compat.parameter_count_regime("llama"),
    }
    return out


def _default_fp16_adapter_model(preset: str, r: int = 8):
    import peft

    from .. import compat, presets
    from . import probes

    model = presets.build_model(preset, dtype=torch.float16, seed=0)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=probes.SEED_TARGETS)
    torch.manual_seed(0)
    return compat.get_peft_model(model, config)  # the installed peft's defaults


def probe_adapter_dtype() -> dict:
    peft_model = _default_fp16_adapter_model(NAN_PRESET)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for n, p in peft_model.named_parameters() if "lora_" in n})
    return {"base_dtype": "float16", "adapter_dtypes": dtypes}


def probe_nan_default(steps: int = 3, lr: float = 1e-4) -> dict:
    """The seed's recipe with every library default: does the loss go NaN after step 0?"""
    from .. import forward, lora, synthetic

    model = _default_fp16_adapter_model(NAN_PRESET)
    params = lora.adapter_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-8)
    losses, finite = [], []
    for step in range(steps):
        batch = synthetic.random_batch(model, seed=step)
        loss = forward.custom_forward(model, batch).loss
        losses.append(float(loss.detach()))
        finite.append(bool(torch.isfinite(loss).item()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {
        "preset": NAN_PRESET,
        "recipe": f"fp16 base, default get_peft_model (r=8), AdamW(lr={lr}, eps=1e-8), "
        f"{steps} steps of custom_forward on synthetic.random_batch",
        "adapter_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "finite_per_step": finite,
        "losses": losses,
    }


def probe_attention() -> dict:
    from . import probes

    return {name: _section(probes.attention, name) for name in TINY_PRESETS}


def probe() -> dict:
    torch.set_num_threads(1)  # tiny models: more threads only add spin-waiting on shared cores
    started = time.monotonic()
    result = {"schema": SCHEMA, "versions": installed_versions(), "command": " ".join(sys.argv)}
    try:
        from .. import compat
    except Exception as err:  # noqa: BLE001 - a pair that cannot import the project is a result
        result["import"] = _error(err)
        return result
    result["import"] = {"status": "ok"}
    result["release"] = f"transformers {compat.TRANSFORMERS} / peft {compat.PEFT}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter of old releases; outcomes are recorded
        result["presets"] = {name: _section(probe_preset, name) for name in TINY_PRESETS}
        result["lora_counts"] = _section(probe_lora_counts)
        result["adapter_dtype"] = _section(probe_adapter_dtype)
        result["nan_default"] = _section(probe_nan_default)
        result["attention"] = _section(probe_attention)
    result["probe_seconds"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qformer_lora.repro.compat_probe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, help="JSON file to write (replaced); default: stdout")
    args = parser.parse_args(argv)
    result = probe()
    if args.out is None:
        print(jsonio.dumps(result, indent=2))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write(args.out, result)  # strict JSON: a NaN loss of an old release is written "NaN"
    print(f"compat probe: {result.get('release', 'import failed')} -> {args.out} ({result.get('probe_seconds')} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
