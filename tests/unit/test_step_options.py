"""Step options change the cost of a step, not its result: checkpointing, fused AdamW, compile."""

from __future__ import annotations

import copy
import functools
import math
import types

import pytest
import torch

from qformer_lora import compat, data, forward, inputs, lora, presets, synthetic
from qformer_lora.diagnostics import numerics
from qformer_lora.training import run_config, step_options, train
from qformer_lora.training import step as training_step_module

T5, OPT = "tiny-instructblip-flan-t5", "tiny-blip2-opt"
# Checkpointing recomputes the same layers: bitwise where non-reentrant checkpointing can be
# chosen (transformers >= 4.35). Before, transformers checkpoints reentrantly, whose backward
# sums T5's encoder-state gradient in another order (measured on 4.33.3: 1.8e-7 relative).
# (Until compat.checkpointing_switches, T5's attention also marked a zero position bias as
# requiring grad, and SDPA then took another CPU kernel: up to 5e-7 relative on 5.24.)
CHECKPOINT_RTOL = 0.0 if compat.TRANSFORMERS >= compat.CHECKPOINTING_KWARGS else 1e-6
FUSED_RTOL = 1e-5  # fused vs foreach AdamW: same formula, different association order
COMPILE_RTOL = 1e-4  # inductor fuses and reorders reductions


@functools.cache
def _adapter_model(preset: str):
    torch.manual_seed(0)
    model = lora.apply_lora(presets.build_model(preset), lora.LoraSpec(r=2, alpha=4, dropout=0.0))
    with torch.no_grad():  # non-zero lora_B: every adapter tensor then gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model.eval()  # eval mode, as training/train.py runs (no dropout anywhere)


def adapter_model(preset: str = T5):
    return copy.deepcopy(_adapter_model(preset))


def loss_and_grads(model, batch):
    params = lora.adapter_parameters(model)
    for p in params:
        p.grad = None
    loss = forward.custom_forward(model, batch).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in params])


# ----------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("preset", [T5, OPT])
def test_lm_checkpointing_keeps_loss_and_adapter_gradients(preset):
    """The tiny presets keep the libraries' default dropout (0.1) in the language model, so
    a checkpointing switch that turned dropout on would show here as a large difference."""
    model = adapter_model(preset)
    batch = synthetic.random_batch(model, batch_size=3, pad_rows=1, seed=5)
    plain_loss, plain_grads = loss_and_grads(model, batch)
    choice = step_options.set_lm_checkpointing(model, True)
    assert choice.used == "on", choice
    ckpt_loss, ckpt_grads = loss_and_grads(model, batch)
    loss_gap = abs(ckpt_loss.item() - plain_loss.item()) / abs(plain_loss.item())
    grad_gap = ((ckpt_grads - plain_grads).abs().max() / plain_grads.abs().max()).item()
    assert loss_gap <= CHECKPOINT_RTOL, f"{preset}: loss moved by {loss_gap:.2e} relative with checkpointing"
    assert grad_gap <= CHECKPOINT_RTOL, (
        f"{preset}: adapter gradients moved by {grad_gap:.2e} of their largest "
        f"entry with checkpointing (tolerance {CHECKPOINT_RTOL})"
    )


