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
import warnings

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
    quantized layers (peft's bitsandbytes LoRA layers). Before any layer is replaced the kernels are
    probed (:func:`check_kernels`); where bitsandbytes' AVX512-BF16 CPU repack breaks them and switching it
    off mends them, it is switched off on every quantized layer with a KernelFallbackWarning. Raises
    ModuleNotFoundError naming the ``quant`` extra without bitsandbytes, ValueError for an unknown mode,
    QuantizedKernelError (model unchanged) when the kernels are broken here."""
    check_mode(mode)
    if mode == "none":
        return 0
    language_model = language_model_of(model)
    device = next(language_model.parameters()).device
    bnb = compat.bitsandbytes_for(device.type)
    names = quantizable_linears(language_model)
    shape = _probe_shape(language_model, names) if names else None
    notice = check_kernels(bnb, mode, shape, compute_dtype, device, len(names)) if names else None
    for name in names:
        layer = _quantized_linear(bnb, language_model.get_submodule(name), mode, compute_dtype, device)
        language_model.set_submodule(name, layer)
    if notice is not None:  # the probe found the kernels correct only with the CPU repack off: off on every layer
        compat.disable_bitsandbytes_cpu_repack(language_model)
        warnings.warn(notice, KernelFallbackWarning, stacklevel=2)
    return len(names)


# ----------------------------------------------------------------------------- the kernel probe
# A bitsandbytes release can run wrong on one machine only: 0.49.0 to 0.50.2 repack an nf4 weight for CPU
# inference where the CPU has AVX512-BF16, after which the layer has no backward (compat.py says where). Training
# through such a layer learns nothing and still exits 0, so before a model is quantized one small layer of the
# model's smallest shape is run the way the trainer runs the frozen language model and compared with F.linear on
# its own dequantized weight; wrong values, a missing input gradient or an exception is a broken kernel.

PROBE_ROWS = 4  # rows of the probe input: a batch, not one vector (bitsandbytes has gemv paths for single rows)


class QuantizedKernelError(RuntimeError):
    """The quantized language model's bitsandbytes kernels compute wrongly on this machine (check_kernels)."""


class KernelFallbackWarning(RuntimeWarning):
    """A bitsandbytes code path broken on this machine was switched off; the probe found the rest correct."""


def _probe_shape(language_model, names) -> tuple[int, int, bool]:
    """(out_features, in_features, has a bias) of the quantizable layer with the fewest inputs: the repack fault
    depends on in_features (below one nf4 block of 64 it raises, from 64 on it loses the gradient)."""
    name = min(names, key=lambda n: (names[n][1], names[n][0], n))
    return (*names[name], language_model.get_submodule(name).bias is not None)


def _kernel_bound(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, int8_rows: bool) -> torch.Tensor:
    """Elementwise bound on how far a kernel's ``a @ b`` computed in ``dtype`` may lie from the fp32 product of the
    same (already dequantized) factors; ``a``: (rows, k), ``b``: (k, n), both fp32; the bound is (rows, n).

    Why this much: the kernel rounds ``a``, ``b`` and the result to ``dtype`` (each a relative error of at most
    eps/2, so 4 eps covers the three with room) and accumulates k products in fp32 or better (Higham's gamma_k:
    at most k fp32 eps of the sum of |products|). LLM.int8 (``int8_rows``) casts activations to fp16 and rounds
    each row to 127 levels of its absmax: every product is then off by up to that row's absmax / 254 times
    |weight|, bounded here by absmax / 127 (bitsandbytes; Dettmers et al. 2022, arXiv:2208.07339). A broken
    kernel is off by far more: the AVX512-BF16 repack computes an fp32 layer in bf16 (eps 7.8e-3)."""
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float16).eps) if int8_rows else torch.finfo(dtype).eps
    bound = (4 * eps + a.shape[-1] * torch.finfo(torch.float32).eps) * (a.abs() @ b.abs())
    if int8_rows:
        bound = bound + a.abs().amax(dim=-1, keepdim=True) / 127 * b.abs().sum(dim=0)
    return bound


def _difference(what: str, actual: torch.Tensor | None, reference: torch.Tensor, bound: torch.Tensor) -> str | None:
    """None when ``actual`` is within ``bound`` of ``reference`` everywhere, else what differed (in words)."""
    if actual is None:
        return f"{what} is missing (the kernel has no backward)"
    error = torch.nan_to_num((actual.float() - reference).abs(), nan=math.inf)
    if bool((error <= bound).all()):
        return None
    worst = int(torch.argmax(error - bound))
    return (
        f"{what} differs from F.linear on the dequantized weight by up to {error.max().item():.3g} "
        f"(max abs error; {bound.flatten()[worst].item():.3g} allowed there)"
    )


def dequantized_weight(bnb, layer, mode: str) -> torch.Tensor:
    """The fp32 (out_features, in_features) weight a quantized ``layer`` computes with: nf4 through bitsandbytes'
    own dequantize_4bit, LLM.int8 as its int8 codes times the row's absmax / 127."""
    if mode == "nf4":
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    return layer.weight.data.float() * layer.weight.SCB.float()[:, None] / 127


