"""LoRA adapters that can never receive a gradient: named by structure where that is certain,
found by a probe backward otherwise (issue 20, item 3).

Structure. Every Q-Former layer has two feed-forward branches (transformers'
``*QFormerLayer.forward``, the same from 4.33 to 5.24): ``intermediate_query`` / ``output_query``
for the query positions and ``intermediate`` / ``output`` for the text positions, which exist
only where text enters the Q-Former.

* InstructBLIP: the instruction enters the Q-Former after the queries, but only the query
  positions leave it (forward.query_features keeps ``hidden[:, :num_queries]``). In the last
  layer the text rows of the feed-forward output are computed and dropped, so the adapters on
  ``layer.{L-1}.intermediate.dense`` and ``layer.{L-1}.output.dense`` get no gradient. Every
  other module of the last layer is shared with the query rows (self-attention) or sees only
  them (cross-attention), and the text rows of earlier layers feed the next layer's keys and
  values, so those stay live.
* BLIP-2: no text enters its Q-Former, so the text branch is never called in any layer. 4.33
  does not build it; from 4.45 it is built only with ``qformer_config.use_qformer_text_input``
  (default False; the published BLIP-2 presets leave it off). Where it is built, every layer's
  text-branch adapters are dead. On the shipped BLIP-2 presets there are none.

Probe. Everything else is found by one forward/backward of ``forward.custom_forward`` on a tiny
random batch. LoRA's ``lora_B`` starts at zero, so at initialisation ``lora_A``'s gradient
(``scaling * B^T g x^T``) is zero for every adapter, live or not, while ``lora_B``'s
(``scaling * g (A x)^T``) is non-zero exactly when the adapter's input ``x`` and its output's
upstream gradient ``g`` are both non-zero. A zero ``lora_B`` elsewhere also hides paths: an
adapter downstream of a zero-output adapter sees the base model's signal only. So the probe first
sets every ``lora_B`` to small random values (a generic point of adapter space, as after some
training; restored afterwards), then calls an adapter dead when the gradients of both its
``lora_A`` and ``lora_B`` are None or exactly zero. What it finds is dead because of frozen
values, not because training has not started: e.g. the query tokens of a model built from a
config start at zero (transformers' ``_init_weights``) and stay there, being frozen; after the
Q-Former's input LayerNorm (bias 0) layer 0 then sees an all-zero input at every position of
BLIP-2's Q-Former, which silences its self-attention adapters and what depends on them alone
(measured on blip2-opt-2.7b's full Q-Former, vision encoder and LM shrunk: layer 0's query, key,
value and attention.output.dense and its cross-attention query and key, 78,848 of 1,683,456
trainable parameters at r=8). A real checkpoint's trained query tokens do not. "Exactly zero" is
conservative: a gradient that is zero in exact arithmetic but leaves a rounding residue (the
self-attention query and key of BLIP-2's later layers above, whose identical query rows give
equal scores, keep a gradient 1e-7 of the others') counts as live, so the probe never calls a
live adapter dead, and what it finds can differ with the device's rounding. The probe needs
values: it cannot run on the meta device.
"""

from __future__ import annotations

import contextlib

import torch

from . import compat, forward

TEXT_FFN = ("intermediate.dense", "output.dense")  # relative to qformer.encoder.layer.{i}
LAST_LAYER_REASON = "structure: text-branch FFN of the last Q-Former layer is discarded"
NO_TEXT_REASON = "structure: text-branch FFN is never called (no text enters the BLIP-2 Q-Former)"
PROBE_REASON = "probe: no gradient reached lora_A or lora_B"
PROBE_B_STD = 0.02  # the perturbed lora_B's scale: BERT's initializer_range, small against the weights
META_NOTE = "not run: the model is on the meta device (no values); the structural finds are listed"


class ProbeError(RuntimeError):
    """The probe cannot run on this model (no values, no LoRA adapters)."""