def saved_tensor_count(model, batch) -> int:
    """Tensors autograd keeps for backward outside checkpointed regions (inside them the
    checkpoint's own hooks take over, so fewer are seen when checkpointing acts)."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward.custom_forward(model, batch).loss
    loss.backward()
    return count


@pytest.mark.parametrize("preset", [T5, OPT])
def test_lm_checkpointing_acts_in_an_eval_mode_model_and_switches_off_cleanly(preset):
    model = adapter_model(preset)
    batch = synthetic.random_batch(model, batch_size=2, seed=6)
    lm = compat.unwrap(model).language_model
    rates_before = {n: dict(vars(m)) for n, m in lm.named_modules()}
    plain = saved_tensor_count(model, batch)
    step_options.set_lm_checkpointing(model, True)
    checkpointed = saved_tensor_count(model, batch)
    assert checkpointed < plain, (
        f"{preset}: {checkpointed} saved tensors with checkpointing vs {plain} without: it does not act in eval mode"
    )
    choice = step_options.set_lm_checkpointing(model, False)
    assert choice.used == "off" and not any(m.training for m in lm.modules()), "modules left in training mode"
    changed = [
        n
        for n, m in lm.named_modules()
        if {k: v for k, v in vars(m).items() if isinstance(v, float)}
        != {k: v for k, v in rates_before[n].items() if isinstance(v, float)}
    ]
    assert not changed, f"dropout rates not restored in {changed}"
    assert saved_tensor_count(model, batch) == plain


# ----------------------------------------------------------------------------- the optimizer


def loss_curve(model, batches, optimizer, steps: int = 5) -> list[float]:
    params = lora.adapter_parameters(model)
    losses = []
    for step in range(steps):
        loss = forward.custom_forward(model, batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert any(p.abs().sum() > 0 for p in params)
    return losses


def assert_curves_close(observed, reference, rtol: float, what: str):
    worst = max(abs(o - r) / abs(r) for o, r in zip(observed, reference))
    assert worst <= rtol, (
        f"{what}: loss curve off by {worst:.2e} relative (tolerance {rtol})\n"
        f"  reference: {reference}\n  observed:  {observed}"
    )
    assert reference[-1] < reference[0], f"the reference curve does not go down, a vacuous comparison: {reference}"


def test_fused_adamw_matches_foreach_over_five_steps():
    reason = compat.fused_adamw_unavailable_reason([torch.zeros(1)])
    if reason is not None:
        pytest.skip(f"no fused AdamW on CPU here: {reason}")
    model = adapter_model()
    batches = [synthetic.random_batch(model, batch_size=2, seed=s) for s in range(2)]
    curves = {}
    for fused in (True, False):
        m = copy.deepcopy(model)
        hyper = dict(lr=1e-2, eps=1e-8, weight_decay=0.01)
        opt, choice = (
            step_options.make_optimizer(lora.adapter_parameters(m), fused=True, **hyper)
            if fused
            else (torch.optim.AdamW(lora.adapter_parameters(m), foreach=True, **hyper), None)
        )
        if fused:
            assert choice.used == "fused", f"fused AdamW available but not used: {choice}"
        curves[fused] = loss_curve(m, batches, opt)
    assert_curves_close(curves[True], curves[False], FUSED_RTOL, "fused vs foreach AdamW")


def test_fused_request_falls_back_to_foreach_with_the_reason(monkeypatch):
    monkeypatch.setattr(compat, "fused_adamw_unavailable_reason", lambda params: "no kernel here")
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.warns(UserWarning, match="no kernel here"):
        opt, choice = step_options.make_optimizer(params, lr=1e-3, fused=True)
    assert (choice.used, choice.reason) == ("foreach", "no kernel here") and opt.defaults["foreach"] is True
    opt, choice = step_options.make_optimizer(params, lr=1e-3, fused=None)  # automatic: silent, recorded
    assert choice.used == "foreach" and choice.reason == "no kernel here"
    opt, choice = step_options.make_optimizer(params, lr=1e-3, eps=1e-6, weight_decay=0.1, fused=False)
    assert choice.used == "default" and not opt.defaults["fused"] and opt.defaults["eps"] == 1e-6


def test_fused_adamw_reason_names_a_device_without_a_kernel():
    """CPU has fused AdamW kernels since torch 2.4 (compat.fused_adamw_unavailable_reason's source; the
    CI's torch is 2.13); the meta device has none in any release, and the reason names it."""
    if compat.TORCH < compat.Version("2.4"):
        pytest.skip(f"torch {compat.TORCH} predates CPU fused AdamW (2.4)")
    assert compat.fused_adamw_unavailable_reason([torch.zeros(1)]) is None
    reason = compat.fused_adamw_unavailable_reason([torch.zeros(1, device="meta")])
    assert reason is not None and "for meta" in reason, reason


def test_integer_parameters_are_reported_unfused():
    reason = compat.fused_adamw_unavailable_reason([torch.zeros(2, dtype=torch.long)])
    assert reason is not None and "floating-point" in reason


class _RecordingLM:
    """Records which checkpointing method a release would be called with."""

    def __init__(self, renamed: bool):
        self.calls = []
        if renamed:  # transformers 5 names
            self.activation_checkpointing_enable = lambda **kw: self.calls.append(("activation_enable", kw))
            self.activation_checkpointing_disable = lambda: self.calls.append(("activation_disable", {}))

    def gradient_checkpointing_enable(self, **kwargs):
        self.calls.append(("gradient_enable", kwargs))

    def gradient_checkpointing_disable(self):
        self.calls.append(("gradient_disable", {}))


@pytest.mark.parametrize(
    "version, renamed, expected",
    [
        ("4.34.1", False, ("gradient_enable", {})),  # no kwargs before 4.35: the call would raise TypeError
        ("4.35.0", False, ("gradient_enable", {"gradient_checkpointing_kwargs": {"use_reentrant": False}})),
        ("5.24.0", True, ("activation_enable", {"activation_checkpointing_kwargs": {"use_reentrant": False}})),
    ],
)
def test_activation_checkpointing_uses_each_releases_call(monkeypatch, version, renamed, expected):
    from packaging.version import Version

    monkeypatch.setattr(compat, "TRANSFORMERS", Version(version))
    lm = _RecordingLM(renamed)
    compat.set_activation_checkpointing(lm, True)
    compat.set_activation_checkpointing(lm, False)
    assert lm.calls == [expected, ("activation_disable" if renamed else "gradient_disable", {})]


# ----------------------------------------------------------------------------- compile


def test_compile_failure_is_recorded_and_undone(monkeypatch):
    model = adapter_model()
    qformer = compat.unwrap(model).qformer

    def broken(*args, **kwargs):
        raise RuntimeError("backend exploded\nlong traceback")

    monkeypatch.setattr(compat, "torch_compile_unavailable_reason", lambda device_type: None)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="backend exploded"):
        target, choice = step_options.maybe_compile(qformer, True)
    assert target is qformer and choice.used == "eager" and "backend exploded" in choice.reason
    assert "forward" not in vars(qformer), "the failed compile left the module's forward replaced"