def _probe_layer(bnb, mode: str, shape: tuple[int, int, bool], dtype: torch.dtype, device, repack: bool):
    """(a fresh quantized layer of ``shape`` in eval mode, its dequantized fp32 weight, its fp32 bias or None),
    built by _quantized_linear from seeded weights (the global RNG is not touched). ``repack=False``: with
    bitsandbytes' CPU repack switched off (compat.disable_bitsandbytes_cpu_repack)."""
    out_features, in_features, has_bias = shape
    generator = torch.Generator(device).manual_seed(0)
    with torch.device("meta"):
        linear = torch.nn.Linear(in_features, out_features, bias=has_bias)
    weight = torch.randn(out_features, in_features, generator=generator, device=device) / math.sqrt(in_features)
    linear.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    if has_bias:
        linear.bias = torch.nn.Parameter(torch.randn(out_features, generator=generator, device=device).to(dtype))
    layer = _quantized_linear(bnb, linear, mode, dtype, device).eval()  # the trainer's frozen LM is in eval mode
    if not repack:
        compat.disable_bitsandbytes_cpu_repack(layer)
    return layer, dequantized_weight(bnb, layer, mode), linear.bias.detach().float() if has_bias else None


def probe_kernels(bnb, mode: str, shape, dtype: torch.dtype, device, repack: bool = True) -> str | None:
    """None when a quantized layer of ``shape`` ((out_features, in_features, has a bias)) computes correctly in
    eval mode on ``device`` in ``dtype``; else what went wrong (in words). As the trainer runs it: first a no-grad
    forward (validation), then a forward and backward with an input that requires grad (a training step); the
    outputs and the input gradient are compared with F.linear on the layer's dequantized weight within
    _kernel_bound. An exception counts as broken. ``repack``: as _probe_layer."""
    device, stage = torch.device(device), "building the layer"
    with warnings.catch_warnings():  # the probe says what it finds itself (torch warns of a missing backward)
        warnings.simplefilter("ignore")
        try:
            layer, weight, bias = _probe_layer(bnb, mode, shape, dtype, device, repack)
            generator = torch.Generator(device).manual_seed(1)
            x = torch.randn(PROBE_ROWS, shape[1], generator=generator, device=device).to(dtype)
            grad_out = torch.randn(PROBE_ROWS, shape[0], generator=generator, device=device).to(dtype)
            stage = "the no-grad forward"
            with torch.no_grad():
                no_grad_output = layer(x)
            stage, leaf = "the training forward and backward", x.clone().requires_grad_()
            with torch.enable_grad():
                output = layer(leaf * 1)  # an activation, as the LM's layers get: not a leaf
                if output.requires_grad:  # else the input gradient is missing: said below
                    output.backward(grad_out)
        except Exception as err:  # noqa: BLE001 - any failure of the kernel is the finding
            return f"{stage} raises {type(err).__name__}: {err}"
    expected, expected_grad = x.float() @ weight.T + (0 if bias is None else bias), grad_out.float() @ weight
    bound = _kernel_bound(x.float(), weight.T, dtype, mode == "int8")
    if bias is not None:  # added in dtype: one more rounding
        bound = bound + torch.finfo(dtype).eps * bias.abs()
    grad_bound = _kernel_bound(grad_out.float(), weight, dtype, False)  # the backward uses the dequantized weight
    return (
        _difference("the no-grad forward's output", no_grad_output, expected, bound)
        or _difference("the training forward's output", output.detach(), expected, bound)
        or _difference("the input gradient", leaf.grad, expected_grad, grad_bound)
    )


def check_kernels(bnb, mode: str, shape, dtype: torch.dtype, device, layers: int) -> str | None:
    """Probe the ``mode`` kernels (probe_kernels) before ``layers`` layers of a model are quantized. None when they
    are correct; the notice to state when they are correct only with bitsandbytes' AVX512-BF16 CPU repack switched
    off (the caller then switches it off on the model's layers). Raises QuantizedKernelError naming the backend,
    the bitsandbytes release, what differed and what to do when neither is correct."""
    device = torch.device(device)
    found = probe_kernels(bnb, mode, shape, dtype, device)
    if found is None:
        return None
    backend, release = compat.bitsandbytes_backend(bnb, device), f"bitsandbytes {bnb.__version__}"
    dtype_name, switch = str(dtype).removeprefix("torch."), compat.BITSANDBYTES_CPU_REPACK_SWITCH
    probe = f"a probe layer ({mode}, {shape[0]} x {shape[1]}, {dtype_name}, eval mode as the trainer runs the LM)"
    repacks = mode == "nf4" and device.type == "cpu" and compat.bitsandbytes_repacks_for_cpu(bnb)
    if repacks:
        mended = probe_kernels(bnb, mode, shape, dtype, device, repack=False)
        if mended is None:
            return (
                f"{release} on {backend}: its nf4 layers repack their weight for CPU inference at the first "
                f"eval-mode forward without grad (as validation runs; below 64 inputs that fails, from 64 on the "
                f"layer then computes in bf16 without a backward); on {probe} {found}. Switched that repack off "
                f"({switch}=False) on the language model's {layers} Linear4bit layers: they dequantize and "
                f"multiply in {dtype_name}, with a backward (probed correct)"
            )
        found += f"; with the CPU repack switched off ({switch}=False) too, {mended}"
    advice = (
        f"pip install 'bitsandbytes<{compat.BITSANDBYTES_CPU_REPACK}' (before its AVX512-BF16 CPU repack) or a later "
        f"release that fixes it"
        if repacks
        else f"pip install another bitsandbytes release than {bnb.__version__}"
    )
    raise QuantizedKernelError(
        f"the {mode} kernels of {release} compute wrongly on {backend}: on {probe} {found}. Training through them "
        f"would not learn. Use --quantize-language-model none, or a bitsandbytes release without this fault: {advice}"
    )


def quantized_layers(model) -> dict[str, str]:
    """{name: bitsandbytes class name} of the language model's quantized linear layers."""
    return {
        name: type(module).__name__
        for name, module in language_model_of(model).named_modules()
        if type(module).__module__.startswith("bitsandbytes")
    }
