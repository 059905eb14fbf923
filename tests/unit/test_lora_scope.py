"""LoRA stays inside the Q-Former, with the seed's exact counts (seed issue 2)."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import IA3Config, LoraConfig, get_peft_model

from qformer_lora import compat, lora, presets
from qformer_lora.repro import expectations

from ..conftest import FULL_PRESETS, check_against_release, tiny_model

COUNTS = expectations.load("lora_counts")["presets"]


@functools.cache
def full_size_base(name: str):
    """A full-size model on the meta device (no memory), reused: LoRA is unloaded after each use."""
    return presets.build_model(name, device="meta")


def report_for(name: str, spec: lora.LoraSpec) -> dict:
    peft_model = lora.apply_lora(full_size_base(name), spec)
    try:
        return lora.scope_report(peft_model, spec)
    finally:
        compat.unload(peft_model)  # restores the plain modules in the cached base model


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_full_size_counts_match_pinned_values(name):
    expected = COUNTS[name]
    preset = presets.load_preset(name)
    regime = compat.parameter_count_regime(preset.text_model_type)
    base = expected["base_parameters"][regime]
    report = report_for(name, lora.LoraSpec(r=8, alpha=16))
    assert report["lora_tensors"] == expected["lora_tensors"]
    assert report["trainable_parameters"] == 8 * expected["trainable_per_rank"]
    assert report["total_parameters"] == base + report["trainable_parameters"], (
        f"{name}: total {report['total_parameters']:,} vs pinned base {base:,} ({regime}) "
        f"+ adapter {report['trainable_parameters']:,}: off by "
        f"{report['total_parameters'] - base - report['trainable_parameters']:,}"
    )
    trainable_by_component = {c: v["trainable"] for c, v in report["components"].items()}
    assert trainable_by_component == {
        "vision_model": 0,
        "qformer": report["trainable_parameters"],
        "query_tokens": 0,
        "language_projection": 0,
        "language_model": 0,
    }
    assert report["bare_name_matches_outside_qformer"] == []


def test_seed_figures_for_instructblip_flan_t5_xl():
    """240 tensors, 2,420,736 at r=8, 1,210,368 at r=4, 0.0601 % of the published model."""
    seed = COUNTS["instructblip-flan-t5-xl"]["seed_figures"]
    r8 = report_for("instructblip-flan-t5-xl", lora.LoraSpec(r=8, alpha=16))
    r4 = report_for("instructblip-flan-t5-xl", lora.LoraSpec(r=4, alpha=8))
    assert (r8["lora_tensors"], r4["lora_tensors"]) == (240, 240)
    assert r8["trainable_parameters"] == seed["r8_trainable"] == 2_420_736
    assert r4["trainable_parameters"] == seed["r4_trainable"] == 1_210_368
    # The seed's share is of the published architecture (lm_head separate). transformers >= 5
    # ties FlanT5's lm_head (see compat.parameter_count_regime), so the share is taken against
    # the pinned 'standard' total there; the installed total is pinned in the test above.
    published_total = COUNTS["instructblip-flan-t5-xl"]["base_parameters"]["standard"] + r8["trainable_parameters"]
    assert round(100 * r8["trainable_parameters"] / published_total, 4) == seed["r8_percent"] == 0.0601
    installed_percent = round(r8["trainable_percent"], 4)
    expected_percent = {"standard": 0.0601, "t5-lm-head-tied": 0.0611}[compat.parameter_count_regime("t5")]
    assert installed_percent == expected_percent


@settings(max_examples=12)
@given(r=st.integers(min_value=1, max_value=64))
def test_trainable_count_is_linear_in_rank_and_stays_in_qformer(r):
    name = "instructblip-flan-t5-xl"
    report = report_for(name, lora.LoraSpec(r=r, alpha=2 * r))
    assert report["trainable_parameters"] == r * COUNTS[name]["trainable_per_rank"]
    outside = {c: v["lora_tensors"] for c, v in report["components"].items() if c != "qformer" and v["lora_tensors"]}
    assert outside == {}, f"LoRA tensors outside the Q-Former at r={r}: {outside}"


@pytest.mark.parametrize("name", FULL_PRESETS)
def test_broad_scope_adds_the_language_model_layers(name):
    expected = COUNTS[name]["broad_scope_r8"]
    report = report_for(name, lora.LoraSpec(r=8, scope="qformer+llm"))
    assert report["lora_tensors"] == expected["lora_tensors"]
    assert report["trainable_parameters"] == expected["trainable"]
    assert report["components"]["language_model"]["trainable"] > 0
    assert report["components"]["vision_model"]["trainable"] == 0


def test_unknown_target_name_is_refused_naming_it():
    model = tiny_model("tiny-instructblip-flan-t5")
    with pytest.raises(lora.ScopeError, match=r"\['qury'\].*query"):
        lora.resolve_target_modules(model, lora.LoraSpec(targets=("qury", "key")))


def test_targets_never_resolve_outside_the_qformer(tiny_preset):
    model = tiny_model(tiny_preset)
    names = lora.resolve_target_modules(model, lora.LoraSpec())
    assert names and all(n.startswith("qformer.") for n in names)


def test_trainable_parameter_outside_scope_is_refused_by_name():
    model = presets.build_model("tiny-instructblip-flan-t5")
    peft_model = lora.apply_lora(model, lora.LoraSpec(r=2, alpha=4))
    lora.check_trainable_scope(peft_model, "qformer")  # clean: no error
    leaked = "base_model.model.language_projection.weight"
    dict(peft_model.named_parameters())[leaked].requires_grad_(True)
    with pytest.raises(
        lora.ScopeError,
        match=r"1 trainable parameter\(s\) outside scope 'qformer'.*"
        r"language_projection\.weight",
    ):
        lora.check_trainable_scope(peft_model, "qformer")
    # the broad scope does not allow the projection either
    with pytest.raises(lora.ScopeError, match="language_projection"):
        lora.check_trainable_scope(peft_model, "qformer+llm")


def test_adapter_dtype_on_a_half_precision_base_is_reported():
    model = presets.build_model("tiny-blip2-opt", dtype=torch.float16)
    spec = lora.LoraSpec(r=2, alpha=4)
    report = lora.scope_report(lora.apply_lora(model, spec), spec)
    assert len(report["adapter_dtypes"]) == 1
    check_against_release("adapter_dtype", "fp16_base_default", report["adapter_dtypes"][0])


# ----------------------------------------------------------------------------- adapters trained elsewhere


def plain_peft_model(config):
    """A fresh tiny BLIP-2 OPT wrapped by plain PEFT (not lora.apply_lora). Its layer names: the Q-Former's
    query / key / value / dense, OPT's q_proj / k_proj / v_proj / out_proj / fc1 / fc2 / final_layer_norm,
    the vision encoder's qkv, and language_projection: each bare name lies in one component only."""
    return get_peft_model(presets.build_model("tiny-blip2-opt"), config)


