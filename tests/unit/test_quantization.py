"""--quantize-language-model: the bitsandbytes int8 / nf4 language model, its bytes and its max batch.

The arithmetic and the missing-extra errors run everywhere; the rest needs bitsandbytes with a
CPU backend (>= 0.46, in the ``test`` extra) and skips, naming why, without one.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from qformer_lora import compat, data, lora, presets, quantization
from qformer_lora.bench import capacity, capacity_table
from qformer_lora.diagnostics import numerics
from qformer_lora.training import run_config, train

from ..conftest import check_against_release

MIB, GIB = 2**20, 2**30
CLASSES = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}


@pytest.fixture(scope="module")
def bnb():
    try:
        return compat.bitsandbytes_for("cpu")
    except (ModuleNotFoundError, RuntimeError) as err:
        pytest.skip(f"bitsandbytes cannot run on this machine's CPU: {err}")


CPU_REPACK = (
    "bitsandbytes' AVX512-BF16 CPU repack of nf4 weights: a CPU with avx512_bf16 and bitsandbytes >= "
    f"{compat.BITSANDBYTES_CPU_REPACK} (0.49.0 to 0.50.2 checked; 0.47.0 and 0.48.2 have no repack)"
)


@pytest.fixture
def cpu_repack(bnb):
    """Skips (naming the feature) unless this machine's bitsandbytes takes the AVX512-BF16 repack path."""
    if not compat.bitsandbytes_repacks_for_cpu(bnb):
        pytest.skip(f"needs {CPU_REPACK}")


@pytest.fixture
def no_cpu_repack(bnb):
    """Skips (naming the feature) where this machine's bitsandbytes takes the AVX512-BF16 repack path."""
    if compat.bitsandbytes_repacks_for_cpu(bnb):
        pytest.skip(f"pins the machines without {CPU_REPACK}")


# ----------------------------------------------------------------------------- arithmetic


def test_weight_bytes_by_hand():
    # the tiny T5's wi_0: 37 x 32 = 1184 weights
    assert quantization.weight_bytes(37, 32, "none", 2) == 2368  # bf16: 2 B each
    assert quantization.weight_bytes(37, 32, "none", 4) == 4736  # fp32: 4 B each
    assert quantization.weight_bytes(37, 32, "int8", 2) == 1184 + 4 * 37  # 1 B each + an fp32 scale per row = 1332
    assert quantization.weight_bytes(37, 32, "nf4", 2) == 592 + 4 * 19  # 1184/2 B + fp32 absmax per ceil(1184/64) = 668
    # T5-XL's q projection, 2048 x 2048 = 4,194,304 weights
    assert quantization.weight_bytes(2048, 2048, "none", 2) == 8_388_608
    assert quantization.weight_bytes(2048, 2048, "int8", 2) == 4_194_304 + 8_192  # = 4,202,496
    assert quantization.weight_bytes(2048, 2048, "nf4", 2) == 2_097_152 + 262_144  # 65,536 blocks of 64; = 2,359,296
    # an odd count: 3 x 3 = 9 weights take ceil(9/2) = 5 bytes and one block
    assert quantization.weight_bytes(3, 3, "nf4", 4) == 5 + 4
    with pytest.raises(ValueError, match="unknown language model quantization 'int4'; expected one of none, int8, nf4"):
        quantization.weight_bytes(3, 3, "int4", 2)


def test_shifted_max_batch_by_hand():
    """1000 layers of 1024 x 1024 in bf16: each 2,097,152 B, in nf4 524,288 + 4 x 16,384 = 589,824 B, so
    nf4 saves 1000 x 1,507,328 = 1,507,328,000 B. With a = 10 GiB, b = 100 MiB on 24 GiB:
    unquantized floor(14 GiB / 100 MiB) = floor(143.36) = 143; nf4
    floor((15,032,385,536 + 1,507,328,000) / 104,857,600) = floor(157.73) = 157."""
    shapes = [(1024, 1024)] * 1000
    saving = capacity.quantization_saving(shapes, "nf4", 2)
    assert saving == 1_507_328_000
    assert capacity.quantization_saving(shapes, "none", 2) == 0
    assert capacity.quantization_saving(shapes, "int8", 4) == 1000 * (4 * 1_048_576 - (1_048_576 + 4 * 1024))
    a, b = 10 * GIB, 100 * MIB
    assert capacity.predict_max_batch(a, b, 24 * GIB) == 143
    assert capacity.predict_max_batch(capacity.shift_intercept(a, saving), b, 24 * GIB) == 157


