"""The one place that knows how transformers / peft releases differ.

Everything else in the package is written against one idea of the model; every
``if version >= ...`` lives here, with the reason next to it.

Functions marked ``# pragma: no mutate block`` decide by the installed release: the mutation
session (``nox -s mutation``) leaves them out, because on any one release only one branch runs;
the compat sessions test each branch on the release that takes it. The rest is release-independent
and mutated like the core.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import peft
import torch
import transformers
from packaging.version import InvalidVersion, Version

from . import jsonio

TRANSFORMERS = Version(transformers.__version__)
PEFT = Version(peft.__version__)
TORCH = Version(torch.__version__.split("+")[0])

# tomllib joined the standard library in Python 3.11 (PEP 680); tomli is the same parser published
# for older Pythons (pyproject requires it below 3.11). tests/unit/test_python_range.py runs vermin
# over the package so that the next 3.11-only import is caught on 3.11 too.
if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # noqa: F401 - re-exported as compat.tomllib

# Input conventions of the library's own InstructBLIP / BLIP-2 forward.
PREPEND = "prepend"  # the model prepends the query embeddings to the text embeddings itself
PLACEHOLDERS = "placeholders"  # input_ids must already hold num_query_tokens image tokens, which the
# model overwrites with the query embeddings (masked_scatter)

# transformers 4.45 taught the models to scatter query embeddings into image placeholder
# tokens when config.image_token_index is set (and the processors to insert them); models
# without it kept the old prepend path with a one-time warning. From 4.55 the prepend
# path is gone: without the image token the forward fails with
# "AttributeError: 'bool' object has no attribute 'unsqueeze'".
PLACEHOLDERS_INTRODUCED = Version("4.45.0")
PLACEHOLDERS_REQUIRED = Version("4.55.0")
# InstructBLIP's decoder-only loss sliced the logits to the last labels.size(1) positions
# up to 4.51; from 4.52 it uses the model's loss_function on the full logits, so labels
# must span the whole sequence, query positions included.
INSTRUCTBLIP_FULL_LENGTH_LABELS = Version("4.52.0")
# from_pretrained(torch_dtype=...) was renamed dtype=... in 4.56.
DTYPE_KWARG_RENAMED = Version("4.56.0")


def release_versions(key: str) -> tuple[Version, ...]:
    """The versions of a release key as the expectation tables write it: "transformers 5.24.0 / peft 0.21.2"
    -> (Version("5.24.0"), Version("0.21.2")). Raises ValueError for anything else."""
    try:
        return tuple(Version(part.split()[-1]) for part in key.split(" / "))
    except (IndexError, InvalidVersion) as err:
        raise ValueError(f"{key!r} is not a release key ('transformers X / peft Y')") from err


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def from_pretrained_dtype_kwarg(dtype: torch.dtype) -> dict:  # pragma: no mutate block
    return {"dtype": dtype} if TRANSFORMERS >= DTYPE_KWARG_RENAMED else {"torch_dtype": dtype}


def image_token_index(config) -> int | None:
    # The attribute was called image_token_index in every release; 5.x also exposes image_token_id.
    return getattr(config, "image_token_index", None)


def native_convention(config) -> str:  # pragma: no mutate block
    """Which input convention the installed library's own forward expects for ``config``."""
    if TRANSFORMERS >= PLACEHOLDERS_REQUIRED:
        return PLACEHOLDERS
    if TRANSFORMERS >= PLACEHOLDERS_INTRODUCED and image_token_index(config) is not None:
        return PLACEHOLDERS
    return PREPEND


def native_forward_needs_image_token() -> bool:  # pragma: no mutate block
    """Whether the installed library's own forward fails on a config without ``image_token_index``
    (checkpoints saved before 4.45, such as the 2023 hub repositories)."""
    return TRANSFORMERS >= PLACEHOLDERS_REQUIRED