def test_compile_unavailable_is_recorded(monkeypatch):
    monkeypatch.setattr(compat, "torch_compile_unavailable_reason", lambda device_type: "no compiler")
    with pytest.warns(UserWarning, match="no compiler"):
        fn, choice = step_options.maybe_compile(math.sqrt, True)
    assert fn is math.sqrt and choice.reason == "no compiler"
    assert step_options.maybe_compile(math.sqrt, False) == (math.sqrt, step_options.Choice("compile", False, "eager"))


@pytest.mark.long
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_qformer_matches_eager_over_five_steps(backend):
    """The Q-Former (with its LoRA layers) compiled in place, trained for five steps.

    aot_eager captures the forward and backward graphs (dynamo + AOTAutograd) without code
    generation: about 15 s here. inductor also generates and builds C++ kernels with g++:
    about 90 s on this shared 2-core CPU with an empty inductor cache, about 35 s once
    inductor's on-disk cache (/tmp/torchinductor_$USER) holds them.
    """
    reason = compat.torch_compile_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    model = adapter_model()
    batches = [synthetic.random_batch(model, batch_size=2, seed=s) for s in range(2)]
    eager = copy.deepcopy(model)
    reference = loss_curve(eager, batches, torch.optim.AdamW(lora.adapter_parameters(eager), lr=1e-2))
    qformer = compat.unwrap(model).qformer
    params = lora.adapter_parameters(model)

    def probe(_compiled):  # one forward and backward compiles both graphs; its gradients are dropped
        forward.custom_forward(model, batches[0]).loss.backward()
        for p in params:
            p.grad = None

    _, choice = step_options.maybe_compile(qformer, True, probe=probe, backend=backend)
    assert choice.used == "compiled", choice
    assert "forward" in vars(qformer), "the Q-Former was not compiled in place"
    observed = loss_curve(model, batches, torch.optim.AdamW(params, lr=1e-2))
    assert_curves_close(observed, reference, COMPILE_RTOL, f"compiled Q-Former ({backend}) vs eager")
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in eager.named_parameters()}, "compiling changed the parameter names"