def test_capacity_table_rows_shift_the_intercept_of_each_point():
    """A one-point report on the tiny preset (its language model: 32 quantizable layers; the table
    counts them on meta): every quantization keeps b and lowers a by quantization_saving."""
    model = presets.build_model("tiny-instructblip-flan-t5", device="meta", seed=None)
    shapes = list(quantization.quantizable_linears(model.language_model).values())
    assert len(shapes) == 32  # 2 encoder x (q, k, v, o, wi_0, wi_1) + 2 decoder x 10; wo and lm_head kept
    a, b = 3 * GIB, 7 * MIB
    point = {
        "label": "tiny",
        "config": {"preset": "tiny-instructblip-flan-t5", "precision": "fp32"},
        "memory_model": {"allocated": {"a": a, "b": b}},
    }
    rows = capacity_table.table_rows({"points": [point, {"label": "no fit", "memory_model": None}]})
    assert [r["quantization"] for r in rows] == ["none", "int8", "nf4"]
    for row in rows:
        saving = capacity.quantization_saving(shapes, row["quantization"], 4)
        assert row["saving_bytes"] == saving
        assert row["max_batch"] == {g: int((g * GIB - (a - saving)) // b) for g in (24, 40, 80)}
    assert rows[2]["saving_bytes"] > rows[1]["saving_bytes"] > 0


def test_committed_capacity_table_is_the_generators_output():
    # reports/capacity.md is generated: a stale table (new sweep, new arithmetic) is caught here
    root = Path(__file__).resolve().parents[2]
    committed = (root / "reports" / "capacity.md").read_text(encoding="utf-8")
    source = "reports/gpu/nvidia-h200-2026-11-28.json"
    report = json.loads((root / source).read_text(encoding="utf-8"))
    assert committed == capacity_table.markdown(report, source)


# ----------------------------------------------------------------------------- errors


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    model = presets.build_model("tiny-instructblip-flan-t5")
    with pytest.raises(ModuleNotFoundError, match=r"needs bitsandbytes.*pip install 'qformer-lora\[quant\]'"):
        quantization.quantize_language_model(model, "nf4", torch.float32)
    assert quantization.quantized_layers(model) == {}  # nothing was half-replaced
    assert quantization.quantize_language_model(model, "none", torch.float32) == 0  # "none" never needs it


def test_bitsandbytes_without_the_device_backend_says_so(monkeypatch):
    # before 0.46 bitsandbytes had no supported_torch_devices and CUDA kernels alone
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.45.5"))
    with pytest.raises(RuntimeError, match=r"bitsandbytes 0.45.5 has no cpu backend \(it supports \['cuda'\]\)"):
        compat.bitsandbytes_for("cpu")
    assert compat.bitsandbytes_for("cuda").__version__ == "0.45.5"


def test_unknown_quantization_is_refused_naming_the_option():
    with pytest.raises(run_config.ConfigError, match=r"--quantize-language-model: option 'quantize_language_model' "):
        run_config.load_run_config(None, {"quantize_language_model": "int4"})
    assert run_config.load_run_config(None, {"quantize_language_model": "nf4"}).quantize_language_model == "nf4"


# ----------------------------------------------------------------------------- the quantized model


def tiny(mode: str, precision: str = "fp32"):
    config = train.TrainConfig(base_checkpoint=None, precision=precision, quantize_language_model=mode)
    return train.build_adapter_model(config)[0]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_only_the_language_models_linears_are_quantized_and_lora_is_unchanged(bnb, mode, precision):
    plain, quantized = tiny("none", precision), tiny(mode, precision)
    language_model = quantization.language_model_of(plain)
    expected = quantization.quantizable_linears(language_model)
    layers = quantization.quantized_layers(quantized)
    assert set(layers) == set(expected) and set(layers.values()) == {CLASSES[mode]}
    kept = {n for n, m in quantization.language_model_of(quantized).named_modules() if type(m) is torch.nn.Linear}
    assert kept == {"lm_head"} | {n for n in dict(language_model.named_modules()) if n.endswith(".wo")}
    outside = [n for n, m in quantized.named_modules() if type(m).__module__.startswith("bitsandbytes")]
    assert all(".language_model." in f".{n}" for n in outside), outside
    lora.check_trainable_scope(quantized, "qformer")
    spec = lora.LoraSpec()
    before, after = lora.scope_report(plain, spec), lora.scope_report(quantized, spec)
    assert (after["trainable_parameters"], after["lora_tensors"]) == (
        before["trainable_parameters"],
        before["lora_tensors"],
    )
    assert after["adapter_dtypes"] == ["float32"]
    assert not any(p.requires_grad for p in quantization.language_model_of(quantized).parameters())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_stored_bytes_are_the_arithmetics(bnb, mode):
    """What bitsandbytes really stores per quantized layer: int8 weight + fp32 row scales (SCB), or
    packed nf4 codes + fp32 absmax per block; weight_bytes must count exactly that."""
    model = tiny(mode)
    language_model = quantization.language_model_of(model)
    for name in quantization.quantized_layers(model):
        weight = language_model.get_submodule(name).weight
        scales = weight.SCB if mode == "int8" else weight.quant_state.absmax
        stored = weight.numel() * weight.element_size() + scales.numel() * scales.element_size()
        layer = language_model.get_submodule(name)
        assert stored == quantization.weight_bytes(layer.out_features, layer.in_features, mode, 4), name


# ----------------------------------------------------------------------------- training on the same batches


def step_losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """run(name, **options): the step losses of four optimizer steps (batch 8, the first 32 shapes samples,
    fp32) from the tiny pretrained base, each run once per module."""
    tmp = tmp_path_factory.mktemp("quantized")
    options = {
        "image_root": str(data.SHAPES_DIR),
        "train_manifest": str(data.shapes_subset(tmp, "train", 32)),
        "val_manifest": str(data.shapes_subset(tmp, "val", 8)),
    }

    done: dict[str, list[float]] = {}

    def run(name: str, **overrides) -> list[float]:
        if name not in done:
            config = dict(progress=False, output_dir=str(tmp / name), epochs=1, batch_size=8, **options)
            train.train(train.TrainConfig(**config | overrides))
            done[name] = step_losses(tmp / name)
        return done[name]

    return tmp, run


def dequantized_base(bnb, tmp: Path, mode: str) -> Path:
    """The tiny base with every layer quantize_language_model would quantize replaced by its dequantized
    weight (bitsandbytes' own dequantize_4bit; int8: code x row scale / 127), saved as a checkpoint."""
    base = train.TrainConfig().base_checkpoint
    quantized = presets.load_model(base)
    quantization.quantize_language_model(quantized, mode, torch.float32)
    plain = presets.load_model(base)
    for name in quantization.quantized_layers(quantized):
        layer = quantization.language_model_of(quantized).get_submodule(name)
        values = quantization.dequantized_weight(bnb, layer, mode)
        quantization.language_model_of(plain).get_submodule(name).weight.data.copy_(values)
    out = tmp / f"dequantized-{mode}"
    shutil.copytree(base, out)
    plain.save_pretrained(out)
    return out


@pytest.mark.slow
def test_nf4_training_is_the_fp32_training_of_its_dequantized_weights(bnb, runs):
    """NF4 with fp32 compute dequantizes each weight and multiplies in fp32, so four steps on the same
    batches must give the losses of the unquantized model whose weights are those dequantized values:
    the quantized run's whole difference from fp32 is the weight rounding. rtol 1e-6: the same fp32
    numbers through possibly another matmul kernel (summation order; fp32 eps 1.2e-7, a few layers).
    Measured: equal to the last bit (bitsandbytes 0.50.2, torch 2.13 CPU; on a CPU with avx512_bf16 too, where
    quantize_language_model switches bitsandbytes' CPU repack off: with it the first validation raises)."""
    tmp, run = runs
    nf4 = run("nf4", quantize_language_model="nf4")
    reference = run("dequantized-nf4", base_checkpoint=str(dequantized_base(bnb, tmp, "nf4")))
    assert len(nf4) == 4
    torch.testing.assert_close(torch.tensor(nf4), torch.tensor(reference), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_quantized_losses_against_fp32_on_the_same_batches(bnb, runs):
    """Four steps, same batches, quantized LM against the fp32 LM.

    Tolerances are the measured gaps with room for other bitsandbytes releases, not derived bounds:
    * int8 (LLM.int8 rounds each weight row and each activation row to 127 levels of its absmax, ~0.4 %
      per matmul measured on one 64->32 layer): measured at most 1.6 % (step 2; the same losses on
      bitsandbytes 0.47.0 and 0.50.2): tolerance 3 %.
    * nf4 (16 levels per block of 64; ~9 % per matmul on that layer, this d_model-32 model has no
      redundancy to average it out): measured at most 11.3 % (step 1): tolerance 15 %. What pins the
      nf4 implementation is the exact test above; this one says how far a tiny model moves.
    Both must differ from fp32 at all, else nothing was quantized. On a CPU with avx512_bf16 and bitsandbytes
    >= 0.49 the nf4 run goes through quantize_language_model's fallback (the CPU repack switched off: the same
    dequantize-and-multiply path as on other CPUs); without it the first validation raises."""
    _, run = runs
    reference = torch.tensor(run("fp32"))
    for mode, tolerance in (("int8", 0.03), ("nf4", 0.15)):
        losses = torch.tensor(run(mode, quantize_language_model=mode))
        gap = ((losses - reference).abs() / reference).max().item()
        assert 0 < gap <= tolerance, (mode, gap, losses.tolist(), reference.tolist())


# ----------------------------------------------------------------------------- the kernel probe


def width_64_options(tmp: Path) -> dict:
    """TrainConfig options for one optimizer step (8 shapes samples) of the tiny InstructBLIP preset with its T5
    widened to 64 (d_model, d_ff, 4 heads of 16): every quantized layer then has 64 inputs and 64 outputs, the
    shapes for which bitsandbytes' CPU repack succeeds and the layer silently loses its backward."""
    preset = json.loads((presets.CONFIGS_DIR / "tiny-instructblip-flan-t5.json").read_text(encoding="utf-8"))
    preset["name"] = "tiny-instructblip-flan-t5-width-64"
    preset["config"]["text_config"].update(d_model=64, d_kv=16, d_ff=64)
    (tmp / "width-64.json").write_text(json.dumps(preset), encoding="utf-8")
    return {
        "base_checkpoint": None,
        "preset": str(tmp / "width-64.json"),
        "image_root": str(data.SHAPES_DIR),
        "train_manifest": str(data.shapes_subset(tmp, "train", 8)),
        "val_manifest": str(data.shapes_subset(tmp, "val", 8)),
        "progress": False,
        "epochs": 1,
        "batch_size": 8,
        "quantize_language_model": "nf4",
    }


def test_the_probe_finds_the_avx512_bf16_repack_fault_and_the_fallback_is_applied_and_stated(bnb, cpu_repack):
    """On this CPU feature the repack raises below 64 inputs (in the no-grad forward) and from 64 on leaves the
    layer without a backward (computing in bf16: an fp32 layer's output is off too); with it switched off the
    same layers are correct. quantize_language_model switches it off on every Linear4bit and says so once."""
    probe = quantization.probe_kernels
    assert re.fullmatch(r"the no-grad forward raises RuntimeError: shape '\[32, 0\]' is invalid .*",
                        probe(bnb, "nf4", (32, 32, False), torch.float32, "cpu"))  # fmt: skip
    assert probe(bnb, "nf4", (64, 64, False), torch.bfloat16, "cpu") == (
        "the input gradient is missing (the kernel has no backward)"
    )
    assert probe(bnb, "nf4", (64, 64, False), torch.float32, "cpu").startswith(
        "the no-grad forward's output differs from F.linear on the dequantized weight by up to "
    )
    mended = (((32, 32, False), torch.float32), ((64, 64, True), torch.float32), ((64, 64, False), torch.bfloat16))
    for shape, dtype in mended:
        assert probe(bnb, "nf4", shape, dtype, "cpu", repack=False) is None, (shape, dtype)
    model = presets.build_model("tiny-instructblip-flan-t5")
    with pytest.warns(quantization.KernelFallbackWarning) as caught:
        assert quantization.quantize_language_model(model, "nf4", torch.float32) == 32
    assert len(caught) == 1
    assert str(caught[0].message).startswith(f"bitsandbytes {bnb.__version__} on cpu (avx512_bf16): its nf4 layers ")
    assert "Switched that repack off (support_avx512bf16_for_cpu=False) on the language model's 32 Linear4bit" in str(
        caught[0].message
    )
    layers = [m for m in quantization.language_model_of(model).modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 32 and not any(layer.support_avx512bf16_for_cpu for layer in layers)


def verdict(found: str | None) -> str:
    """A probe finding without its figures ("... raises RuntimeError: shape ..." -> "... raises RuntimeError")."""
    return "correct" if found is None else found.split(" by up to ")[0].split(":")[0]


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_kernel_verdicts_pinned_per_release_and_cpu_feature(bnb, mode):
    """What the probe finds on the tiny language model's smallest layer (32 x 32, fp32), pinned per release and
    per avx512_bf16 (the CPU feature bitsandbytes' nf4 CPU path turns on; the bitsandbytes release is in the
    recorded environment): nox -s newest then names a kernel that starts or stops failing."""
    shape = (32, 32, False)
    found = {
        "probe": verdict(quantization.probe_kernels(bnb, mode, shape, torch.float32, "cpu")),
        "with the CPU repack off": verdict(quantization.probe_kernels(bnb, mode, shape, torch.float32, "cpu", False)),
    }
    assert found["with the CPU repack off"] == "correct"  # the fallback mends what the repack breaks
    feature = "yes" if "avx512_bf16" in compat.cpu_features()["flags"] else "no"
    check_against_release("quantization_kernels", f"{mode}, 32 x 32 fp32 on the cpu, avx512_bf16: {feature}", found)


def test_correct_kernels_pass_the_probe_and_nothing_is_switched_off(bnb, recwarn):
    """int8 (no repack on any machine) and nf4 without the repack, in fp32 and bf16, biased or not, at the tiny
    model's shapes and a full-size one: within the bound on this machine (a bound too tight fails here)."""
    for mode in ("int8", "nf4"):
        for dtype in (torch.float32, torch.bfloat16):
            for shape in ((32, 32, False), (37, 32, True), (64, 96, True), (2048, 2048, False)):
                found = quantization.probe_kernels(bnb, mode, shape, dtype, "cpu", repack=False)
                assert found is None, (mode, dtype, shape, found)
    quantization.quantize_language_model(presets.build_model("tiny-instructblip-flan-t5"), "int8", torch.float32)
    assert not [w for w in recwarn if issubclass(w.category, quantization.KernelFallbackWarning)]


def test_without_the_repack_the_probe_finds_nothing(bnb, no_cpu_repack, recwarn):
    """Where bitsandbytes takes no AVX512-BF16 repack path the nf4 kernels are correct as they are: no notice."""
    assert quantization.probe_kernels(bnb, "nf4", (32, 32, False), torch.float32, "cpu") is None
    quantization.quantize_language_model(presets.build_model("tiny-instructblip-flan-t5"), "nf4", torch.float32)
    assert not [w for w in recwarn if issubclass(w.category, quantization.KernelFallbackWarning)]


def test_kernels_the_fallback_does_not_mend_are_refused_before_anything_is_written(bnb, monkeypatch, tmp_path):
    """A simulated broken kernel: nf4 layers whose output is 1 % too large (repack or not), int8 layers that raise.
    The refusal names the backend, the release, what differed and what to do; the model keeps its plain layers
    and a training run stops before it writes its log."""
    original = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: original(self, x) * 1.01)
    backend = compat.bitsandbytes_backend(bnb, torch.device("cpu"))
    model = presets.build_model("tiny-instructblip-flan-t5")
    with pytest.raises(quantization.QuantizedKernelError) as refused:
        quantization.quantize_language_model(model, "nf4", torch.float32)
    message = str(refused.value)
    assert message.startswith(f"the nf4 kernels of bitsandbytes {bnb.__version__} compute wrongly on {backend}: ")
    assert "the dequantized weight by up to " in message and "(max abs error; " in message
    assert "Use --quantize-language-model none, or a bitsandbytes release without this fault" in message
    if compat.bitsandbytes_repacks_for_cpu(bnb):  # the first probe fails on the repack, the mended one on the 1 %
        assert (
            "raises RuntimeError: shape '[32, 0]'" in message and "switched off (support_avx512bf16_for_cpu" in message
        )
        assert "pip install 'bitsandbytes<0.49.0' (before its AVX512-BF16 CPU repack)" in message
    assert quantization.quantized_layers(model) == {}

    def broken(self, x):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", broken)
    config = train.TrainConfig(
        **width_64_options(tmp_path) | {"quantize_language_model": "int8", "output_dir": str(tmp_path / "run")}
    )
    with pytest.raises(quantization.QuantizedKernelError, match=re.escape(
        f"the int8 kernels of bitsandbytes {bnb.__version__} compute wrongly on {backend}: on a probe layer (int8, "
        "64 x 64, float32, eval mode as the trainer runs the LM) the no-grad forward raises RuntimeError: simulated "
        f"kernel failure. Training through them would not learn. Use --quantize-language-model none, or a "
        f"bitsandbytes release without this fault: pip install another bitsandbytes release than {bnb.__version__}"
    )):  # fmt: skip
        train.train(config)
    assert not (tmp_path / "run").exists()  # the run lock removes the directory it made: nothing written


@pytest.mark.slow
def test_width_64_nf4_training_changes_the_adapter(bnb, tmp_path):
    """One nf4 step of a width-64 language model: every adapter tensor the step reaches moves (lora_B starts at 0;
    on a CPU with avx512_bf16, bitsandbytes >= 0.49, through the fallback: before it, grad_norm 0.0, unchanged
    adapter, exit 0)."""
    from safetensors.torch import load_file

    train.train(train.TrainConfig(**width_64_options(tmp_path) | {"output_dir": str(tmp_path / "run")}))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if r["type"] == "step"]
    assert len(norms) == 1 and math.isfinite(norms[0]) and norms[0] > 0, norms
    adapter = load_file(tmp_path / "run" / "checkpoints" / "epoch-0001" / "adapter" / "adapter_model.safetensors")
    moved = {name for name, tensor in adapter.items() if "lora_B" in name and bool(tensor.abs().sum() > 0)}
    # the last Q-Former layer's text feed-forward feeds no query token: no gradient in any run
    unreached = {name for name in adapter if re.search(r"layer\.1\.(intermediate|output)\.dense\.lora_B", name)}
    assert len(unreached) == 2
    assert moved == {name for name in adapter if "lora_B" in name} - unreached


@pytest.mark.filterwarnings("ignore:bitsandbytes::gemv_4bit. an autograd kernel was not registered")
def test_without_the_fallback_a_width_64_run_is_refused_or_stops_at_the_zero_gradient(
    cpu_repack, monkeypatch, tmp_path
):
    """The fallback disabled (compat's switch a no-op): the probe refuses; with the probe bypassed too (the code
    before it) the first step's all-zero adapter gradient raises instead of training on with grad_norm 0.0."""
    monkeypatch.setattr(compat, "disable_bitsandbytes_cpu_repack", lambda module: 0)
    options = width_64_options(tmp_path)
    with pytest.raises(quantization.QuantizedKernelError, match=r"with the CPU repack switched off .* too, "):
        train.train(train.TrainConfig(**options | {"output_dir": str(tmp_path / "refused")}))
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(quantization, "check_kernels", lambda *args: None)
    with pytest.raises(numerics.ZeroGradientError, match=r"^zero gradient at optimizer step 0: every trainable "):
        train.train(train.TrainConfig(**options | {"output_dir": str(tmp_path / "silent")}))
