"""Observe how the installed transformers / peft behave on the seed's failure modes.

Each probe runs one thing the seed documents and returns what happened as plain
data (ok with a loss, or the exact exception class and message), so tests can
compare it with the per-release expectations in resources/expectations/ and the
reports can quote it.
"""

from __future__ import annotations

import contextlib
import re
import tempfile

import peft
import torch

from .. import compat, forward, lora, presets, synthetic

# None is PEFT's plain PeftModel; the others are the task wrappers users reach for.
TASK_TYPES = ("SEQ_2_SEQ_LM", "CAUSAL_LM", "FEATURE_EXTRACTION", None)
# the four embedded tiny presets every probe runs on (reproduce, compat_probe, release_diff)
TINY_PRESETS = ("tiny-instructblip-flan-t5", "tiny-instructblip-vicuna", "tiny-blip2-flan-t5", "tiny-blip2-opt")
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


def kwarg_conflict_cases() -> dict[str, dict]:
    """{"<preset> / <task type>": :func:`kwarg_conflict`} over the tiny presets and every task type (the
    keys of the kwarg_conflict expectation table)."""
    return {f"{p} / {t}": kwarg_conflict(p, t) for p in TINY_PRESETS for t in TASK_TYPES}


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


# ----------------------------------------------------------------------------- attention implementations
# transformers#40952 (2025-09-17, transformers 4.52.4): instructblip-vicuna-7b loaded without
# attn_implementation (SDPA where supported) captioned a COCO image "a reflection of a tree in a lake with
# a blue sky and clouds"; with attn_implementation="eager", a long, correct description of a giraffe by
# the water; closed as a bug. SDPA dispatch for the BLIP-2 / InstructBLIP Q-Former itself came with
# transformers#46401 ("[blip_2] Support attn_implementation dispatch", 2026-06); before it the Q-Former
# always computed eager attention whatever the configs said. So which implementation each component
# runs is observed here, not read from a version table.
ATTENTION_COMPONENTS = ("vision_model", "qformer", "language_model")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
NO_ATTN_ATTRIBUTE = "no attn_implementation attribute"
# Eager and SDPA compute the same function; in fp32 (eps = 2**-23, about 1.19e-7) they differ only by
# rounding: SDPA's CPU kernel scales q before q @ k^T where eager scales the product, and fuses the softmax,
# so each attention rounds differently by a few eps, over 2 layers per component, 3 components, forward
# and backward. Observed over the ten matrix pairs (reports/COMPAT.md, section 6): at most 9.4e-8
# relative on the loss and 1.1e-6 (about 9 eps) on the LoRA gradients. 1e-5 (about 84 eps) leaves a 9x
# margin and is orders below a real divergence: a mask applied wrongly, as suspected in transformers#40952,
# moves the loss by tenths of a nat.
# Observed per release (resources/expectations/attention.json): SDPA for the vision tower from 4.53, for the
# Q-Former only in 5.24 of the matrix (5.0.0 still refuses "sdpa" naming the Q-Former model); on 4.38.2
# attn_implementation="eager" did not reach InstructBLIP's LLaMA, which kept running SDPA.
ATTENTION_RELATIVE_BOUND = 1e-5


def configured_attention(model) -> dict[str, str]:
    """Per component: its module's ``config._attn_implementation``, or NO_ATTN_ATTRIBUTE on releases
    whose configs have none (before transformers had attn_implementation)."""
    model = compat.unwrap(model)
    return {
        c: str(getattr(getattr(model, c).config, "_attn_implementation", NO_ATTN_ATTRIBUTE))
        for c in ATTENTION_COMPONENTS
    }


@contextlib.contextmanager
def counting_sdpa_calls(model):
    """Yields {component: number of torch.nn.functional.scaled_dot_product_attention calls made while that
    component's forward runs}. Every release's SDPA path calls it through the module attribute
    (``torch.nn.functional.scaled_dot_product_attention(...)``), so replacing the attribute sees them all;
    the original is restored on exit."""
    model = compat.unwrap(model)
    counts, running = dict.fromkeys(ATTENTION_COMPONENTS, 0), []
    original = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        if running:
            counts[running[-1]] += 1
        return original(*args, **kwargs)

    def leave(module, args, output) -> None:  # a forward hook that returns a value replaces the output
        running.pop()

    hooks = []
    for name in ATTENTION_COMPONENTS:
        module = getattr(model, name)
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: running.append(name)))
        hooks.append(module.register_forward_hook(leave))
    torch.nn.functional.scaled_dot_product_attention = counted
    try:
        yield counts
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        for hook in hooks:
            hook.remove()


def attention_in_use(model, batch: dict) -> dict[str, dict]:
    """Per component {"configured": config value, "in_use": "sdpa" when its forward called
    scaled_dot_product_attention during one custom forward of ``batch``, else "eager"}."""
    with torch.no_grad(), counting_sdpa_calls(model) as counts:
        forward.custom_forward(model, batch)
    configured = configured_attention(model)
    return {c: {"configured": configured[c], "in_use": "sdpa" if counts[c] else "eager"} for c in counts}


