"""Adapters that can never train (issue 20, item 3): named by structure, found by a probe backward,
reported by verify, left out with exclude_untrainable; the seed's counts stay as published."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from qformer_lora import cli, cli_options, compat, lora, presets, untrained
from qformer_lora.training import run_config, run_dir, train

from ..conftest import TINY_PRESETS, check_against_release

R8 = lora.LoraSpec(r=8, alpha=16)
LAST_TEXT_FFN_XL = ["qformer.encoder.layer.11.intermediate.dense", "qformer.encoder.layer.11.output.dense"]


def fresh(name: str, **config_changes):
    """A tiny preset built afresh (apply_lora wraps it in place, so the shared tiny_model is not used)."""
    preset = presets.load_preset(name)
    if config_changes:
        preset = dataclasses.replace(preset, config=preset.config | config_changes)
    return presets.build_model(preset)


def text_ffn_parameters(config, r: int) -> int:
    """LoRA elements on one layer's intermediate.dense (hidden -> intermediate) and output.dense
    (intermediate -> hidden): A is r x in, B is out x r, so r * (h + i) each, 2r(h + i) together."""
    return 2 * r * (config.qformer_config.hidden_size + config.qformer_config.intermediate_size)


# ----------------------------------------------------------------------------- full size, meta device


@pytest.mark.parametrize("name", ["instructblip-flan-t5-xl", "instructblip-vicuna-7b"])
def test_full_size_instructblip_last_layer_text_ffn_is_61440_of_2420736(name):
    # hidden 768, intermediate 3072, r=8: intermediate.dense A 768*8 + B 8*3072, output.dense
    # A 3072*8 + B 8*768 -> 2*(8*(768+3072)) = 61,440, of the seed's 2,420,736 (2.54 %)
    report = untrained.untrainable_report(lora.apply_lora(presets.build_model(name, device="meta"), R8))
    assert [row["module"] for row in report["adapters"]] == LAST_TEXT_FFN_XL
    assert [row["parameters"] for row in report["adapters"]] == [30_720, 30_720]  # 8*(768+3072) each
    assert {row["reason"] for row in report["adapters"]} == {untrained.LAST_LAYER_REASON}
    assert (report["count"], report["parameters"], report["trainable_parameters"]) == (2, 61_440, 2_420_736)
    assert report["share_of_trainable"] == 61_440 / 2_420_736
    assert report["probe"].startswith("not run: the model is on the meta device")


@pytest.mark.parametrize("name", ["blip2-flan-t5-xl", "blip2-opt-2.7b"])
def test_full_size_blip2_builds_no_text_branch_so_nothing_is_structurally_dead(name):
    # no text enters BLIP-2's Q-Former; transformers builds its text-branch FFN only with
    # use_qformer_text_input (default False; 4.33 never), so there is nothing to report by structure
    model = presets.build_model(name, device="meta")
    assert not hasattr(model.qformer.encoder.layer[0], "intermediate")
    report = untrained.untrainable_report(lora.apply_lora(model, R8))
    assert (report["count"], report["parameters"], report["trainable_parameters"]) == (0, 0, 8 * 210_432)


def test_exclusion_drops_exactly_the_reported_adapters_at_full_size():
    # 2,420,736 - 61,440 = 2,359,296 trainable; 240 - 4 = 236 LoRA tensors (A and B of two layers)
    base = presets.build_model("instructblip-flan-t5-xl", device="meta")
    excluded = lora.apply_lora(base, dataclasses.replace(R8, exclude_untrainable=True))
    report = lora.scope_report(excluded, R8)
    assert (report["trainable_parameters"], report["lora_tensors"]) == (2_359_296, 236)
    assert all(name not in untrained.lora_adapters(excluded) for name in LAST_TEXT_FFN_XL)
    assert untrained.untrainable_report(excluded)["count"] == 0


def test_the_seed_counts_stay_by_default():
    assert lora.LoraSpec().exclude_untrainable is False
    assert run_config.TrainConfig().exclude_untrainable is False
    report = lora.scope_report(lora.apply_lora(presets.build_model("instructblip-flan-t5-xl", device="meta"), R8), R8)
    assert (report["trainable_parameters"], report["lora_tensors"]) == (2_420_736, 240)


# ----------------------------------------------------------------------------- tiny presets, probe run


@pytest.mark.parametrize("name", ["tiny-instructblip-flan-t5", "tiny-instructblip-vicuna"])
def test_tiny_instructblip_the_probe_confirms_the_structure_and_finds_nothing_else(name):
    model = lora.apply_lora(fresh(name), lora.LoraSpec(r=2))
    last = len(model.base_model.model.qformer.encoder.layer) - 1
    report = untrained.untrainable_report(model)
    assert report["probe"] == "run" and report["structure_unconfirmed"] == []
    assert [row["module"] for row in report["adapters"]] == [
        f"qformer.encoder.layer.{last}.intermediate.dense",
        f"qformer.encoder.layer.{last}.output.dense",
    ]
    assert report["parameters"] == text_ffn_parameters(compat.unwrap(model).config, r=2)


@pytest.mark.parametrize("name", ["tiny-blip2-flan-t5", "tiny-blip2-opt"])
def test_tiny_blip2_zero_query_tokens_silence_the_probe_found_adapters(name):
    # Built from a config, the frozen query tokens are 0; the Q-Former's input LayerNorm (bias 0)
    # keeps them 0, so in layer 0 every input of query, key and value is 0 (their LoRA input
    # x = 0), the values and so attention.output.dense's input are 0, its LayerNorm gives 0 again,
    # so cross-attention's query is 0 and all its scores equal: the key gets no gradient (the value
    # sees the image, it lives): all exact zeros, products with 0. Every query position then carries
    # the same vector, so layer 1's self-attention scores are equal too, and its query and key are
    # silent in exact arithmetic; in floating point only where the identical rows round alike (they
    # do here, 4 queries; at full size, 32 queries, a residue 1e-7 of the others' gradient is left).
    model = lora.apply_lora(fresh(name), lora.LoraSpec(r=2))
    assert bool((compat.unwrap(model).query_tokens == 0).all())
    report = untrained.untrainable_report(model)
    found = [row["module"] for row in report["adapters"]]
    assert found[:6] == [
        "qformer.encoder.layer.0.attention.attention.query",
        "qformer.encoder.layer.0.attention.attention.key",
        "qformer.encoder.layer.0.attention.attention.value",
        "qformer.encoder.layer.0.attention.output.dense",
        "qformer.encoder.layer.0.crossattention.attention.query",
        "qformer.encoder.layer.0.crossattention.attention.key",
    ]
    assert set(found[6:]) <= {
        "qformer.encoder.layer.1.attention.attention.query",
        "qformer.encoder.layer.1.attention.attention.key",
    }
    assert {row["reason"] for row in report["adapters"]} == {untrained.PROBE_REASON}
    hidden = compat.unwrap(model).config.qformer_config.hidden_size
    assert report["parameters"] == len(found) * 2 * (2 * hidden)  # square hidden x hidden layers, r=2


def test_nonzero_query_tokens_bring_blip2_adapters_back_to_life():
    # the probe's finds on BLIP-2 come from the zero query tokens, not from the architecture
    model = fresh("tiny-blip2-opt")
    with torch.no_grad():
        model.query_tokens.normal_(generator=torch.Generator().manual_seed(0))
    assert untrained.probe_untrainable(lora.apply_lora(model, lora.LoraSpec(r=2))) == []


def test_an_adapter_fed_only_by_another_adapter_counts_as_live():
    # With layer 0's frozen value projection zeroed, the attention output's input is the value
    # adapter's output alone: B A x, 0 while lora_B is 0 at init, so attention.output.dense gets
    # no gradient yet. It will once the value adapter trains; the probe's perturbed lora_B sees that.
    model = fresh("tiny-blip2-opt")
    with torch.no_grad():
        model.query_tokens.normal_(generator=torch.Generator().manual_seed(0))
        value = model.qformer.encoder.layer[0].attention.attention.value
        value.weight.zero_()
        value.bias.zero_()
    peft_model = lora.apply_lora(model, lora.LoraSpec(r=2))
    output_dense = "qformer.encoder.layer.0.attention.output.dense"
    loss = untrained.forward.custom_forward(peft_model, untrained.probe_batch(peft_model)).loss
    at_init = torch.autograd.grad(loss, list(untrained.lora_adapters(peft_model)[output_dense].values()))
    assert all(not g.any() for g in at_init)  # silent at init ...
    assert untrained.probe_untrainable(peft_model) == []  # ... but not untrainable


def test_blip2_with_a_text_branch_has_every_layers_text_ffn_dead():
    # use_qformer_text_input builds the text branch (transformers >= 4.45), which BLIP-2's forward
    # never calls: the structural rule names every layer's, and the probe agrees
    preset = presets.load_preset("tiny-blip2-opt")
    qformer_config = preset.config.get("qformer_config", {}) | {"use_qformer_text_input": True}
    model = fresh("tiny-blip2-opt", qformer_config=qformer_config)
    with torch.no_grad():
        model.query_tokens.normal_(generator=torch.Generator().manual_seed(0))  # only the structure is dead
    layers = model.qformer.encoder.layer
    built = [
        f"qformer.encoder.layer.{i}.{leaf}"
        for i, layer in enumerate(layers)
        for leaf in untrained.TEXT_FFN
        if hasattr(layer, leaf.split(".")[0])  # 4.33 never builds it: then nothing may be named
    ]
    report = untrained.untrainable_report(lora.apply_lora(model, lora.LoraSpec(r=2)))
    assert [row["module"] for row in report["adapters"]] == built
    assert {row["reason"] for row in report["adapters"]} <= {untrained.NO_TEXT_REASON}
    assert report["structure_unconfirmed"] == []


def test_the_probe_sees_through_zero_lora_b_and_leaves_the_model_as_it_was():
    # at init every lora_B is 0, so lora_A's gradient (scaling * B^T g x^T) is 0 everywhere: a
    # probe reading lora_A at init would call all 20 adapters dead; lora_B's and the perturbed
    # point's say which are live
    model = lora.apply_lora(fresh("tiny-instructblip-flan-t5"), lora.LoraSpec(r=2))
    params = dict(model.named_parameters())
    loss = untrained.forward.custom_forward(model, untrained.probe_batch(model)).loss
    a_names = [n for n in params if "lora_A" in n]
    a_grads = torch.autograd.grad(loss, [params[n] for n in a_names], allow_unused=True)
    assert all(g is None or not g.any() for g in a_grads)
    before = {n: p.detach().clone() for n, p in params.items() if "lora_" in n}
    model.train()
    dead = untrained.probe_untrainable(model)
    assert len(dead) == 2 < len(untrained.lora_adapters(model)) == 20
    assert model.training and all(p.grad is None for p in params.values())
    assert all(torch.equal(before[n], params[n]) for n in before)


def test_the_probe_refuses_the_meta_device():
    model = lora.apply_lora(presets.build_model("tiny-blip2-opt", device="meta"), lora.LoraSpec(r=2))
    with pytest.raises(untrained.ProbeError, match="meta device"):
        untrained.probe_untrainable(model)


# ----------------------------------------------------------------------------- exclusion


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_exclusion_drops_the_reported_amount_and_every_remaining_adapter_trains(name):
    spec = lora.LoraSpec(r=2)
    full = untrained.untrainable_report(lora.apply_lora(fresh(name), spec))
    assert full["count"] > 0
    excluded = lora.apply_lora(fresh(name), dataclasses.replace(spec, exclude_untrainable=True))
    trainable = sum(p.numel() for p in excluded.parameters() if p.requires_grad)
    assert trainable == full["trainable_parameters"] - full["parameters"]
    assert untrained.probe_untrainable(excluded) == []
    assert set(untrained.lora_adapters(excluded)).isdisjoint(row["module"] for row in full["adapters"])


def test_exclusion_keeps_the_lora_init_of_the_remaining_adapters():
    # the probe's own LoRA wrap draws on a forked RNG: each kept adapter's lora_A is what a wrap of
    # the kept targets alone draws after the same seed
    spec = dataclasses.replace(lora.LoraSpec(r=2), exclude_untrainable=True)
    torch.manual_seed(3)
    excluded = lora.apply_lora(fresh("tiny-instructblip-flan-t5"), spec)
    kept = list(untrained.lora_adapters(excluded))
    torch.manual_seed(3)
    plain = lora._wrap(fresh("tiny-instructblip-flan-t5"), spec, kept)
    a = {n: p for n, p in excluded.named_parameters() if "lora_" in n}
    b = {n: p for n, p in plain.named_parameters() if "lora_" in n}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_train_and_verify_take_the_option():
    args = cli.build_parser().parse_args(["verify", "--exclude-untrainable", "true"])
    assert cli_options.lora_spec(args).exclude_untrainable is True
    train_args = cli.build_parser().parse_args(["train", "--exclude-untrainable", "true"])
    assert train_args.exclude_untrainable is True
    config = run_config.TrainConfig(preset="tiny-instructblip-flan-t5", base_checkpoint=None, exclude_untrainable=True)
    model, spec = train.build_adapter_model(config)
    assert spec.exclude_untrainable and untrained.untrainable_report(model)["count"] == 0
    assert "exclude_untrainable" in run_dir.RESUME_KEEPS  # another adapter shape cannot resume


def test_verify_reports_the_adapters_in_text_and_json(capsys):
    assert cli.main(["verify", "--lora-r", "8"]) == 0
    text = capsys.readouterr().out
    assert "adapters that can never train: 2 (61,440 of 2,420,736 trainable parameters, 2.54 %)" in text
    assert all(name in text for name in LAST_TEXT_FFN_XL)
    assert cli.main(["verify", "--preset", "tiny-blip2-opt", "--probe", "true", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["untrainable"]
    assert report["probe"] == "run" and report["count"] == len(report["adapters"]) > 0
    # Depends on the CPU, so pinned per torch ATen CPU capability (and per release): which adapters the probe
    # calls dead follows the float rounding (untrained.py: "exactly zero" is conservative). Layer 1's
    # self-attention query and key of BLIP-2's Q-Former get a gradient that is zero in exact arithmetic (its
    # query rows are identical): exactly 0.0 under torch's AVX2 kernels (8 adapters), a 1e-7 residue under
    # AVX512 (6). ATEN_CPU_CAPABILITY=avx2 selects the AVX2 kernels on an AVX512 machine.
    capability = compat.cpu_features()["capability"]
    modules = [a["module"] for a in report["adapters"]]
    check_against_release("untrainable_probe", f"tiny-blip2-opt, verify --probe true, cpu {capability}", modules)
