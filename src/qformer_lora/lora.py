"""LoRA confined to the Q-Former, a scope report, and a guard against leaks.

PEFT matches ``target_modules=["query", "key", "value", "dense"]`` against the
last name component of *every* module in the model. Whether that touches the
language model depends on how the language model names its layers, so the user's
names are resolved here into explicit full module names inside the chosen scope:
the Q-Former only (``qformer``, the default) or the Q-Former plus the language
model's equivalent layers (``qformer+llm``, the broad scope from the seed, kept for
comparison). The guard refuses any trainable parameter outside the scope.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from . import compat, untrained

COMPONENTS = ("vision_model", "qformer", "query_tokens", "language_projection", "language_model")
SCOPES = {"qformer": ("qformer",), "qformer+llm": ("qformer", "language_model")}
DEFAULT_TARGETS = ("query", "key", "value", "dense")

# The Q-Former uses BERT's layer names; the language models use their own, which the
# generic names never match. For the broad scope each generic name is translated.
LANGUAGE_MODEL_TARGETS = {
    "t5": {"query": ("q",), "key": ("k",), "value": ("v",), "dense": ("o", "wi", "wi_0", "wi_1", "wo")},
    "opt": {"query": ("q_proj",), "key": ("k_proj",), "value": ("v_proj",), "dense": ("out_proj", "fc1", "fc2")},
    "llama": {
        "query": ("q_proj",),
        "key": ("k_proj",),
        "value": ("v_proj",),
        "dense": ("o_proj", "gate_proj", "up_proj", "down_proj"),
    },
}
_PEFT_PREFIX = "base_model.model."


class ScopeError(ValueError):
    """LoRA targets that match nothing, or trainable parameters outside the chosen scope."""


def default_alpha(r: int) -> int:
    """LoRA alpha when none is given: 2 x rank, as in the reference Q-Former LoRA recipe
    (Kim et al., Findings of EMNLP 2024: r in {1, 2, 4, 8}, alpha 2r)."""
    return 2 * r


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int | None = None  # None: default_alpha(r)
    dropout: float = 0.0  # training's default (run_config.TrainConfig.lora_dropout): one default everywhere
    targets: tuple[str, ...] = DEFAULT_TARGETS
    scope: str = "qformer"
    extra: dict = field(default_factory=dict)  # passed to peft.LoraConfig as is
    # True: no adapter on modules that can never get a gradient (untrained.py: by structure, and by
    # a probe backward where the model has values)
    exclude_untrainable: bool = False

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ScopeError(f"unknown scope {self.scope!r}; expected one of {sorted(SCOPES)}")
        if self.r < 1:
            raise ScopeError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha is None:
            object.__setattr__(self, "alpha", default_alpha(self.r))  # frozen: set once, on construction


def component_of(parameter_name: str) -> str:
    """'base_model.model.qformer.encoder...' -> 'qformer'."""
    name = parameter_name.removeprefix(_PEFT_PREFIX)
    head = name.split(".", 1)[0]
    return head if head in COMPONENTS else name


def _linear_layers(model):
    """(full name, component, last name part) of every linear layer, LoRA-wrapped ones included."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in compat.unwrap(model).named_modules():
        parts = name.split(".")
        inside_lora = any(p == "base_layer" or p.startswith("lora_") for p in parts)
        if isinstance(module, BaseTunerLayer) or (isinstance(module, torch.nn.Linear) and not inside_lora):
            yield name, parts[0], parts[-1]


def resolve_target_modules(model, spec: LoraSpec) -> list[str]:
    """Full module names for ``spec.targets`` inside ``spec.scope``; refuses names that match nothing."""
    lm_type = compat.unwrap(model).config.text_config.model_type
    lm_names: set[str] = set()
    if spec.scope == "qformer+llm":
        if lm_type not in LANGUAGE_MODEL_TARGETS:
            raise ScopeError(
                f"scope 'qformer+llm' does not know the layer names of language model "
                f"type {lm_type!r}; known: {sorted(LANGUAGE_MODEL_TARGETS)}"
            )
        for target in spec.targets:
            lm_names.update(LANGUAGE_MODEL_TARGETS[lm_type].get(target, ()))

    selected, qformer_leaves, matched = [], set(), set()
    for name, component, leaf in _linear_layers(model):
        if component == "qformer":
            qformer_leaves.add(leaf)
            if leaf in spec.targets:
                selected.append(name)
                matched.add(leaf)
        elif component == "language_model" and leaf in lm_names:
            selected.append(name)
    unmatched = [t for t in spec.targets if t not in matched]
    if unmatched:
        raise ScopeError(
            f"LoRA target(s) {unmatched} match no linear layer in the Q-Former; "
            f"its linear layers are named {sorted(qformer_leaves)}"
        )
    return selected


def bare_name_matches_outside_qformer(model, targets) -> list[str]:
    """Modules outside the Q-Former that PEFT itself would match with the bare target names."""
    return [name for name, component, leaf in _linear_layers(model) if leaf in targets and component != "qformer"]


def apply_lora(model, spec: LoraSpec = LoraSpec()):
    """Wrap ``model`` with LoRA on the resolved modules only (less those that can never train, with
    ``spec.exclude_untrainable``), then verify the scope."""
    targets = resolve_target_modules(model, spec)
    if spec.exclude_untrainable:
        targets = untrained.trainable_targets(model, targets, lambda names: _wrap(model, spec, names))
        if not targets:
            raise ScopeError(f"every LoRA target in scope {spec.scope!r} is untrainable; nothing would train")
    peft_model = _wrap(model, spec, targets)
    check_trainable_scope(peft_model, spec.scope)
    return peft_model