def structurally_untrainable(model) -> dict[str, str]:
    """{module name: reason} for the text-branch FFN layers that can never get a gradient.

    ``model``: a bare InstructBLIP / BLIP-2 model or a PeftModel around one, on any device
    (meta included). Names are full module names inside the transformers model
    (``qformer.encoder.layer.11.intermediate.dense``), as lora.resolve_target_modules gives them;
    layers that do not exist in this build (BLIP-2 without text input) are left out.
    """
    base = compat.unwrap(model)
    layers = base.qformer.encoder.layer
    if forward.is_instructblip(base):
        dead_layers, reason = [len(layers) - 1], LAST_LAYER_REASON
    else:
        dead_layers, reason = range(len(layers)), NO_TEXT_REASON
    found = {}
    for index in dead_layers:
        for leaf in TEXT_FFN:
            with contextlib.suppress(AttributeError):  # the text branch is not built here
                layers[index].get_submodule(leaf)
                found[f"qformer.encoder.layer.{index}.{leaf}"] = reason
    return found


def lora_adapters(model) -> dict[str, dict[str, torch.nn.Parameter]]:
    """{module name: {parameter name: parameter}} of every LoRA-wrapped module, in model order.

    Parameter names are relative to the module (``lora_A.default.weight``); only ``lora_*``
    parameters count (the frozen ``base_layer`` does not).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {
        name: {p_name: p for p_name, p in module.named_parameters() if p_name.startswith("lora_")}
        for name, module in compat.unwrap(model).named_modules()
        if isinstance(module, BaseTunerLayer)
    }


def probe_batch(model, seed: int = 0, rows: int = 2) -> dict:
    """A tiny random training batch for ``model`` in forward.py's convention, on its device.

    ``rows`` images of the vision encoder's size (``pixel_values`` (rows, 3, S, S)), 4 prompt
    tokens, and 3 answer tokens (encoder-decoder; the last 2 of the 4 for decoder-only); for
    InstructBLIP 4 instruction tokens for the Q-Former. Token ids are random in the vocabulary.
    """
    base = compat.unwrap(model)
    config = base.config
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    vocab = config.text_config.vocab_size
    batch = {
        "pixel_values": torch.randn(rows, 3, size, size, generator=gen),
        "input_ids": torch.randint(vocab, (rows, 4), generator=gen),
        "attention_mask": torch.ones(rows, 4, dtype=torch.long),
    }
    if config.use_decoder_only_language_model:
        batch["labels"] = batch["input_ids"].clone()
        batch["labels"][:, :2] = forward.IGNORE_INDEX  # the prompt part
    else:
        batch["labels"] = torch.randint(vocab, (rows, 3), generator=gen)
    if forward.is_instructblip(base):
        batch["qformer_input_ids"] = torch.randint(config.qformer_config.vocab_size, (rows, 4), generator=gen)
        batch["qformer_attention_mask"] = torch.ones(rows, 4, dtype=torch.long)
    device = next(base.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def _perturbed_lora_b(adapters: dict, seed: int):
    """Every ``lora_B`` weight set to N(0, PROBE_B_STD^2) values, restored on exit."""
    gen = torch.Generator().manual_seed(seed)
    saved = []
    with torch.no_grad():
        for params in adapters.values():
            for name, param in params.items():
                if name.startswith("lora_B"):
                    saved.append((param, param.detach().clone()))
                    noise = torch.randn(param.shape, generator=gen) * PROBE_B_STD
                    param.copy_(noise.to(device=param.device, dtype=param.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in saved:
                param.copy_(value)


def probe_untrainable(model, batch: dict | None = None, seed: int = 0) -> list[str]:
    """Names of the LoRA-wrapped modules whose adapter gets no gradient (see the module docstring).

    ``model``: a PeftModel (or a model with LoRA layers) with values, i.e. not on the meta
    device; ``batch``: a training batch (default: :func:`probe_batch`). The model's weights,
    ``.grad`` fields and train/eval mode are left as they were (gradients are taken with
    ``torch.autograd.grad``; the forward runs in eval mode, so no dropout). Raises ProbeError
    on the meta device or when the model has no trainable LoRA parameter.
    """
    adapters = lora_adapters(model)
    live = {name: {k: p for k, p in params.items() if p.requires_grad} for name, params in adapters.items()}
    flat = [(name, p) for name, params in live.items() for p in params.values()]
    if not flat:
        raise ProbeError("the model has no trainable LoRA parameter to probe")
    if flat[0][1].is_meta or next(compat.unwrap(model).parameters()).is_meta:
        raise ProbeError(META_NOTE.removeprefix("not run: "))
    batch = probe_batch(model, seed) if batch is None else batch
    was_training = model.training
    model.eval()
    try:
        with _perturbed_lora_b(live, seed), torch.enable_grad():
            loss = forward.custom_forward(model, batch).loss
            grads = torch.autograd.grad(loss, [p for _, p in flat], allow_unused=True)
    finally:
        model.train(was_training)
    reached = {name for (name, _), grad in zip(flat, grads) if grad is not None and bool(grad.ne(0).any())}
    return [name for name in live if live[name] and name not in reached]


def untrainable_report(model, *, probe: bool = True) -> dict:
    """The LoRA adapters of ``model`` (a PeftModel) that can never train, with totals.

    Returns {"adapters": [{"module", "parameters", "reason"}] in model order, "count",
    "parameters" (their lora_A + lora_B elements), "trainable_parameters" (all of the model's),
    "share_of_trainable" (0 to 1), "probe": "run" or why not, "structure_unconfirmed": structural
    finds the probe saw a gradient reach (empty unless the structural rule is wrong for this
    transformers release)}. A module found by both is listed once, with the structural reason.
    """
    adapters = lora_adapters(model)
    reasons = {name: why for name, why in structurally_untrainable(model).items() if name in adapters}
    status, unconfirmed = "run", []
    if probe:
        try:
            found = set(probe_untrainable(model))
        except ProbeError as err:
            status = f"not run: {err}"
        else:
            unconfirmed = sorted(name for name in reasons if name not in found)
            reasons |= {name: PROBE_REASON for name in found if name not in reasons}
    else:
        status = "not run: not asked for"
    rows = [
        {"module": name, "parameters": sum(p.numel() for p in adapters[name].values()), "reason": reasons[name]}
        for name in adapters
        if name in reasons
    ]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dead = sum(row["parameters"] for row in rows)
    return {
        "adapters": rows,
        "count": len(rows),
        "parameters": dead,
        "trainable_parameters": trainable,
        "share_of_trainable": dead / trainable if trainable else 0.0,
        "probe": status,
        "structure_unconfirmed": unconfirmed,
    }


def trainable_targets(model, targets: list[str], wrap) -> list[str]:
    """``targets`` (full module names, lora.resolve_target_modules) less those that can never train.

    The structural finds go first (any device). With values (not on the meta device) the rest
    are wrapped by ``wrap(targets) -> PeftModel``, probed and unloaded again, so ``model`` comes
    back bare; the probe's LoRA initialisation runs on a forked RNG, so the caller's own wrap
    draws what it would have drawn without the probe. On the meta device only the structural
    finds are removed (the probe needs values).
    """
    dead = structurally_untrainable(model)
    targets = [name for name in targets if name not in dead]
    if next(compat.unwrap(model).parameters()).is_meta or not targets:
        return targets
    cuda = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    devices = [cuda] if cuda is not None else []
    with torch.random.fork_rng(devices=devices):
        probed = wrap(targets)
        try:
            found = set(probe_untrainable(probed))
        finally:
            compat.unload(probed)
    return [name for name in targets if name not in found]


def format_report(report: dict) -> str:
    """:func:`untrainable_report` as the text `qformer-lora verify` prints after the scope report."""
    lines = [
        f"adapters that can never train: {report['count']} ({report['parameters']:,} of "
        f"{report['trainable_parameters']:,} trainable parameters, {100 * report['share_of_trainable']:.2f} %)",
        f"probe backward: {report['probe']}",
    ]
    lines += [f"  {row['module']:<56}{row['parameters']:>10,}  {row['reason']}" for row in report["adapters"]]
    if report["structure_unconfirmed"]:
        lines.append(f"  the probe saw a gradient reach: {', '.join(report['structure_unconfirmed'])}")
    return "\n".join(lines)
