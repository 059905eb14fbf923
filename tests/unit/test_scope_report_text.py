"""The scope report as `qformer-lora verify` prints it: the exact text for a report written by hand."""

from __future__ import annotations

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