def native_inputs(model, batch: dict) -> dict:
    """Keyword arguments for the library's own ``model(**kwargs)`` equivalent to ``batch``.

    ``batch`` follows this package's convention (see forward.py): text without image
    tokens; for decoder-only models, labels aligned with input_ids.
    """
    config = model.config
    kwargs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask", "labels") if k in batch}
    if "qformer_input_ids" in batch:
        kwargs["qformer_input_ids"] = batch["qformer_input_ids"]
        kwargs["qformer_attention_mask"] = batch["qformer_attention_mask"]
    num_queries = config.num_query_tokens
    batch_size = kwargs["input_ids"].shape[0]
    placeholders = native_convention(config) == PLACEHOLDERS
    if placeholders and image_token_index(config) is None:  # pragma: no mutate block
        raise ValueError(
            f"config has no image_token_index (saved before transformers 4.45): the own forward of transformers "
            f"{TRANSFORMERS} needs image placeholder tokens from {PLACEHOLDERS_REQUIRED} on; this package's forward "
            f"does not"
        )
    if placeholders:
        ids = kwargs["input_ids"].new_full((batch_size, num_queries), image_token_index(config))
        kwargs["input_ids"] = torch.cat([ids, kwargs["input_ids"]], dim=1)
        kwargs["attention_mask"] = torch.cat(
            [kwargs["attention_mask"].new_ones((batch_size, num_queries)), kwargs["attention_mask"]], dim=1
        )
    # Decoder-only labels: the old forward slices the logits to the last labels.size(1)
    # positions, so text-length labels are right; otherwise they must span query + text.
    full_length = placeholders or (
        config.model_type == "instructblip" and TRANSFORMERS >= INSTRUCTBLIP_FULL_LENGTH_LABELS  # pragma: no mutate
    )
    if config.use_decoder_only_language_model and "labels" in kwargs and full_length:
        kwargs["labels"] = torch.cat(
            [kwargs["labels"].new_full((batch_size, num_queries), -100), kwargs["labels"]], dim=1
        )
    return kwargs


def image_text_auto_class():  # pragma: no mutate block
    """The Auto class that maps an InstructBLIP / BLIP-2 config to its generating model class.

    Older 4.x releases have AutoModelForVision2Seq only; later 4.x releases added
    AutoModelForImageTextToText beside it, and 5.x dropped the old name (checked on 5.24; the release
    that added the new one is not pinned here), so the new one is taken wherever it exists.
    """
    import transformers

    return getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq


# peft < 0.6 matched a list target_modules with an uncompiled re.match(f".*\.{name}$", key)
# per (module, name) pair; with the ~1,100 explicit names of the broad scope on a full-size
# model that thrashes re's pattern cache and takes minutes per get_peft_model call. A str
# target_modules is a full-name regex in every peft release, so the same list is handed over
# as one equivalent pattern there (matches the name itself or any key ending in ".name").
PEFT_FAST_TARGET_MATCHING = Version("0.6.0")


def _target_modules_as_regex(names) -> str:  # pragma: no mutate block (called for peft < 0.8 only)
    return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in sorted(set(names))) + ")"


# peft < 0.7 implemented a LoRA layer as a subclass of nn.Linear: wrapping a layer ran
# nn.Linear.__init__ (a fresh weight on the default device, kaiming-initialised) before
# adopting the original weight, and unload() built a fresh nn.Linear per layer again. For a
# full-size model on the meta device that materialises every targeted weight on the CPU
# (~1 min per call for the broad scope); creating those throw-away modules on meta too
# gives the same model. From 0.7 LoRA layers wrap the original as base_layer.
PEFT_WRAPS_BASE_LAYER = Version("0.7.0")


def _creation_device(model):  # pragma: no mutate block
    """A torch.device('meta') context when peft < 0.7 would re-create ``model``'s meta layers."""
    first = next(iter(model.parameters()), None)
    if PEFT < PEFT_WRAPS_BASE_LAYER and first is not None and first.is_meta:
        return torch.device("meta")
    return contextlib.nullcontext()


def get_peft_model(model, lora_config):  # pragma: no mutate block
    """peft.get_peft_model, recording nothing version-specific beyond what peft does by default.

    Adapter dtype: peft >= 0.12 upcasts adapters of fp16/bf16 base layers to fp32
    (``autocast_adapter_dtype=True``); older releases create them in the base dtype.
    We keep the library default here so the scope report shows what users get.
    """
    targets = getattr(lora_config, "target_modules", None)
    if (
        PEFT < PEFT_FAST_TARGET_MATCHING
        and targets
        and not isinstance(targets, str)
        and getattr(lora_config, "layers_to_transform", None) is None
    ):
        lora_config = dataclasses.replace(lora_config, target_modules=_target_modules_as_regex(targets))
    with _creation_device(model):
        return peft.get_peft_model(model, lora_config)