def test_autocast_state_names_the_mode_the_features_are_computed_in():
    assert compat.autocast_state("cpu") == "no-autocast"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compat.autocast_state("cpu") == "autocast-torch.bfloat16"
    assert compat.autocast_state("cpu") == "no-autocast"


@pytest.mark.parametrize("family, preset", [("instructblip", T5), ("blip2", OPT)])
def test_static_shapes_change_the_shape_not_the_loss(family, preset):
    # what training/train.py collates with when compiling: one shape per text in every batch
    config = run_config.TrainConfig()
    model = adapter_model(preset)
    base = compat.unwrap(model)
    decoder_only = base.config.use_decoder_only_language_model
    processor = data.build_processor(family, image_size=base.config.vision_config.image_size)
    dataset = data.ManifestDataset(data.read_manifest(config.train_manifest))
    examples = [dataset[i] for i in range(4)]

    def collate(static: bool) -> dict:
        return inputs.Collator(
            processor,
            family,
            decoder_only=decoder_only,
            max_prompt_tokens=config.max_prompt_tokens,
            max_answer_tokens=config.max_answer_tokens,
            static_shapes=static,
        )(examples)

    dynamic, static = collate(False), collate(True)
    prompt, answer = config.max_prompt_tokens, config.max_answer_tokens
    widths = (
        {"input_ids": prompt + answer, "labels": prompt + answer}
        if decoder_only
        else {"input_ids": prompt, "labels": answer}
    )
    masks = {"input_ids": "attention_mask"}
    if family == "instructblip":
        widths["qformer_input_ids"], masks["qformer_input_ids"] = prompt, "qformer_attention_mask"
    pads = {
        "input_ids": processor.tokenizer.pad_token_id,
        "labels": -100,
        "qformer_input_ids": getattr(processor, "qformer_tokenizer", processor.tokenizer).pad_token_id,
    }
    for key, width in widths.items():
        n = dynamic[key].shape[1]
        assert static[key].shape[1] == width > n, (key, static[key].shape, n)
        assert torch.equal(static[key][:, :n], dynamic[key]), key
        assert (static[key][:, n:] == pads[key]).all(), f"{key}: the extra positions are padding"
        if key in masks:
            assert torch.equal(static[masks[key]][:, :n], dynamic[masks[key]])
            assert not static[masks[key]][:, n:].any(), f"{masks[key]}: the extra positions are masked"
    with torch.no_grad():
        losses = [forward.custom_forward(model, batch).loss for batch in (dynamic, static)]
    # masked positions get exp(min - max) = 0 exactly in fp32 softmax; only summation order may differ
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("option", ["compile_qformer", "compile_frozen"])
def test_training_compiles_with_static_shapes(monkeypatch, tmp_path, option):
    calls, collators = [], []
    real_for_model = inputs.Collator.for_model

    def fake_compile(target, enabled, **kwargs):  # records the call, runs eager
        calls.append(kwargs)
        return target, step_options.Choice("compile", enabled, "eager", "recorded by the test")

    def fake_compile_frozen(model, enabled, **kwargs):
        return fake_compile(model, enabled, **kwargs)[1]

    monkeypatch.setattr(step_options, "maybe_compile", fake_compile)
    monkeypatch.setattr(step_options, "compile_frozen_blocks", fake_compile_frozen)
    monkeypatch.setattr(inputs.Collator, "for_model", lambda *a, **k: collators.append(k) or real_for_model(*a, **k))
    train.train(run_config.TrainConfig(output_dir=str(tmp_path), epochs=1, progress=False, **{option: True}))
    assert len(calls) == 1 and calls[0]["dynamic"] is False and callable(calls[0]["probe"]), calls
    assert [k["static_shapes"] for k in collators] == [True]