def test_adapter_spec_reads_the_adapters_lora_config_and_names_the_narrowest_scope():
    """lora.adapter_spec on plain PEFT adapters; each expected spec is read off the LoraConfig built here.

    alpha 12 is not the default 2 x r = 8 and dropout 0.05 not the default 0.0, so a spec that fell back
    to a default shows. Scope: the first of SCOPES ("qformer", then "qformer+llm") holding every component
    with a LoRA layer or a modules_to_save module; an adapter in the Q-Former alone is "qformer" (its
    components are exactly that scope's set), one reaching OPT too is "qformer+llm" (exactly that set)."""
    qformer = lora.LoraSpec(r=4, alpha=12, dropout=0.05, targets=("query", "value"), scope="qformer")
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=0.05, target_modules=["query", "value"])
    model = plain_peft_model(config)
    assert lora.adapter_spec(model) == qformer, "the Q-Former-only adapter read back wrong (scope must be 'qformer')"
    # peft's PeftConfig annotates peft_type as str or PeftType: the plain string reads the same
    model.peft_config["default"].peft_type = "LORA"
    assert lora.adapter_spec(model) == qformer, "peft_type given as the string 'LORA' must be read as LoRA"

    broad = plain_peft_model(LoraConfig(r=2, lora_alpha=3, lora_dropout=0.1, target_modules=["query", "q_proj"]))
    expected = lora.LoraSpec(r=2, alpha=3, dropout=0.1, targets=("q_proj", "query"), scope="qformer+llm")
    assert lora.adapter_spec(broad) == expected, (
        "the adapter in the Q-Former and OPT read back wrong (scope 'qformer+llm')"
    )

    # a fully trained LM module (modules_to_save) moves the scope although every LoRA layer is in the Q-Former;
    # it is no LoRA layer, so the targets stay the LoRA layers' names
    saved = plain_peft_model(LoraConfig(r=4, target_modules=["query"], modules_to_save=["final_layer_norm"]))
    expected = lora.LoraSpec(r=4, alpha=8, targets=("query",), scope="qformer+llm")
    assert lora.adapter_spec(saved) == expected, "a modules_to_save module in the LM must widen the scope"