# bitsandbytes (the optional `quant` extra) lists the torch device types it has kernels for in
# bitsandbytes.supported_torch_devices from 0.46 on, its multi-backend releases (the attribute
# transformers' validate_bnb_backend_availability reads). Checked here: 0.45.5 has no such
# attribute and its int8/nf4 layers fail on CPU tensors ("All input tensors need to be on the same
# GPU"); 0.46.1 to 0.50.2 quantize and run nf4 and LLM.int8 layers on the CPU, backward included.
BITSANDBYTES_EXTRA = "quant"


def bitsandbytes_for(device_type: str):  # pragma: no mutate block
    """The bitsandbytes module, if installed and with kernels for ``device_type`` ("cpu", "cuda", ...).

    Raises ModuleNotFoundError naming the extra when it is missing, RuntimeError naming the release
    and the device types it supports when it has no backend for ``device_type``."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ModuleNotFoundError(
            f"quantizing the language model needs bitsandbytes, which is not installed ({err}); install the "
            f"extra: pip install 'qformer-lora[{BITSANDBYTES_EXTRA}]'"
        ) from err
    supported = getattr(bitsandbytes, "supported_torch_devices", None)
    if supported is None and device_type == "cuda":
        return bitsandbytes  # before 0.46: CUDA was its one backend
    if supported is None or device_type not in supported:
        raise RuntimeError(
            f"bitsandbytes {bitsandbytes.__version__} has no {device_type} backend (it supports "
            f"{sorted(supported or {'cuda'})}); bitsandbytes >= 0.46 runs int8 and nf4 layers on the CPU too: "
            f"pip install -U 'qformer-lora[{BITSANDBYTES_EXTRA}]'"
        )
    return bitsandbytes


# bitsandbytes 0.49.0 added to Linear4bit.forward (read in the wheels: 0.47.0 and 0.48.2 lack it, 0.49.0 and 0.50.2
# have it): on a CPU whose AVX512-BF16 bitsandbytes detects (functional.has_avx512bf16, kept per layer as
# ``support_avx512bf16_for_cpu``), a forward in eval mode with an input that does not require grad repacks the nf4
# weight in place into an inference-only layout (functional._convert_weight_packed_for_cpu, which sets
# ``quant_state.packing_format_for_cpu``). Every later forward of that layer, training ones included, runs
# F.gemv_4bit (autograd/_functions.py matmul_4bit), which computes in bf16 and has no backward: no gradient reaches
# what lies before the layer. For in_features below the block size 64 the repack itself fails ("shape '[32, 0]' is
# invalid for input of size 16"). The trainer keeps the frozen language model in eval mode and validates under
# no_grad, so it takes that path. With the attribute False the layer keeps the dequantize-and-matmul path, which
# has a backward. No release without the repack after 0.48 is known (0.50.2 has it).
BITSANDBYTES_CPU_REPACK = Version("0.49.0")
BITSANDBYTES_CPU_REPACK_SWITCH = "support_avx512bf16_for_cpu"


def bitsandbytes_repacks_for_cpu(bnb) -> bool:  # pragma: no mutate block
    """Whether the installed bitsandbytes' nf4 layers repack their weight for CPU inference on this machine:
    a fresh Linear4bit (built on meta: nothing allocated) carries the switch, set (see above)."""
    with torch.device("meta"):  # the switch is set in __init__, whatever the shape
        layer = bnb.nn.Linear4bit(64, 64, bias=False)
    return bool(getattr(layer, BITSANDBYTES_CPU_REPACK_SWITCH, False))


def disable_bitsandbytes_cpu_repack(module) -> int:
    """Turn bitsandbytes' AVX512-BF16 CPU repack off on every layer of ``module`` that has the switch (its
    Linear4bit layers from 0.49 on; see above); the number of layers switched. Layers without it are left alone."""
    layers = [m for m in module.modules() if hasattr(m, BITSANDBYTES_CPU_REPACK_SWITCH)]
    for layer in layers:
        setattr(layer, BITSANDBYTES_CPU_REPACK_SWITCH, False)
    return len(layers)


def bitsandbytes_backend(bnb, device: torch.device) -> str:  # pragma: no mutate block
    """The bitsandbytes backend that runs layers on ``device``, in words: "cpu (avx512_bf16)" where its nf4
    layers take the AVX512-BF16 CPU path (above), "cpu" otherwise, "cuda (<device name>)", or the device type."""
    if device.type == "cpu":
        return "cpu (avx512_bf16)" if bitsandbytes_repacks_for_cpu(bnb) else "cpu"
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def unload(peft_model):
    """peft_model.unload(): the base model with the LoRA layers removed (not merged).

    Older peft releases leave its ``peft_config`` attribute on the returned model, and from about
    0.14 a later get_peft_model on it warns "Already found a `peft_config` attribute in the model.
    This will lead to having multiple adapters"; it is removed here so the model is the plain one
    again. peft removes it itself since huggingface/peft#3067 (merged 2026-02; 0.21.2 does).
    """
    with _creation_device(peft_model):
        base = peft_model.unload()
    if "peft_config" in vars(base):  # pragma: no mutate (peft < 0.21.2 only: later ones remove it)
        del base.peft_config  # pragma: no mutate
    return base


def unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


# transformers 5.0 made T5Config force tie_word_embeddings=True, so FlanT5's lm_head
# shares the input embedding matrix although the published flan-t5 configs untie them:
# a FlanT5-based model counts one vocab x d_model matrix fewer (65,798,144 parameters
# for flan-t5-xl), which moves the "share of the whole model" figure.
T5_LM_HEAD_ALWAYS_TIED = Version("5.0.0.dev0")


def parameter_count_regime(text_model_type: str) -> str:  # pragma: no mutate block
    """Which pinned total applies: 'standard' or 't5-lm-head-tied'."""
    if text_model_type == "t5" and TRANSFORMERS >= T5_LM_HEAD_ALWAYS_TIED:
        return "t5-lm-head-tied"
    return "standard"


# ----------------------------------------------------------------------------- adapter dtype (numerics)
# Which dtype get_peft_model gives LoRA weights on an fp16/bf16 base (FINDINGS.md (d)), the
# switch between "seed NaN" and "no NaN" (diagnostics/numerics.py): peft 0.5/0.6 create the LoRA
# nn.Linear in fp32 and only move it; 0.7-0.11 cast it to the base weight dtype; 0.12 added
# get_peft_model(autocast_adapter_dtype=True), which upcasts fp16/bf16 adapters to fp32.
PEFT_ADAPTERS_IN_BASE_DTYPE = (Version("0.7.0"), Version("0.12.0"))
PEFT_AUTOCAST_ADAPTER_DTYPE = Version("0.12.0")


def peft_default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:  # pragma: no mutate block
    """LoRA weight dtype that the installed peft's default get_peft_model gives on a ``base_dtype`` base."""
    low, high = PEFT_ADAPTERS_IN_BASE_DTYPE
    return base_dtype if low <= PEFT < high else torch.float32


