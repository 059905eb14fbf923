"""Which peft releases give the seed's NaN: run this with an old release's interpreter.

    PYTHONPATH=src /work/venvs/t4.48-p0.14/bin/python tests/stability/probe_peft_releases.py
    PYTHONPATH=/tmp/peftsrc/0.11.1:src /work/venvs/t4.48-p0.14/bin/python tests/stability/probe_peft_releases.py

(not collected by pytest; tests/stability/test_seed_nan.py checks the installed release.)
Tiny InstructBLIP-FlanT5, fp16 base, the seed's last settings (r=4, lr=5e-6, clip 0.1,
warm-up 50), for-loop AdamW with eps=1e-8, three steps. Observed (torch 2.13.0 CPU):

| peft (transformers)  | fp16 base, default get_peft_model | get_peft_model, then model.half() |
|----------------------|-----------------------------------|-----------------------------------|
| 0.5.0 (4.33.3)       | fp32 adapters, finite             | fp16 adapters, NaN from step 1    |
| 0.6.2 (4.48.3)       | fp32 adapters, finite             | fp16 adapters, NaN from step 1    |
| 0.7.1 (4.48.3)       | fp16 adapters, NaN from step 1    | fp16 adapters, NaN from step 1    |
| 0.10.0 (4.48.3)      | fp16 adapters, NaN from step 1    | fp16 adapters, NaN from step 1    |
| 0.11.1 (4.48.3)      | fp16 adapters, NaN from step 1    | fp16 adapters, NaN from step 1    |
| 0.12.0 (4.48.3)      | fp32 adapters, finite             | fp16 adapters, NaN from step 1    |
| 0.14.0 (4.48.3)      | fp32 adapters, finite             | fp16 adapters, NaN from step 1    |
| 0.21.2 (5.24.0)      | fp32 adapters, finite             | fp16 adapters, NaN from step 1    |

In every NaN run the first non-finite parameter is
base_model.model.qformer.encoder.layer.0.attention.attention.query.lora_A.default.weight.
"""

from __future__ import annotations

import json
import warnings

import torch

from qformer_lora import compat, lora, presets, synthetic
from qformer_lora.repro import trials

PRESET = "tiny-instructblip-flan-t5"
SPEC = lora.LoraSpec(r=4, alpha=8, dropout=0.0)


def default_wrap():
    base = presets.build_model(PRESET, dtype=torch.float16)
    torch.manual_seed(0)
    return lora.apply_lora(base, SPEC)


def half_after_wrapping():
    base = presets.build_model(PRESET)
    torch.manual_seed(0)
    return lora.apply_lora(base, SPEC).half()


def run(label: str, make) -> dict:
    model = make()
    batches = [synthetic.random_batch(model, batch_size=2, prompt_len=8, answer_len=4, seed=i) for i in range(2)]
    trace = trials.run_steps(
        model, batches, precision="fp16-pure", steps=3, lr=5e-6, max_grad_norm=0.1, warmup_steps=50
    )
    return {
        "setup": label,
        "adapter_dtypes": trace["adapter_dtypes"],
        "losses": trace["losses"],
        "first_parameter": (trace["diagnosis"] or {}).get("first_parameter"),
    }


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print(
        json.dumps(
            {
                "versions": compat.versions(),
                "compat.peft_default_adapter_dtype(fp16)": str(compat.peft_default_adapter_dtype(torch.float16)),
                "runs": [
                    run("fp16 base, default get_peft_model", default_wrap),
                    run("get_peft_model, then model.half()", half_after_wrapping),
                ],
            },
            indent=1,
        )
    )
