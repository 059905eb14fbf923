"""A quantized frozen language model: bitsandbytes LLM.int8 ("int8") or 4-bit NormalFloat ("nf4").

Only the frozen language model's linear layers are quantized; the vision encoder, the Q-Former
(whose LoRA adapters train, in fp32) and its projection keep the precision's weight dtype.

Which layers: every ``nn.Linear`` of the language model except those transformers' own
``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` leaves unquantized: the output
embeddings (``lm_head``) and the model's ``_keep_in_fp32_modules`` (T5's ``wo``, the feed-forward
output whose activations overflow in low precision). The layers are bitsandbytes' own
(``Linear8bitLt`` with ``has_fp16_weights=False`` and the outlier threshold 6.0, ``Linear4bit``
with ``quant_type="nf4"``), built as transformers' ``replace_with_bnb_linear`` builds them; that
function itself is not called because its skip-name matching differs between releases (substring
in 4.x, prefix/regex/suffix in 5.x).

Storage per quantized weight of ``n = out x in`` parameters (bitsandbytes; Dettmers et al. 2022,
"LLM.int8()", arXiv:2208.07339; Dettmers et al. 2023, "QLoRA", arXiv:2305.14314):

* int8: ``n`` bytes of int8 plus one fp32 absmax scale per output row (``4 * out`` bytes);
* nf4: two 4-bit codes per byte (``ceil(n / 2)`` bytes) plus one fp32 absmax per block of 64
  consecutive weights (``4 * ceil(n / 64)`` bytes); no double quantization of the absmax.

Biases stay in the weight dtype. ``weight_bytes`` is this arithmetic; bench/capacity.py turns
it into the memory a quantized language model saves.
"""

from __future__ import annotations

import math

import torch

from . import compat

MODES = ("none", "int8", "nf4")
NF4_BLOCKSIZE = 64  # bitsandbytes' Linear4bit default, the QLoRA paper's block size
ABSMAX_BYTES = 4  # fp32 absmax per block (nf4) or per output row (int8)
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (transformers' llm_int8_threshold default)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown language model quantization {mode!r}; expected one of {', '.join(MODES)}")


def weight_bytes(out_features: int, in_features: int, mode: str, dtype_bytes: int) -> int:
    """Bytes of one linear layer's weight (bias excluded) stored per ``mode``.

    ``dtype_bytes``: bytes per parameter of the unquantized weight (2 for bf16/fp16, 4 for fp32),
    what ``mode="none"`` stores. Sources: the module docstring."""
    check_mode(mode)
    n = out_features * in_features
    if mode == "int8":
        return n + ABSMAX_BYTES * out_features
    if mode == "nf4":
        return math.ceil(n / 2) + ABSMAX_BYTES * math.ceil(n / NF4_BLOCKSIZE)
    return n * dtype_bytes


def kept_unquantized(language_model) -> list[str]:
    """Names of the linear layers transformers leaves unquantized: the output embeddings' module path
    (relative to ``language_model``) and the model's ``_keep_in_fp32_modules`` (last name parts)."""
    output = language_model.get_output_embeddings()
    names = [name for name, module in language_model.named_modules() if output is not None and module is output]
    return names + sorted(getattr(language_model, "_keep_in_fp32_modules", None) or ())


def _kept(name: str, kept: list[str]) -> bool:
    # a kept name is a module path or a last name part ("wo" keeps every "...DenseReluDense.wo")
    return any(name == k or name.endswith("." + k) for k in kept)


def quantizable_linears(language_model) -> dict[str, tuple[int, int]]:
    """{name: (out_features, in_features)} of the linear layers ``quantize_language_model`` replaces."""
    kept = kept_unquantized(language_model)
    return {
        name: (module.out_features, module.in_features)
        for name, module in language_model.named_modules()
        if type(module) is torch.nn.Linear and not _kept(name, kept)
    }


def language_model_of(model):
    """The language model inside an InstructBLIP / BLIP-2 model, peft-wrapped or not."""
    return compat.unwrap(model).language_model


def _quantized_linear(bnb, linear: torch.nn.Linear, mode: str, compute_dtype: torch.dtype, device):
    """The bitsandbytes layer for ``linear``, its weight quantized on ``device`` (bitsandbytes
    quantizes a fresh Params4bit when it is moved to a device, an Int8Params when moved from the CPU)."""
    has_bias = linear.bias is not None
    with torch.device("meta"):  # the layer's own empty weight is replaced below: allocate nothing
        if mode == "int8":
            layer = bnb.nn.Linear8bitLt(
                linear.in_features, linear.out_features, has_bias, has_fp16_weights=False, threshold=INT8_THRESHOLD
            )
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, has_bias, compute_dtype, compress_statistics=False
            )
    weight = linear.weight.data
    if mode == "int8":
        # Int8Params quantizes only when moved from the CPU: built from a weight already on the GPU,
        # .to(device) would keep it in 16 bit (bitsandbytes then quantizes a second copy per forward)
        layer.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=False, quant_type="nf4"
        ).to(device)
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize_language_model(model, mode: str, compute_dtype: torch.dtype) -> int:
    """Quantize ``model``'s frozen language model in place per ``mode``; the number of layers replaced.

    ``mode="none"`` changes nothing (0). The weights are quantized on the device they are on
    (bitsandbytes must have kernels for it: compat.bitsandbytes_for) and stay frozen; the 4-bit
    layers compute in ``compute_dtype`` (the precision's weight dtype, the dtype the rest of the
    model hands them). Call it before LoRA is applied: the broad scope's LoRA then wraps the
    quantized layers (peft's bitsandbytes LoRA layers). Raises ModuleNotFoundError naming the
    ``quant`` extra without bitsandbytes, ValueError for an unknown mode."""
    check_mode(mode)
    if mode == "none":
        return 0
    language_model = language_model_of(model)
    device = next(language_model.parameters()).device
    bnb = compat.bitsandbytes_for(device.type)
    names = quantizable_linears(language_model)
    for name in names:
        layer = _quantized_linear(bnb, language_model.get_submodule(name), mode, compute_dtype, device)
        language_model.set_submodule(name, layer)
    return len(names)


def quantized_layers(model) -> dict[str, str]:
    """{name: bitsandbytes class name} of the language model's quantized linear layers."""
    return {
        name: type(module).__name__
        for name, module in language_model_of(model).named_modules()
        if type(module).__module__.startswith("bitsandbytes")
    }
