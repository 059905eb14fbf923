"""The scope report as `qformer-lora verify` prints it: the exact text for a report written by hand."""

from __future__ import annotations

import peft
import torch

from qformer_lora import lora

VERSIONS = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}
COMPONENTS = {
    "qformer": {"parameters": 1_234_567, "trainable": 10_560, "lora_tensors": 40},
    "language_model": {"parameters": 98_765, "trainable": 0, "lora_tensors": 0},
}


def report(**changes) -> dict:
    base = {
        "versions": VERSIONS,
        "preset": "tiny-instructblip-flan-t5",
        "lora": {"r": 8, "alpha": 16, "targets": ["query", "key"], "scope": "qformer"},
        "lora_tensors": 40,
        "trainable_parameters": 10_560,
        "total_parameters": 1_333_332,
        "trainable_percent": 100.0 * 10_560 / 1_333_332,
        "components": COMPONENTS,
        "adapter_dtypes": ["torch.float32"],
        "bare_name_matches_outside_qformer": [],
    }
    return base | changes


def test_a_preset_report():
    assert lora.format_scope_report(report()) == "\n".join(
        [
            "preset tiny-instructblip-flan-t5  (torch 2.13.0, transformers 5.24.0, peft 0.21.2)",
            "LoRA r=8 alpha=16 targets=query,key scope=qformer",
            "LoRA tensors:         40",
            "trainable parameters: 10,560 of 1,333,332 (0.7920 %)",  # 100 * 10,560 / 1,333,332 = 0.79200...
            "adapter dtype:        torch.float32",
            "",
            "component                   parameters     trainable  LoRA tensors",
            "qformer                      1,234,567        10,560            40",
            "language_model                  98,765             0             0",
            "",
            "bare target names would also match outside the Q-Former: 0 layer(s)",
        ]
    )


def test_a_base_checkpoint_report_with_exclusions_two_dtypes_and_leaks():
    text = lora.format_scope_report(
        report(
            base_checkpoint="/data/base",
            lora={"r": 4, "alpha": 8, "targets": ["q", "v"], "scope": "qformer+llm", "exclude_untrainable": True},
            adapter_dtypes=["torch.bfloat16", "torch.float32"],
            bare_name_matches_outside_qformer=["lm.a.q", "lm.b.q", "lm.c.q", "lm.d.q"],
        )
    ).splitlines()
    assert text[0] == "base checkpoint /data/base  (torch 2.13.0, transformers 5.24.0, peft 0.21.2)"
    assert text[1] == "LoRA r=4 alpha=8 targets=q,v scope=qformer+llm exclude_untrainable"
    assert text[4] == "adapter dtype:        torch.bfloat16, torch.float32"
    assert (
        text[-1] == "bare target names would also match outside the Q-Former: 4 layer(s), e.g. lm.a.q, lm.b.q, lm.c.q"
    )


def test_no_adapters_prints_a_dash_for_the_dtype():
    assert lora.format_scope_report(report(adapter_dtypes=[])).splitlines()[4] == "adapter dtype:        -"


class _Toy(torch.nn.Module):
    """A Q-Former, a language model and a module outside every component, each holding one linear layer."""

    def __init__(self):
        super().__init__()
        self.qformer = torch.nn.ModuleDict({"query": torch.nn.Linear(4, 4)})  # 16 + 4 = 20 parameters
        self.language_model = torch.nn.ModuleDict({"query": torch.nn.Linear(3, 3)})  # 9 + 3 = 12
        self.extra = torch.nn.Linear(2, 1)  # 2 + 1 = 3, under no component: counted by its own name


def test_scope_report_counts_a_model_small_enough_to_count_by_hand():
    """LoRA r=2 on qformer.query (4 -> 4): lora_A 2x4 = 8 and lora_B 4x2 = 8, so 16 trainable parameters in
    2 LoRA tensors; PEFT freezes every other parameter. Totals: 20 + 16 + 12 + 3 = 51, 100 * 16 / 51 %.
    The bare name "query" also matches the language model's layer, which the report names."""
    model = peft.get_peft_model(_Toy(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=r"qformer\.query"))
    spec = lora.LoraSpec(r=2, alpha=4, targets=("query",))
    report = lora.scope_report(model, spec)
    empty = {"parameters": 0, "trainable": 0, "lora_tensors": 0}
    assert report["components"] == {
        "vision_model": empty,
        "qformer": {"parameters": 36, "trainable": 16, "lora_tensors": 2},
        "query_tokens": empty,
        "language_projection": empty,
        "language_model": {"parameters": 12, "trainable": 0, "lora_tensors": 0},
        "extra.weight": {"parameters": 2, "trainable": 0, "lora_tensors": 0},
        "extra.bias": {"parameters": 1, "trainable": 0, "lora_tensors": 0},
    }, report["components"]
    summary = {k: report[k] for k in ("lora_tensors", "trainable_parameters", "total_parameters", "adapter_dtypes")}
    assert summary == {
        "lora_tensors": 2,
        "trainable_parameters": 16,
        "total_parameters": 51,
        "adapter_dtypes": ["float32"],
    }, summary
    assert report["trainable_percent"] == 100.0 * 16 / 51
    assert report["lora"] == {
        "r": 2,
        "alpha": 4,
        "dropout": 0.0,
        "targets": ["query"],
        "scope": "qformer",
        "extra": {},
        "exclude_untrainable": False,
    }
    assert report["bare_name_matches_outside_qformer"] == ["language_model.query"]
