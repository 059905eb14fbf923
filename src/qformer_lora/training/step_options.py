"""Options that make a training step cheaper without changing what it computes.

Each option is asked for, and what was actually used is recorded with the reason when
it differs (a ``Choice``), so a run log says "fused AdamW requested, foreach used:
<why>" instead of silently running something else. Read top to bottom:

1. ``set_lm_checkpointing``: activation checkpointing of the frozen language model
   (compat.set_activation_checkpointing), and what makes it act in the eval-mode training loop.
2. ``make_optimizer``: AdamW, fused where the installed torch has a kernel for the
   parameters' device, else foreach (recorded, and warned when fused was demanded).
3. ``maybe_compile``: torch.compile of a module (in place, state_dict keys unchanged) or
   a function, with a probe call that turns a compile failure into a recorded fallback;
   ``compile_frozen_blocks``: the same for each repeated block of the frozen vision
   encoder and language model (regional compilation); ``compile_mode_kwargs``: CUDA graphs
   ("reduce-overhead") or not; ``compile_step_modules``: the trainer's model compiles in one call;
   ``compile_optimizer_step``: AdamW's step compiled, with tensor learning rates.
4. ``build_feature_cache``: the vision-feature cache (training/feature_cache.py) from an option.

What the installed torch can do (fused kernels, compile) is asked of compat.py.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import compat

FEATURE_CACHE_MODES = ("off", "memory", "disk")
# torch.compile modes the compile options take: "reduce-overhead" adds CUDA graphs (compile_mode_kwargs)
COMPILE_MODES = ("default", "reduce-overhead")


@dataclass(frozen=True)
class Choice:
    """What an option asked for, what is used, and why they differ (None when as asked)."""

    option: str
    requested: object
    used: str
    reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- 1. LM checkpointing

# Float attributes of the modules switched to training mode that act only in training mode
# (OPT layers' residual dropout and layerdrop, T5 attention's dropout). Zeroed while the
# eval-mode loop checkpoints, so switching the mode flag changes nothing else.
_STATE = "_qformer_lora_checkpointing"


def set_lm_checkpointing(model, enabled: bool) -> Choice:
    """Activation checkpointing of the language model, also in an eval-mode model.

    transformers checkpoints a layer only while ``layer.training`` is True. The bench runs
    in train mode, where switching transformers' checkpointing on is all it takes (non-reentrant
    where the release lets us choose: the LM's input embeddings carry grad from the Q-Former,
    so gradients reach the adapters through the recomputed layers). The training loop runs
    in eval mode (no dropout anywhere), so here exactly the modules whose flag makes them
    checkpoint (``compat.checkpointing_switches``) are switched to training mode, with their own
    dropout-like rates set to 0; their submodules (dropout layers, attention) stay in eval
    mode. Disabling restores flags and rates, and removes the input-embedding hook that
    transformers adds on enabling (its disable leaves it on non-PEFT models: the text
    embeddings would keep requiring grad). Gradients are equal either way (a test).
    """
    lm = compat.unwrap(model).language_model
    state = getattr(lm, _STATE, None)
    if enabled and state is None:
        state = {"had_input_hook": hasattr(lm, "_require_grads_hook"), "rates": {}}
        compat.set_activation_checkpointing(lm, True)
        # only the modules that checkpoint keep the flag: on T5's attention it just marks a zero
        # position bias as requiring grad, which breaks compiled graphs and moves gradients in the
        # last bits (see compat.checkpointing_switches)
        switches = {id(m) for m in compat.checkpointing_switches(lm)}
        for module in lm.modules():
            if hasattr(module, "gradient_checkpointing") and id(module) not in switches:
                module.gradient_checkpointing = False
        if not lm.training:
            for name, module in lm.named_modules():
                if id(module) in switches and not module.training:
                    rates = {k: v for k, v in vars(module).items() if "drop" in k and isinstance(v, float)}
                    state["rates"][name] = rates
                    for key in rates:
                        setattr(module, key, 0.0)
                    module.training = True  # this module only, not its children
        setattr(lm, _STATE, state)
    elif not enabled:
        if lm_checkpointing_active(model):
            compat.set_activation_checkpointing(lm, False)
        if state is not None:
            modules = dict(lm.named_modules())
            for name, rates in state["rates"].items():
                for key, value in rates.items():
                    setattr(modules[name], key, value)
                modules[name].training = False
            if not state["had_input_hook"] and hasattr(lm, "_require_grads_hook"):
                lm.disable_input_require_grads()
            delattr(lm, _STATE)
    return Choice("lm_checkpointing", enabled, "on" if lm_checkpointing_active(model) else "off")


def lm_checkpointing_active(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in compat.unwrap(model).language_model.modules())


# ----------------------------------------------------------------------------- 2. the optimizer


def make_optimizer(
    params, lr: float, eps: float = 1e-8, weight_decay: float = 0.0, fused: bool | None = None
) -> tuple[torch.optim.AdamW, Choice]:
    """AdamW and the implementation used.

    ``fused=True``: fused, or foreach with a warning when unavailable. ``None``: fused
    where available, else foreach, silently (recorded). ``False``: torch's default choice
    (for-loop on CPU, foreach on CUDA): what training/train.py and bench/measurement.py used before this option.
    """
    params = list(params)
    kwargs = dict(lr=lr, eps=eps, weight_decay=weight_decay)
    if fused is False:
        return torch.optim.AdamW(params, **kwargs), Choice("fused_optimizer", False, "default")
    reason = compat.fused_adamw_unavailable_reason(params)
    if reason is None:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs), Choice("fused_optimizer", fused, "fused")
        except (RuntimeError, ValueError) as err:  # torch checks devices/dtypes again on construction
            reason = f"AdamW(fused=True) raised {type(err).__name__}: {err}"
    if fused:
        warnings.warn(f"fused AdamW requested but unavailable ({reason}); using foreach AdamW", stacklevel=2)
    return torch.optim.AdamW(params, foreach=True, **kwargs), Choice("fused_optimizer", fused, "foreach", reason)


# ----------------------------------------------------------------------------- 3. compile


def _uncompile(target) -> None:
    if isinstance(target, torch.nn.Module) and "forward" in vars(target):
        del target.forward  # back to the class's forward


def maybe_compile(target, enabled: bool, *, probe=None, device_type: str | None = None, **compile_kwargs):
    """(compiled target or ``target``, Choice).

    A module is compiled in place (its ``forward`` is replaced; parameters, state_dict
    keys, hooks and PEFT wrapping are unchanged), so pass e.g. ``unwrap(model).qformer``.
    A function is returned compiled. torch.compile is lazy: failures show at the first
    call, so ``probe(target)`` (e.g. one forward and backward, gradients zeroed after) runs
    here, and a failure there undoes the compile and is recorded instead of raised.
    """
    if not enabled:
        return target, Choice("compile", False, "eager")
    if not isinstance(target, torch.nn.Module):
        compiled, choice = _compile_or_fall_back(
            "compile", device_type or "cpu", lambda: torch.compile(target, **compile_kwargs), lambda: None, probe
        )
        return compiled or target, choice
    probe_target = (lambda _modules: probe(target)) if probe is not None else None
    return target, _compile_modules_or_fall_back("compile", [target], probe_target, device_type, compile_kwargs)


# Variants dynamo may keep of one block forward: vision layer, first / later encoder and decoder
# blocks, each with and without grad (validation), and a smaller last batch (see raise_recompile_limit).
FROZEN_RECOMPILE_LIMIT = 32


def frozen_blocks(model) -> list[torch.nn.Module]:
    """The repeated blocks of the frozen vision encoder and language model, in order.

    A block list is the outermost ModuleList whose members are all one class (ViT layers,
    T5's encoder / decoder blocks, OPT / Llama decoder layers); T5's per-block ``layer``
    list mixes classes and lies inside a block, so it is not a block list itself.
    """
    base = compat.unwrap(model)
    blocks = []
    for tower in (base.vision_model, base.language_model):
        taken: list[str] = []
        for name, module in tower.named_modules():
            if any(name.startswith(prefix + ".") for prefix in taken):
                continue
            if isinstance(module, torch.nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
                taken.append(name)
                blocks.extend(module)
    return blocks


def compile_frozen_blocks(model, enabled: bool, *, probe=None, **compile_kwargs) -> Choice:
    """Regional compilation of the frozen towers: each of ``frozen_blocks`` compiled in place.

    Their weights never change, but the step runs them every time (the LM also backward,
    for its input gradients); eager they cost one Python call and kernel launch per small
    op, which left the H200 step host-bound. Identical blocks share compiled code, so the
    compile costs a few block graphs, not a whole-model graph. ``probe`` as for maybe_compile.
    """
    if not enabled:
        return Choice("compile_frozen", False, "eager")
    compat.raise_recompile_limit(FROZEN_RECOMPILE_LIMIT)
    return _compile_modules_or_fall_back("compile_frozen", frozen_blocks(model), probe, None, compile_kwargs)


def _compile_modules_or_fall_back(option: str, modules, probe, device_type, compile_kwargs) -> Choice:
    if device_type is None:
        first = next(iter(modules[0].parameters()), None) if modules else None
        device_type = first.device.type if first is not None else "cpu"

    def compile_all():
        for module in modules:
            module.forward = torch.compile(module.forward, **compile_kwargs)
        return modules

    def undo():
        for module in modules:
            _uncompile(module)

    return _compile_or_fall_back(option, device_type, compile_all, undo, probe)[1]


def _compile_or_fall_back(
    option: str, device_type: str, compile_, undo, probe, unavailable=None
) -> tuple[object, Choice]:
    """(what compile_() returned, Choice "compiled"), or (None, Choice "eager" with the reason:
    compile unavailable here (``unavailable(device_type)``, default compat.torch_compile_unavailable_reason),
    or compile_ / probe raised, after which undo() ran)."""
    reason = (unavailable or compat.torch_compile_unavailable_reason)(device_type)
    if reason is None:
        try:
            compiled = compile_()
            if probe is not None:
                probe(compiled)
            return compiled, Choice(option, True, "compiled")
        except Exception as err:  # noqa: BLE001 - any compile failure means "run eager", with the reason
            undo()
            reason = f"torch.compile failed: {type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
    warnings.warn(f"{option} requested but not used ({reason}); running eager", stacklevel=3)
    return None, Choice(option, True, "eager", reason)


def compile_mode_kwargs(mode: str, device_type: str) -> tuple[dict, Choice]:
    """torch.compile's keyword arguments for ``mode`` (COMPILE_MODES) on ``device_type``, and the mode used.

    "reduce-overhead" is torch.compile's CUDA graphs: each compiled graph is recorded once and
    replayed with one launch, which removes the per-kernel launch cost of a fixed-shape step
    (the collator pads every text to its budget) for more memory (the graphs' private pools).
    CUDA graphs exist on CUDA alone: on another device the mode is recorded as compiled
    "default" (the reason says why). ValueError for a mode not in COMPILE_MODES.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}; expected one of {COMPILE_MODES}")
    if mode != "default" and device_type != "cuda":
        return {}, Choice(
            "compile_mode", mode, "default", f"CUDA graphs need a CUDA device; {device_type} compiles as default"
        )
    return ({"mode": mode} if mode != "default" else {}), Choice("compile_mode", mode, mode)


def compile_step_modules(
    model, *, qformer: bool, frozen: bool, mode: str, probe, device_type: str, **compile_kwargs
) -> list[Choice]:
    """The trainer's model compiles (compile_qformer, compile_frozen) in ``mode``, each in place with
    static shapes and ``probe`` (as maybe_compile); their Choices, the mode's first when any is on.
    ``compile_kwargs`` go to torch.compile too (a test's backend)."""
    if not (qformer or frozen):
        return []
    kwargs, mode_choice = compile_mode_kwargs(mode, device_type)
    kwargs |= compile_kwargs
    # static shapes: the collator pads every text to one length; a smaller last batch compiles
    # once more. Dynamic-shape recompiles failed in inductor (torch 2.11, H200).
    choices = [mode_choice]
    if qformer:
        base = compat.unwrap(model)
        choices.append(maybe_compile(base.qformer, True, probe=probe, dynamic=False, **kwargs)[1])
    if frozen:
        choices.append(compile_frozen_blocks(model, True, probe=probe, dynamic=False, **kwargs))
    return choices


def uncompile_step_modules(model) -> None:
    """Undo :func:`compile_step_modules`: the Q-Former and the frozen blocks run their class's forward again."""
    for module in (compat.unwrap(model).qformer, *frozen_blocks(model)):
        _uncompile(module)


def compile_optimizer_step(optimizer: torch.optim.Optimizer, enabled: bool, *, mode: str = "default") -> Choice:
    """AdamW's step compiled in place (PyTorch's recipe "Compiling the optimizer with torch.compile"):
    ``optimizer.step`` becomes a call of the compiled step, so GradScaler and the step call it as before.

    Each call runs the step with every group's learning rate as a 0-dim float32 tensor on its
    parameters' device, refilled from ``group["lr"]`` first and swapped back for the float after
    (the recipe "Running the compiled optimizer with an LR Scheduler"): a scheduler's new rate is a
    new value of a graph input, not a new constant that recompiles the step, while the scheduler,
    the guard, checkpoints and logs keep seeing a float. On CUDA the groups are made capturable
    (what dynamo sets on a fresh optimizer; a resumed one loads its saved flag): torch's foreach
    AdamW takes a tensor learning rate only so. fullgraph=False: the optimizer's hooks may break
    the graph. ``mode``: as compile_mode_kwargs.

    torch.compile is lazy, so one compiled step runs here on zero gradients (the probe); the
    parameters, gradients and state are put back in place after it (a fresh AdamW's state is
    zeros, step 0, as its first step would create it), so a compile failure is recorded here
    (Choice "eager" with the reason) and the step stays eager. Not for fused AdamW, which is
    one kernel per group already (recorded, eager).
    """
    if not enabled:
        return Choice("compile_optimizer", False, "eager")
    groups = optimizer.param_groups
    if any(group.get("fused") for group in groups):
        return Choice("compile_optimizer", True, "eager", "fused AdamW is one kernel per parameter group already")
    params = [p for group in groups for p in group["params"]]
    device_type = params[0].device.type if params else "cpu"
    kwargs, _ = compile_mode_kwargs(mode, device_type)
    had_own_step = "step" in vars(optimizer)  # an LR scheduler wraps the step in an instance attribute
    eager_step = optimizer.step

    def compile_():
        optimizer.step = _tensor_lr_step(groups, eager_step, torch.compile(_call, fullgraph=False, **kwargs))
        return optimizer.step

    def undo():
        if had_own_step:
            optimizer.step = eager_step
        elif "step" in vars(optimizer):
            del optimizer.step

    probe = functools.partial(_probe_optimizer_step, optimizer, params)
    unavailable = compat.compiled_optimizer_unavailable_reason
    return _compile_or_fall_back("compile_optimizer", device_type, compile_, undo, probe, unavailable)[1]


def _tensor_lr_step(groups: list, eager_step, compiled):
    """``compiled(eager_step)`` as an optimizer step, the groups' learning rates tensors during the call."""
    lrs = [torch.tensor(float(g["lr"]), dtype=torch.float32, device=g["params"][0].device) for g in groups]
    on_cuda = [all(p.is_cuda for p in g["params"]) for g in groups]

    # as the step it calls: an LR scheduler recognises its own wrapper (else it warns that
    # optimizer.step was replaced after it was built)
    @functools.wraps(eager_step)
    def step(closure=None):
        if closure is not None:
            raise TypeError("the compiled AdamW step takes no closure")
        floats = [group["lr"] for group in groups]
        for group, lr, cuda in zip(groups, lrs, on_cuda):
            lr.fill_(group["lr"])
            group["lr"] = lr
            group["capturable"] = group["capturable"] or cuda
        try:
            compiled(eager_step)
        finally:
            for group, value in zip(groups, floats):
                group["lr"] = value

    return step


def _call(fn):  # what torch.compile traces for compile_optimizer_step: the optimizer's own step
    return fn()


def _probe_optimizer_step(optimizer, params: list, step) -> None:
    """One ``step`` on zero gradients; parameters, gradients and optimizer state put back in place
    (tensors keep their identity, which the compiled step's guards check)."""
    grads = [p.grad for p in params]
    values = [p.detach().clone() for p in params]
    state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in params if p in optimizer.state}
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        step()
    finally:
        with torch.no_grad():
            for p, grad, value in zip(params, grads, values):
                p.copy_(value)
                p.grad = grad
                for key, tensor in optimizer.state.get(p, {}).items():
                    if p in state:
                        tensor.copy_(state[p][key])
                    else:
                        tensor.zero_()


# ----------------------------------------------------------------------------- 4. the feature cache


def build_feature_cache(model, mode: str, directory: str | os.PathLike | None = None, *, augment: bool = False):
    """None for "off", else a FeatureCache ("disk" needs ``directory``); refusals raise FeatureCacheError."""
    from .feature_cache import FeatureCache

    if mode not in FEATURE_CACHE_MODES:
        raise ValueError(f"feature cache mode is {mode!r}; expected one of {FEATURE_CACHE_MODES}")
    if mode == "off":
        return None
    if mode == "disk" and directory is None:
        raise ValueError("feature cache mode 'disk' needs a directory")
    return FeatureCache(model, directory=Path(directory) if mode == "disk" else None, augment=augment)