def test_adapter_spec_refuses_other_adapters_and_components_outside_every_scope():
    """A non-LoRA adapter (IA3) is refused by type; LoRA on the vision encoder's qkv plus a fully trained
    language_projection lies outside both SCOPES, and the message names both components (sorted, ", ")
    and every known scope as "name: component + component", "; " between scopes (lora.SCOPES)."""
    ia3 = plain_peft_model(IA3Config(target_modules=["query", "value"], feedforward_modules=[]))
    # the type's name, not the enum's repr (Python 3.11 formats the enum as "PeftType.IA3", 3.10 as "IA3")
    with pytest.raises(lora.ScopeError, match=r"^adapter 'default' is a IA3 adapter; only LoRA "
                                              r"adapters are read here$"):  # fmt: skip
        lora.adapter_spec(ia3)
    outside = plain_peft_model(
        LoraConfig(r=2, target_modules=["query", "qkv"], modules_to_save=["language_projection"])
    )
    with pytest.raises(lora.ScopeError) as refused:
        lora.adapter_spec(outside)
    assert str(refused.value) == (
        "adapter 'default' has LoRA layers or trained modules in language_projection, vision_model, outside every "
        "scope this project knows (qformer: qformer; qformer+llm: qformer + language_model)"
    ), "the refusal must name the components outside every scope and the scopes there are"


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.query = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.query(x)


def test_unload_gives_back_the_plain_model_without_peft_config():
    """compat.unload removes the LoRA layers (not merged: the base weight is untouched) and no peft_config is
    left on the model: older peft releases leave it (compat removes it; the version matrix runs this test
    on them), newer ones remove it themselves (huggingface/peft#3067)."""
    layer = _Layer()
    weight = layer.query.weight.detach().clone()  # read before wrapping: peft < 0.7 has no base_layer
    model = get_peft_model(layer, LoraConfig(r=1, lora_alpha=2, target_modules=["query"]))
    base = compat.unload(model)
    assert type(base) is _Layer and type(base.query) is torch.nn.Linear, base
    assert "peft_config" not in vars(base), "PEFT's peft_config attribute was left on the unloaded model"
    assert torch.equal(base.query.weight, weight)


# ----------------------------------------------------------------------------- messages and options, by hand


def leaking_model(leaks: int) -> torch.nn.Module:
    """A Q-Former layer and ``leaks`` trainable language-model parameters named language_model.0, .1, ..."""
    model = torch.nn.Module()
    model.qformer = torch.nn.Linear(1, 1)
    model.language_model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1)) for _ in range(leaks)])
    return model


@pytest.mark.parametrize(("leaks", "suffix"), [(10, ""), (11, " (and 1 more)"), (12, " (and 2 more)")])
def test_a_scope_leak_names_the_first_ten_parameters_and_counts_the_rest(leaks, suffix):
    """Ten leaks are all named; eleven and twelve name the first ten and say "(and 1 more)", "(and 2 more)".
    Without a scope the check is the default one, "qformer"."""
    shown = ", ".join(f"language_model.{i}" for i in range(10))
    for scope in (("qformer",), ()):
        with pytest.raises(lora.ScopeError) as caught:
            lora.check_trainable_scope(leaking_model(leaks), *scope)
        assert str(caught.value) == (
            f"{leaks} trainable parameter(s) outside scope 'qformer' (allowed: qformer): {shown}{suffix}"
        ), str(caught.value)