def _wrap(model, spec: LoraSpec, targets: list[str]):
    import peft

    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias="none",
        **spec.extra,
    )
    return compat.get_peft_model(model, config)


def check_trainable_scope(model, scope: str = "qformer") -> None:
    """Raise ScopeError naming every trainable parameter outside ``scope``."""
    allowed = SCOPES[scope]
    leaks = [name for name, p in model.named_parameters() if p.requires_grad and component_of(name) not in allowed]
    if leaks:
        shown = ", ".join(leaks[:10]) + (f" (and {len(leaks) - 10} more)" if len(leaks) > 10 else "")
        raise ScopeError(
            f"{len(leaks)} trainable parameter(s) outside scope {scope!r} (allowed: {', '.join(allowed)}): {shown}"
        )


def adapter_spec(model, adapter_name: str = "default") -> LoraSpec:
    """The LoraSpec a loaded PEFT LoRA adapter amounts to, read from the model rather than assumed.

    For an adapter trained elsewhere with plain PEFT (generate.load_adapter): r, alpha and dropout
    from its LoraConfig; targets: the last name part of every layer it wraps (PEFT's
    ``target_modules`` may be a regex or full names); scope: the narrowest of SCOPES holding every
    component with a LoRA layer or a fully trained module (``modules_to_save``). ScopeError when
    the adapter is no LoRA adapter, or reaches a component outside every scope (the vision
    encoder, say), naming the components.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = model.peft_config[adapter_name]
    kind = str(getattr(config.peft_type, "value", config.peft_type))  # PeftType or its name: one spelling everywhere
    if kind != "LORA":
        raise ScopeError(f"adapter {adapter_name!r} is a {kind} adapter; only LoRA adapters are read here")
    wrapped = [
        (name.split(".")[0], name.split(".")[-1])
        for name, module in compat.unwrap(model).named_modules()
        if isinstance(module, BaseTunerLayer)
    ]
    saved = {component_of(name) for name, _ in model.named_parameters() if "modules_to_save" in name}
    touched = {c for c, _ in wrapped} | saved
    scope = next((name for name, allowed in SCOPES.items() if touched <= set(allowed)), None)
    if scope is None:
        outside = sorted(touched - set(SCOPES["qformer+llm"]))
        known = "; ".join(f"{name}: {' + '.join(allowed)}" for name, allowed in SCOPES.items())
        raise ScopeError(
            f"adapter {adapter_name!r} has LoRA layers or trained modules in {', '.join(outside)}, outside every "
            f"scope this project knows ({known})"
        )
    return LoraSpec(
        r=config.r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        targets=tuple(sorted({leaf for _, leaf in wrapped})),
        scope=scope,
    )


def adapter_parameters(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if p.requires_grad]


def scope_report(model, spec: LoraSpec) -> dict:
    """Counts that say where LoRA went: tensors, trainable parameters, per component, dtype."""
    components = {c: {"parameters": 0, "trainable": 0, "lora_tensors": 0} for c in COMPONENTS}
    adapter_dtypes: set[str] = set()
    for name, param in model.named_parameters():
        entry = components.setdefault(component_of(name), {"parameters": 0, "trainable": 0, "lora_tensors": 0})
        entry["parameters"] += param.numel()
        if param.requires_grad:
            entry["trainable"] += param.numel()
        if "lora_" in name:
            entry["lora_tensors"] += 1
            adapter_dtypes.add(str(param.dtype).removeprefix("torch."))
    total = sum(c["parameters"] for c in components.values())
    trainable = sum(c["trainable"] for c in components.values())
    return {
        "lora": asdict(spec) | {"targets": list(spec.targets)},
        "lora_tensors": sum(c["lora_tensors"] for c in components.values()),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "components": components,
        "adapter_dtypes": sorted(adapter_dtypes),
        "bare_name_matches_outside_qformer": bare_name_matches_outside_qformer(model, spec.targets),
    }


def format_scope_report(report: dict) -> str:
    """``scope_report`` with "versions" and "preset" (or "base_checkpoint") added, as the text `qformer-lora
    verify` (and `generate --adapter`) prints."""
    spec = report["lora"]
    model = (
        f"base checkpoint {report['base_checkpoint']}" if "base_checkpoint" in report else f"preset {report['preset']}"
    )
    lines = [
        f"{model}  (torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}, peft {report['versions']['peft']})",
        f"LoRA r={spec['r']} alpha={spec['alpha']} targets={','.join(spec['targets'])} scope={spec['scope']}"
        + (" exclude_untrainable" if spec.get("exclude_untrainable") else ""),
        f"LoRA tensors:         {report['lora_tensors']:,}",
        f"trainable parameters: {report['trainable_parameters']:,} of {report['total_parameters']:,} "
        f"({report['trainable_percent']:.4f} %)",
        f"adapter dtype:        {', '.join(report['adapter_dtypes']) or '-'}",
        "",
        f"{'component':<22}{'parameters':>16}{'trainable':>14}{'LoRA tensors':>14}",
    ]
    for name, c in report["components"].items():
        lines.append(f"{name:<22}{c['parameters']:>16,}{c['trainable']:>14,}{c['lora_tensors']:>14,}")
    leaks = report["bare_name_matches_outside_qformer"]
    lines.append("")
    lines.append(
        f"bare target names would also match outside the Q-Former: {len(leaks)} layer(s)"
        + (f", e.g. {', '.join(leaks[:3])}" if leaks else "")
    )
    return "\n".join(lines)