# ----------------------------------------------------------------------------- compiled frozen blocks


@pytest.mark.parametrize("preset", [T5, OPT])
def test_frozen_blocks_are_the_towers_repeated_layers(preset):
    model = adapter_model(preset)
    base = compat.unwrap(model)
    config = base.config
    blocks = step_options.frozen_blocks(model)
    lm_layers = (
        (config.text_config.num_layers + config.text_config.num_decoder_layers)
        if preset == T5
        else config.text_config.num_hidden_layers
    )
    assert len(blocks) == config.vision_config.num_hidden_layers + lm_layers
    assert len({id(b) for b in blocks}) == len(blocks)
    assert {type(b).__name__ for b in blocks} == (
        {"InstructBlipEncoderLayer", "T5Block"} if preset == T5 else {"Blip2EncoderLayer", "OPTDecoderLayer"}
    )
    inside = {id(m) for b in blocks for m in b.modules() if m is not b}
    assert not inside & {id(b) for b in blocks}, "a block inside another block"
    assert not any(p.requires_grad for b in blocks for p in b.parameters()), "a trainable block is not frozen"


@pytest.mark.long
@pytest.mark.parametrize(
    "preset, backend, lm_checkpointing",
    [
        (T5, "aot_eager", False),
        (OPT, "aot_eager", False),
        (T5, "inductor", False),
        (T5, "aot_eager", True),
        (OPT, "aot_eager", True),
    ],
)
def test_compiled_frozen_blocks_match_eager_over_five_steps(preset, backend, lm_checkpointing):
    """Every frozen vision and LM block compiled in place, five training steps, against eager
    without checkpointing; with LM checkpointing too (every step option at once on the GPU).

    aot_eager: 2-5 s per preset here; inductor: 25-60 s (warm or empty inductor cache).
    """
    reason = compat.torch_compile_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"torch.compile cannot run here: {reason}")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()  # count this test's graphs only (reset() keeps the counters)
    model = adapter_model(preset)
    batches = [synthetic.random_batch(model, batch_size=2, seed=s) for s in range(2)]
    eager = copy.deepcopy(model)
    reference = loss_curve(eager, batches, torch.optim.AdamW(lora.adapter_parameters(eager), lr=1e-2))
    params = lora.adapter_parameters(model)

    def probe(_compiled):
        forward.custom_forward(model, batches[0]).loss.backward()
        for p in params:
            p.grad = None

    if lm_checkpointing:
        step_options.set_lm_checkpointing(model, True)
    choice = step_options.compile_frozen_blocks(model, True, probe=probe, backend=backend, dynamic=False)
    assert choice == step_options.Choice("compile_frozen", True, "compiled"), choice
    blocks = step_options.frozen_blocks(model)
    assert all("forward" in vars(b) for b in blocks), "a block was not compiled in place"
    observed = loss_curve(model, batches, torch.optim.AdamW(params, lr=1e-2))
    assert_curves_close(observed, reference, COMPILE_RTOL, f"compiled frozen blocks ({preset}, {backend}) vs eager")
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in eager.named_parameters()}
    # identical blocks share compiled code: a handful of graphs, not one per block. Reentrant
    # checkpointing (transformers < 4.35) runs each LM block twice, without grad and then
    # recomputed with it: two graphs per kind of block (4.33.3, tiny T5: 9 graphs for 6 blocks)
    variants = 2 if lm_checkpointing and compat.TRANSFORMERS < compat.CHECKPOINTING_KWARGS else 1
    assert 0 < counters["stats"]["unique_graphs"] < variants * len(blocks), dict(counters["stats"])
    # a break inside a checkpointed block runs that block eager (T5's position bias did, until
    # compat.checkpointing_switches)
    assert not counters["graph_break"], dict(counters["graph_break"])
    if lm_checkpointing:  # and it still checkpoints inside the compiled blocks
        checkpointed = saved_tensor_count(model, batches[0])
        step_options.set_lm_checkpointing(model, False)
        assert checkpointed < saved_tensor_count(model, batches[0]), "no fewer tensors kept for backward"