def get_peft_model_in_base_dtype(model, lora_config):  # pragma: no mutate block
    """get_peft_model with the adapters left in the base weights' dtype, as peft 0.7-0.11 do by
    default (to reproduce that behaviour on any release): >= 0.12 with autocast_adapter_dtype=False;
    0.5/0.6 create fp32 adapters, which are cast to the base dtype here."""
    if PEFT >= PEFT_AUTOCAST_ADAPTER_DTYPE:
        return peft.get_peft_model(model, lora_config, autocast_adapter_dtype=False)
    wrapped = peft.get_peft_model(model, lora_config)
    if PEFT < PEFT_ADAPTERS_IN_BASE_DTYPE[0]:
        base_dtype = next(p.dtype for n, p in wrapped.named_parameters() if "lora_" not in n)
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(base_dtype)
    return wrapped


# ----------------------------------------------------------------------------- processors on disk
# transformers 5 saves a processor as processor_config.json with the image processor nested
# inside, and tokenizer_config.json files naming the 5.x-only class "TokenizersBackend".
# Older releases cannot read that layout: 4.33-4.4x want preprocessor_config.json ("does not
# appear to have a file named preprocessor_config.json"), some 4.x pass the nested dict on as
# a second image_processor ("got multiple values for argument 'image_processor'"), and
# AutoTokenizer fails with "Tokenizer class TokenizersBackend does not exist". Such a
# directory is rebuilt from its parts there (the tokenizers are plain fast tokenizers).
PROCESSOR_CONFIG_NESTED = Version("5.0.0.dev0")


def _saved_by_transformers_5(directory) -> bool:  # pragma: no mutate block (called on transformers 4.x only)
    import json
    from pathlib import Path

    config = Path(directory) / "processor_config.json"
    if not config.is_file():
        return False
    return isinstance(json.loads(config.read_text(encoding="utf-8")).get("image_processor"), dict)


