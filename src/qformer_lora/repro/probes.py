"""Observe how the installed transformers / peft behave on the seed's failure modes.

Each probe runs one thing the seed documents and returns what happened as plain
data (ok with a loss, or the exact exception class and message), so tests can
compare it with the per-release expectations in resources/expectations/ and the
reports can quote it.
"""

from __future__ import annotations

import re

import peft
import torch

from .. import compat, forward, presets, synthetic

# None is PEFT's plain PeftModel; the others are the task wrappers users reach for.
TASK_TYPES = ("SEQ_2_SEQ_LM", "CAUSAL_LM", "FEATURE_EXTRACTION", None)
SEED_TARGETS = ["query", "key", "value", "dense"]


def normalise_message(message: str) -> str:
    """Drop what changes from run to run (object addresses) and the body of a module's
    multi-line repr (transformers 4.52-4.53 put the whole language model's print into the
    kwarg-conflict message: "T5ForConditionalGeneration(\n  (shared): ...\n) got multiple
    values ..." becomes "T5ForConditionalGeneration(…) got multiple values ..."); keep the
    rest verbatim."""
    message = re.sub(r"0x[0-9a-fA-F]+", "0x…", message)
    message = re.sub(r"\b([A-Za-z_]\w*)\(\n.*\n\)", r"\1(…)", message, flags=re.S)
    return message.strip()


def _run(call) -> tuple[dict, float | None]:
    """(outcome, loss): outcome is what gets pinned; the loss value is compared, not pinned."""
    try:
        with torch.no_grad():
            output = call()
    except Exception as err:  # noqa: BLE001 - recording the exact failure is the point
        return {"status": "error", "exception": type(err).__name__, "message": normalise_message(str(err))}, None
    loss = getattr(output, "loss", None)
    if loss is None:
        return {"status": "ok-no-loss"}, None
    return {"status": "ok", "loss_finite": bool(torch.isfinite(loss).item())}, float(loss)


def wrap_like_the_seed(model, task_type: str | None, r: int = 8):
    """get_peft_model with the seed's bare target names and a task type, as users do."""
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=SEED_TARGETS, task_type=task_type)
    return compat.get_peft_model(model, config)


def kwarg_conflict(preset_name: str, task_type: str | None, seed: int = 0) -> dict:
    """The library's own forward called through a PEFT wrapper, and the custom forward beside it."""
    return kwarg_conflict_on(presets.build_model(preset_name, seed=seed), task_type, seed)


def kwarg_conflict_on(model, task_type: str | None, seed: int = 0) -> dict:
    """:func:`kwarg_conflict` on a given model (a user's checkpoint, on its device); the wrapper is
    unloaded afterwards, so the same model serves the next task type."""
    batch = synthetic.random_batch(model, seed=seed, device=next(model.parameters()).device)
    peft_model = wrap_like_the_seed(model, task_type)
    try:
        native, native_loss = _run(lambda: peft_model(**compat.native_inputs(model, batch)))
        custom, custom_loss = _run(lambda: forward.custom_forward(peft_model, batch))
    finally:
        compat.unload(peft_model)
    result = {"native": native, "custom": custom, "wrapper": type(peft_model).__name__}
    if native_loss is not None and custom_loss is not None:
        result["loss_difference"] = abs(native_loss - custom_loss)
    return result