def test_compile_frozen_failure_is_recorded_and_undone(monkeypatch):
    model = adapter_model()
    blocks = step_options.frozen_blocks(model)

    def broken(fn, **kwargs):
        return lambda *a, **k: (_ for _ in ()).throw(RuntimeError("inductor fell over"))

    monkeypatch.setattr(compat, "torch_compile_unavailable_reason", lambda device_type: None)
    monkeypatch.setattr(torch, "compile", broken)
    batch = synthetic.random_batch(model, batch_size=2, seed=0)
    with pytest.warns(UserWarning, match="inductor fell over"):
        choice = step_options.compile_frozen_blocks(model, True, probe=lambda _: forward.custom_forward(model, batch))
    assert choice.used == "eager" and "inductor fell over" in choice.reason
    assert not any("forward" in vars(b) for b in blocks), "the failed compile left a block's forward replaced"
    assert step_options.compile_frozen_blocks(model, False) == step_options.Choice("compile_frozen", False, "eager")


# ----------------------------------------------------------------------------- an all-zero gradient


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))


def _batch(c: float) -> dict:
    labels = torch.tensor([[7, -100]])  # one answer token
    return {"pixel_values": torch.zeros(1, 3, 2, 2), "input_ids": torch.zeros(1, 2, dtype=torch.long),
            "labels": labels, "c": c}  # fmt: skip


def test_a_step_whose_adapter_gradient_is_all_zero_raises_naming_the_step():
    """loss = w * c: c = 0 gives a finite loss and an exactly zero gradient; c = 1 the gradient 1 (the step runs)."""
    model = _Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parts = training_step_module.make_step(model, optimizer, scheduler, precision_name="fp32", device="cpu",
                           run_forward=lambda b: types.SimpleNamespace(loss=model.w * b["c"]))  # fmt: skip
    assert training_step_module.training_step(parts, [_batch(1.0)], index=4).action == "step"
    with pytest.raises(numerics.ZeroGradientError, match=r"^zero gradient at optimizer step 5: every trainable "
                       r"adapter parameter \(1 tensors\) got exactly zero gradient .*a quantized language-model "
                       r"kernel without a backward.*labels"):  # fmt: skip
        training_step_module.training_step(parts, [_batch(0.0)], index=5)
    assert float(model.w.detach()) == pytest.approx(0.9)  # the zero step did not step


def test_a_deferred_step_with_an_all_zero_gradient_raises_at_the_read():
    """read_steps: step 3 with norm 0.5 reads as a step, step 4 with norm 0.0 raises naming 4 and the read."""
    model = torch.nn.Linear(2, 2)
    guard = numerics.Guard("raise", model, torch.optim.SGD(model.parameters(), lr=0.1))
    parts = types.SimpleNamespace(model=model, guard=guard, params=list(model.parameters()))
    finite = training_step_module.PendingStep(3, 4, 0.1, torch.tensor([1, 10, 0.5, 1.25], dtype=torch.float64))
    assert [r.action for r in training_step_module.read_steps(parts, [finite])] == ["step"]
    zero = training_step_module.PendingStep(4, 4, 0.1, torch.tensor([1, 10, 0.0, 1.25], dtype=torch.float64))
    with pytest.raises(numerics.ZeroGradientError, match=r"^zero gradient at optimizer step 4: .*\(2 tensors\).*"
                       r"\(found by the deferred host read after optimizer step 4\)"):  # fmt: skip
        training_step_module.read_steps(parts, [finite, zero])