def load_processor(processor_cls, directory):  # pragma: no mutate block
    """``processor_cls.from_pretrained(directory)`` offline, also for 5.x-saved directories on 4.x."""
    from pathlib import Path

    directory = Path(directory)
    if TRANSFORMERS >= PROCESSOR_CONFIG_NESTED or not _saved_by_transformers_5(directory):
        return processor_cls.from_pretrained(str(directory), local_files_only=True)
    import json

    from transformers import BlipImageProcessor, PreTrainedTokenizerFast

    image_config = json.loads((directory / "processor_config.json").read_text(encoding="utf-8"))["image_processor"]
    image_config = {k: v for k, v in image_config.items() if k not in ("image_processor_type", "processor_class")}
    parts = {
        "image_processor": BlipImageProcessor(**image_config),
        "tokenizer": PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True),
    }
    if (directory / "qformer_tokenizer").is_dir():
        parts["qformer_tokenizer"] = PreTrainedTokenizerFast.from_pretrained(
            str(directory / "qformer_tokenizer"), local_files_only=True
        )
    return processor_cls(**parts)


# ----------------------------------------------------------------------------- directories every release reads
# What a directory written by transformers 5 needs so that plain transformers of the version matrix
# loads it (AutoProcessor, AutoModelForImageTextToText / AutoModelForVision2Seq, generate). Observed on
# 2026-11-29 by loading the four tiny exports written with 5.24 under pip --target installs of 4.33.3,
# 4.45.2 and 4.57.6 (tokenizers and huggingface_hub of their era; torch 2.13):
# * tokenizer_config.json's "tokenizer_class": "TokenizersBackend" is a 5.x-only class: every 4.x failed
#   with "Tokenizer class TokenizersBackend does not exist or is not currently imported".
#   "PreTrainedTokenizerFast" names the same tokenizer.json backend in 4.x and 5.x (5.x maps it to
#   TokenizersBackend).
# * the image processor nested in processor_config.json: 4.33 and 4.45 want preprocessor_config.json
#   ("does not appear to have a file named preprocessor_config.json"), and 4.45 passes the nested dict
#   on as a second image_processor ("got multiple values for argument 'image_processor'"). The flat
#   layout the hub's own Salesforce repositories use (preprocessor_config.json, and processor_config.json
#   holding num_query_tokens alone) loaded on all four releases.
# * InstructBLIP's generate reads config.text_config.architectures[0] on 4.33 and 4.45 (None in a config
#   built from a preset: "'NoneType' object is not subscriptable").
# With the three, all four releases answered the same token ids on the four exports, except: 4.45.2's
# InstructBlipProcessor fails on return_tensors="pt" ("can only concatenate list (not "Tensor") to
# list", its own bug, whoever wrote the directory); and 4.33.3 / 4.45.2 return bos + answer from a
# decoder-only generate where 4.57.6 / 5.24 return prompt + answer. Other matrix releases: not checked.
LEGACY_TOKENIZER_CLASS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # (5.x name, name every release reads)
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def name_text_architecture(model) -> None:
    """Record the language model's class in ``config.text_config.architectures`` when it is missing
    (checkpoints from the hub have it; configs built from a preset do not)."""
    text_config = model.config.text_config
    if not getattr(text_config, "architectures", None):
        text_config.architectures = [type(model.language_model).__name__]