def test_the_broad_scope_refuses_a_target_the_qformer_does_not_have():
    """scope qformer+llm maps Q-Former names to the language model's; a name in neither table is refused by
    name, as in the narrow scope, not dropped or failed on."""
    with pytest.raises(lora.ScopeError) as caught:
        lora.resolve_target_modules(
            tiny_model("tiny-blip2-opt"), lora.LoraSpec(scope="qformer+llm", targets=("query", "fc9"))
        )
    assert str(caught.value).startswith("LoRA target(s) ['fc9'] match no linear layer in the Q-Former;"), caught.value


def test_the_broad_scope_allows_the_language_model_and_names_both_components():
    model = leaking_model(1)
    lora.check_trainable_scope(model, "qformer+llm")  # the language model is inside this scope
    model.vision_model = torch.nn.Linear(1, 1)
    with pytest.raises(lora.ScopeError) as caught:
        lora.check_trainable_scope(model, "qformer+llm")
    assert str(caught.value) == (
        "2 trainable parameter(s) outside scope 'qformer+llm' (allowed: qformer, language_model): "
        "vision_model.weight, vision_model.bias"
    ), str(caught.value)


def test_lora_spec_refusals_name_the_value_and_what_is_allowed():
    with pytest.raises(lora.ScopeError) as caught:
        lora.LoraSpec(scope="everything")
    assert str(caught.value) == "unknown scope 'everything'; expected one of ['qformer', 'qformer+llm']"
    with pytest.raises(lora.ScopeError) as caught:
        lora.LoraSpec(r=0)
    assert str(caught.value) == "LoRA rank r must be >= 1, got 0"


def test_broad_scope_refuses_a_language_model_it_has_no_layer_names_for(tiny_preset):
    """The broad scope translates the generic names per language model type (t5, opt, llama); any other
    type is refused with the known ones listed, before anything is wrapped."""
    model = presets.build_model(tiny_preset)
    model.config.text_config.model_type = "gpt2"
    with pytest.raises(lora.ScopeError) as caught:
        lora.resolve_target_modules(model, lora.LoraSpec(scope="qformer+llm"))
    assert str(caught.value) == (
        "scope 'qformer+llm' does not know the layer names of language model type 'gpt2'; known: ['llama', 'opt', 't5']"
    ), str(caught.value)


def test_an_unknown_target_on_a_wrapped_model_lists_only_the_qformer_linear_layer_names(tiny_preset):
    """On a model LoRA already wraps, the layers inside an adapter (base_layer, lora_A/B.default) are not
    layers of their own: the names listed are the Q-Former's own four, as on the plain model."""
    model = lora.apply_lora(presets.build_model(tiny_preset), lora.LoraSpec(r=2))
    with pytest.raises(lora.ScopeError) as caught:
        lora.resolve_target_modules(model, lora.LoraSpec(targets=("nope",)))
    assert str(caught.value) == (
        "LoRA target(s) ['nope'] match no linear layer in the Q-Former; its linear layers are named "
        "['dense', 'key', 'query', 'value']"
    ), str(caught.value)


def test_the_spec_reaches_peft_config_as_given(tiny_preset):
    """r, alpha, dropout, bias "none" and the extra options (here init_lora_weights=False, in PEFT since 0.5)
    reach the LoraConfig."""
    spec = lora.LoraSpec(r=2, alpha=6, dropout=0.25, extra={"init_lora_weights": False})
    config = lora.apply_lora(presets.build_model(tiny_preset), spec).peft_config["default"]
    picked = (config.r, config.lora_alpha, config.lora_dropout, config.bias, config.init_lora_weights)
    assert picked == (2, 6, 0.25, "none", False), picked