def _lora_loss_and_grads(model, batch: dict, lora_state: dict | None, seed: int):
    """(peft model, loss, {name: grad}) of one custom forward + backward under Q-Former LoRA (r=8).
    Without ``lora_state`` the adapters' B matrices get seeded N(0, 0.02) values (at PEFT's init, B = 0
    makes every A gradient exactly zero); with it, those exact adapter values are loaded."""
    torch.manual_seed(seed)
    peft_model = lora.apply_lora(model, lora.LoraSpec(r=8))
    if lora_state is None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in sorted(peft_model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    else:
        unexpected = peft_model.load_state_dict(lora_state, strict=False).unexpected_keys
        if unexpected or not lora_state:
            raise RuntimeError(f"adapter state does not fit this model: unexpected {unexpected[:3]}")
    loss = forward.custom_forward(peft_model, batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return peft_model, float(loss.detach()), grads


def build_with_attention(preset_name: str, implementation: str, state_dict: dict):
    """The preset's model built with ``attn_implementation=implementation`` (fp32, eval mode) holding
    ``state_dict``'s weights; raises what the release raises when it refuses the implementation (releases
    before attn_implementation existed: TypeError; SDPA not supported for the model: ValueError).
    ``_from_config`` is what ``AutoModel.from_config(config, attn_implementation=...)`` calls on every release."""
    preset = presets.load_preset(preset_name)
    _, model_cls = presets.FAMILIES[preset.family]
    model = model_cls._from_config(presets.build_config(preset), attn_implementation=implementation)
    model.load_state_dict(state_dict)
    return model.eval()


def _refusal(err: BaseException) -> dict:
    return {"status": "refused", "exception": type(err).__name__, "message": normalise_message(str(err))}


def _default_from_pretrained(model, batch: dict) -> dict:
    """attention_in_use of ``model`` saved and loaded back with from_pretrained's default (presets.load_model)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return attention_in_use(presets.load_model(tmp), batch)


def _difference(eager: tuple, other: tuple) -> dict:
    """Loss / LoRA-gradient difference of ``other`` from ``eager``, each a (loss, {name: grad}) pair."""
    (loss_e, grads_e), (loss_o, grads_o) = eager, other
    scale = max(float(g.abs().max()) for g in grads_e.values())
    return {
        "loss_difference": abs(loss_e - loss_o),
        "loss_relative_difference": abs(loss_e - loss_o) / abs(loss_e),
        "grad_relative_difference": max(float((grads_e[n] - grads_o[n]).abs().max()) for n in grads_e) / scale,
        "bitwise_equal": loss_e == loss_o and all(torch.equal(grads_e[n], grads_o[n]) for n in grads_e),
    }


def attention(preset_name: str, seed: int = 0) -> dict:
    """Eager against SDPA attention on tiny preset ``preset_name`` (fp32, CPU), as transformers#40952 asks.

    Returns {"default": per-component attention_in_use of presets.build_model (the release's default),
    "default_from_pretrained": the same after save_pretrained / from_pretrained, "eager" / "sdpa": {"status":
    "ok", "components": ..., "loss": float} or {"status": "refused", "exception", "message"}, "differences":
    {"sdpa": ..., "default": ...}, each against the eager build where both built: "loss_difference" =
    |loss_eager - loss_other| (nats), its "loss_relative_difference", "grad_relative_difference" = max
    |g_eager - g_other| over every LoRA gradient element / max |g_eager| (one scale for all: an element that
    is zero in exact arithmetic cannot blow it up), "bitwise_equal"}. "default" is #40952's own comparison
    (no attn_implementation against "eager"), which stays measurable where a release refuses "sdpa". All
    builds hold the default build's weights and the same Q-Former LoRA adapters (r=8, B seeded nonzero),
    and see the same synthetic batch (one right-padded row, so the attention masks matter)."""
    default = presets.build_model(preset_name, seed=seed)
    batch = synthetic.random_batch(default, seed=seed, pad_rows=1)
    result = {"default": attention_in_use(default, batch)}
    try:
        result["default_from_pretrained"] = _default_from_pretrained(default, batch)
    except Exception as err:  # noqa: BLE001 - recorded like any other outcome
        result["default_from_pretrained"] = _refusal(err) | {"status": "error"}
    state, runs, lora_state = default.state_dict(), {}, None
    for implementation in ATTENTION_IMPLEMENTATIONS:
        try:
            model = build_with_attention(preset_name, implementation, state)
        except Exception as err:  # noqa: BLE001 - the release's refusal is the observation
            result[implementation] = _refusal(err)
            continue
        components = attention_in_use(model, batch)
        peft_model, loss, grads = _lora_loss_and_grads(model, batch, lora_state, seed)
        lora_state = lora_state or {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
        runs[implementation] = (loss, grads)
        result[implementation] = {"status": "ok", "components": components, "loss": loss}
    result["differences"] = {}
    if "eager" in runs:
        runs["default"] = _lora_loss_and_grads(default, batch, lora_state, seed)[1:]
        for other in ("sdpa", "default"):
            if other in runs:
                result["differences"][other] = _difference(runs["eager"], runs[other])
    return result


def attention_row(observed: dict) -> dict:
    """What is pinned per release from attention(): the implementation each component runs (default,
    from_pretrained's default, eager, sdpa) exactly, each refusal exactly, and per comparison with eager
    whether loss and gradients are bitwise equal."""

    def in_use(components: dict) -> dict:
        return {c: v["in_use"] for c, v in components.items()}

    row = {"default": in_use(observed["default"]), "configured_default": configured_of(observed["default"])}
    fp = observed["default_from_pretrained"]
    row["default_from_pretrained"] = in_use(fp) if "status" not in fp else fp
    for implementation in ATTENTION_IMPLEMENTATIONS:
        run = observed[implementation]
        row[implementation] = in_use(run["components"]) if run["status"] == "ok" else run
    row["bitwise_equal_to_eager"] = {k: v["bitwise_equal"] for k, v in observed["differences"].items()}
    return row


def configured_of(components: dict) -> dict:
    return {c: v["configured"] for c, v in components.items()}