def make_readable_by_every_release(directory) -> list[str]:
    """Rewrite a saved processor's files in ``directory`` in the layout every checked release reads
    (see above); returns the files changed. Files already in that layout are left alone."""
    directory, changed = Path(directory), []
    for config_file in sorted(directory.rglob("tokenizer_config.json")):
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("tokenizer_class") == LEGACY_TOKENIZER_CLASS[0]:
            config["tokenizer_class"] = LEGACY_TOKENIZER_CLASS[1]
            _write_json(config_file, config)
            changed.append(str(config_file.relative_to(directory)))
    processor_file = directory / "processor_config.json"
    processor = json.loads(processor_file.read_text(encoding="utf-8")) if processor_file.is_file() else {}
    if isinstance(processor.get("image_processor"), dict):
        _write_json(directory / IMAGE_PROCESSOR_FILE, processor.pop("image_processor"))
        _write_json(processor_file, processor)
        changed += [IMAGE_PROCESSOR_FILE, processor_file.name]
    return changed


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(jsonio.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- models built on meta
# transformers 5.0.0 does not tie input and output embeddings of a model constructed under
# torch.device("meta") (it does on a real device, and 5.1.0 ties on meta again). Meta-device
# parameter counts then include each tied copy separately: +197,394,432 for FlanT5-XL (3 extra
# 32128 x 2048 matrices: encoder / decoder embed_tokens and lm_head, all one matrix in 5.x) and
# +128,778,240 for OPT-2.7B's lm_head (50304 x 2560). Tying again after construction gives the
# real model's structure; it is a no-op wherever construction already tied (every other release).
META_CONSTRUCTION_LEAVES_UNTIED = (Version("5.0.0"), Version("5.1.0"))  # observed: 5.0.0 only


def finish_meta_model(model):  # pragma: no mutate block
    """Call on a model just constructed on the meta device (presets.build_model)."""
    first = next(iter(model.parameters()), None)
    if first is not None and first.is_meta:
        model.tie_weights()
    return model


# ----------------------------------------------------------------------------- torch features (step options)


def fused_adamw_unavailable_reason(params) -> str | None:
    """Why ``AdamW(fused=True)`` cannot take ``params`` here, or None.

    Fused kernels exist for CUDA since torch 2.0 and for CPU since 2.4; torch lists the
    device types in a private helper, so a torch without it is treated as having none.
    """
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return f"torch {torch.__version__} does not list fused optimizer kernels"
    devices = _get_fused_kernels_supported_devices()
    for p in params:
        if not torch.is_floating_point(p):
            return f"a parameter has dtype {p.dtype}; fused AdamW needs floating-point parameters"
        if p.device.type not in devices:
            return f"torch {torch.__version__} has no fused AdamW kernel for {p.device.type} (has: {devices})"
    return None


def torch_compile_unavailable_reason(device_type: str) -> str | None:  # pragma: no mutate block
    """Why torch.compile cannot work for ``device_type`` here, or None (it may still fail later)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (added in 2.0)"
    from torch import _dynamo

    if not _dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} cannot compile on Python {sys.version_info[0]}.{sys.version_info[1]}"
    if device_type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        return "no C++ compiler (g++ or clang++, or $CXX) for inductor's CPU kernels"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "triton is not installed: inductor cannot generate GPU kernels"
    return None


# PyTorch's recipes for a compiled optimizer step: "Compiling the optimizer with torch.compile" needs
# torch 2.2, "Running the compiled optimizer with an LR Scheduler" (a tensor learning rate, so a new
# rate is a new value rather than a new constant that recompiles the step) 2.3.
COMPILED_OPTIMIZER = Version("2.3.0")


def compiled_optimizer_unavailable_reason(device_type: str) -> str | None:  # pragma: no mutate block
    """Why an AdamW step compiled with a tensor learning rate cannot work here, or None."""
    if TORCH < COMPILED_OPTIMIZER:
        return f"torch {TORCH} cannot compile AdamW's step with a tensor learning rate (needs {COMPILED_OPTIMIZER})"
    return torch_compile_unavailable_reason(device_type)


def cudagraph_mark_step_begin() -> None:  # pragma: no mutate block
    """Tell torch.compile's CUDA graph trees that a new training step starts, so the outputs of
    the last step's graphs may be overwritten (torch.compiler.cudagraph_mark_step_begin; before
    that name existed, inductor's own mark_step_begin)."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is None:
        from torch._inductor.cudagraph_trees import mark_step_begin as mark
    mark()


# transformers 4.35 added gradient_checkpointing_kwargs (before it, always torch's reentrant
# checkpoint, whose gradients still reach inputs that require grad, as the LM's input embeddings
# do); transformers 5 renamed the methods activation_checkpointing_enable / _disable (the old
# names warn).
CHECKPOINTING_KWARGS = Version("4.35.0")


def set_activation_checkpointing(model, enabled: bool) -> None:  # pragma: no mutate block
    """Activation checkpointing of a transformers model on or off; non-reentrant where the
    release lets us choose."""
    if not enabled:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif TRANSFORMERS >= CHECKPOINTING_KWARGS:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable()


def checkpointing_switches(model) -> list[torch.nn.Module]:  # pragma: no mutate block
    """The modules of ``model`` whose ``training`` flag decides whether checkpointing acts.

    From transformers 4.53 each layer (a GradientCheckpointingLayer) checkpoints itself;
    before, the stack that runs the layers (the module holding their ModuleList) did.
    Other modules carry the ``gradient_checkpointing`` flag too: on T5's attention it only
    marks the zero cross-attention position bias as requiring grad (in training mode). That
    buys nothing with non-reentrant checkpointing, but it breaks a compiled block's graph
    inside the checkpoint (dynamo cannot set requires_grad in a graph) and makes SDPA pick
    another CPU kernel (checkpointing then moved T5's gradients in the last bits).
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return [
            m
            for m in model.modules()
            if hasattr(m, "gradient_checkpointing")
            and any(isinstance(child, torch.nn.ModuleList) for child in m.children())
        ]
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def raise_recompile_limit(minimum: int) -> int:  # pragma: no mutate block
    """Let dynamo keep at least ``minimum`` compiled variants of one function; returns the limit.

    transformers 5 wraps every checkpointable layer class's forward in one shared function
    (GradientCheckpointingLayer's ``forward_with_checkpointing``), so the vision layers and
    the LM's first and later encoder / decoder blocks, with grad and without, are all
    variants of one code object; past dynamo's default limit (8) the rest would silently
    run eager. Newer torch renamed ``cache_size_limit`` to ``recompile_limit``.
    """
    from torch import _dynamo

    name = "recompile_limit" if hasattr(_dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), minimum))
    return getattr(_dynamo.config, name)


# torch 2.4 made torch.is_autocast_enabled / get_autocast_dtype take the device type; before,
# CPU and CUDA had their own functions.
AUTOCAST_BY_DEVICE_TYPE = Version("2.4.0")


def autocast_state(device_type: str) -> str:  # pragma: no mutate block
    """ "no-autocast" or e.g. "autocast-torch.float16": the autocast mode ``device_type`` runs in now."""
    if TORCH >= AUTOCAST_BY_DEVICE_TYPE:
        enabled, dtype = torch.is_autocast_enabled(device_type), lambda: torch.get_autocast_dtype(device_type)
    elif device_type == "cuda":
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype
    else:
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype
    return f"autocast-{dtype()}" if enabled else "no-autocast"


# ----------------------------------------------------------------------------- .bin weights (pickle files)
# A pytorch_model*.bin is a pickle: loading it without torch's weights_only unpickler runs whatever
# it names. transformers passes weights_only=True to torch.load from 4.37 (read in the wheels'
# modeling_utils.py: 4.36.2 passes torch.load the checkpoint file and map_location alone, 4.37.2 adds
# weights_only=True; 4.38.2 to 5.24 keep it). Before that the call is safe only where torch itself
# defaults to weights_only=True: torch 2.6 and later, unless TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set
# (torch/serialization.py reads it when the caller does not pass weights_only).
BIN_LOADED_WEIGHTS_ONLY = Version("4.37.0")
TORCH_LOAD_WEIGHTS_ONLY_DEFAULT = Version("2.6.0")


def bin_weights_unsafe_reason() -> str | None:  # pragma: no mutate block
    """Why the installed transformers would unpickle ``.bin`` weights without weights_only, or None."""
    if TRANSFORMERS >= BIN_LOADED_WEIGHTS_ONLY:
        return None
    forced = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes", "true")
    if TORCH >= TORCH_LOAD_WEIGHTS_ONLY_DEFAULT and not forced:
        return None
    why = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set" if forced else f"torch {TORCH} defaults to full unpickling"
    return (
        f"transformers {TRANSFORMERS} calls torch.load without weights_only (it passes weights_only=True "
        f"from {BIN_LOADED_WEIGHTS_ONLY}) and {why}"
    )


# CPU features that change results on the CPU (tests pin such results per feature, and every recorded
# expectation row stores them): torch's ATen kernels dispatch per capability ("AVX2", "AVX512", ...;
# ATEN_CPU_CAPABILITY=avx2 forces the older one), which changes float rounding, e.g. whether a gradient
# that is zero in exact arithmetic comes out exactly zero; bitsandbytes >= 0.49 takes a CPU inference
# path of its own when the CPU has avx512_bf16.
CPU_FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_features() -> dict:
    """{"capability": torch's ATen CPU capability (str), "flags": the CPU_FLAGS_THAT_MATTER this CPU has}.

    The flags are read from /proc/cpuinfo (Linux); elsewhere the list is empty."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [f for f in CPU_FLAGS_THAT_MATTER if f in flags],
    }
