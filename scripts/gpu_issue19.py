"""The prepared H200 run for issue 19: every target in one JSON, in under 8 minutes.

Full-size InstructBLIP-FlanT5-XL from its preset config (random weights, nothing downloaded),
Q-Former LoRA r=8, prompt 32 / answer 16 / instruction 32 tokens, batch 64, bf16, from
640 x 480 JPEG files through the trainer's data pipeline (DataLoader workers, pinned memory).
Phases, in order (PHASES), each timed (``phases_s``):

1. ``end_to_end``: the default configuration (train's step options) against HF's forward
   through PEFT, loop and step alone, samples/s, peak memory, MFU (scripts/gpu_end_to_end.py:
   bench/end_to_end.run, its own model);
2. ``bench``: the model, loader and batches the later phases share (end_to_end.prepare);
3. ``deferred``: the same loop and step with deferred host reads (sync_every 10, fused AdamW,
   guard skip: training/step.deferred_step, read once per interval as train_epoch reads),
   against phase 1's default and native figures: what the host syncs cost;
   ``graphs``: the compiled Q-Former and frozen blocks as CUDA graphs (compile_mode reduce-overhead)
   with deferred host reads, and with the compiled AdamW step instead; the model compiled once, then
   uncompiled for the later phases (its compile time is ``compile_s``);
4. ``quantized``: the frozen language model unquantized, int8 and nf4 (quantization.py), the
   same batches from the same adapter weights: losses against bf16, peak memory, the LM's bytes;
5. ``auto_batch``: ``--batch-size auto``'s own machinery (training/auto_batch.resolve: probe
   steps, the fitted line, a confirming step, bisection) with the nf4 language model under a
   24 GiB cap (bench/device.memory_cap); the issue's target is batch >= 128. Without bitsandbytes
   it runs with the bf16 language model instead. On a CPU the allocator's peaks are replaced by
   a stated fake (FAKE_BYTES_PER_SAMPLE per sample), so the phase's code runs in the CPU test.

bitsandbytes is imported once at the start; where it is missing every quantized item records
``not installed``. A phase that would start after ``--time-limit`` seconds (default 420) records
``skipped: time``; a phase that fails records its error and the rest still run. The JSON is
rewritten after every phase, so a run killed mid-phase keeps what it measured. Writes
``issue19-<card>-<date>.json`` under --out (default: $OUT, else reports/gpu).

    PYTHONPATH=src python3 scripts/gpu_issue19.py --out $OUT                                   # H200
    python scripts/gpu_issue19.py --preset tiny-instructblip-flan-t5 --device cpu --steps 2   # CPU check

Expected on an H200: about 4-5 minutes (two full-size builds, about 100 timed steps, two
quantizations, five to ten steps at the auto batch); reports/gpu/README.md says how to run it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_end_to_end, beside this script

import gpu_end_to_end  # noqa: E402
import torch  # noqa: E402 - after the path set-up above

from qformer_lora import compat, jsonio, known_warnings, precision, quantization  # noqa: E402
from qformer_lora.bench import end_to_end, flops, report_files  # noqa: E402
from qformer_lora.bench.capacity import GIB  # noqa: E402
from qformer_lora.bench.device import device_info, free_memory, memory_cap  # noqa: E402
from qformer_lora.training import auto_batch, step_options  # noqa: E402

TIME_LIMIT_S = 420  # no phase starts after this: the slowest (auto_batch) then still ends inside 8 minutes
FAKE_BYTES_PER_SAMPLE = GIB  # the CPU stand-in for the allocator's peak: 1 GiB per sample, nothing fixed
TARGET_BATCH = 128  # issue 19: the 4-bit LM fits batch >= 128 on a 24 GiB budget


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_issue19.py", description=__doc__.split("\n\n")[0])
    gpu_end_to_end.add_arguments(p)
    p.add_argument("--sync-every", type=int, default=10, help="deferred host reads' interval (default: 10)")
    p.add_argument(
        "--quantized-batches", type=int, default=4, help="batches per quantized comparison, >= 2 (default: 4)"
    )
    p.add_argument("--budget-gib", type=float, default=24.0, help="the capped card for auto (default: 24)")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help=f"seconds (default: {TIME_LIMIT_S})")
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated phases to run (default: all)")
    args = p.parse_args(argv)
    args.phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown or args.quantized_batches < 2:
        p.error(f"unknown phases {unknown} (known: {', '.join(PHASES)})" if unknown else "--quantized-batches < 2")
    return args


@dataclasses.dataclass
class State:
    """What the phases share; ``report`` is the JSON, rewritten to ``path`` after every phase."""

    args: argparse.Namespace
    config: object  # run_config.TrainConfig: the default configuration
    device: torch.device
    started: float  # time.perf_counter() at the start
    image_dir: str
    report: dict
    path: Path
    bench: end_to_end.Bench | None = None
    batches: list | None = None  # the bench's batches, collated and on the device

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def bitsandbytes_ok(self) -> bool:
        return self.report["bitsandbytes"].startswith("installed")


def bitsandbytes_status() -> str:
    """ "installed <version>", or "not installed (<why>)" (its import can also fail on a broken CUDA set-up)."""
    try:
        import bitsandbytes
    except Exception as err:  # noqa: BLE001 - recorded: the quantized items are skipped, not the run
        return f"not installed ({type(err).__name__}: {str(err).strip()[:200]})"
    return f"installed {bitsandbytes.__version__}"


def header(args: argparse.Namespace, argv, device: torch.device) -> dict:
    return {
        "schema": 1,
        "kind": "issue19",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["scripts/gpu_issue19.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": device_info(device),
        "versions": compat.versions(),
        "bitsandbytes": bitsandbytes_status(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "time_limit_s": args.time_limit,
        "phases_s": {},
        "wall_s": 0.0,
    }


def set_deterministic(enabled: bool) -> None:
    """torch's deterministic mode as train sets it (train's default): for the phases after the first."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)


def run_phase(state: State, name: str) -> None:
    """One phase into ``state.report[name]`` with its status and time; the JSON rewritten after it."""
    began = time.perf_counter()
    if name not in state.args.phases:
        result = {"status": "skipped: not asked (--phases)"}
    elif state.elapsed() > state.args.time_limit:
        result = {"status": "skipped: time", "elapsed_s": state.elapsed()}
    else:
        try:
            result = {"status": "done"} | PHASES[name](state)
        except Exception as err:  # noqa: BLE001 - recorded; a one-shot GPU run goes on with the next phase
            result = {"status": f"error: {type(err).__name__}: {str(err).strip()[:300]}"}
            result["traceback"] = traceback.format_exc()[-3000:]
        free_memory()
    state.report[name] = result
    state.report["phases_s"][name] = time.perf_counter() - began
    state.report["wall_s"] = state.elapsed()
    jsonio.write(state.path, state.report)  # a run killed in a later phase keeps this one
    print(f"[{state.elapsed():6.1f} s] {name}: {result['status']}", flush=True)


# ----------------------------------------------------------------------------- 1. default vs native


def phase_end_to_end(state: State) -> dict:
    """The default configuration against the native loop (scripts/gpu_end_to_end.measure: once
    more without deterministic mode if that mode broke a measurement; the later phases follow)."""
    report = gpu_end_to_end.measure(state.config, state.args)
    if "deterministic_failed" in report:
        state.config = dataclasses.replace(state.config, deterministic=False)
    return {"report": report}


# ----------------------------------------------------------------------------- 2. the shared bench


def phase_bench(state: State) -> dict:
    """The model, loader and batches of the later phases, built as end_to_end.run builds them."""
    args, config = state.args, state.config
    set_deterministic(config.deterministic)
    steps = max(args.warmup + args.steps, args.quantized_batches)
    manifest = end_to_end.write_images(state.image_dir, config.batch_size * steps, seed=config.seed)
    began = time.perf_counter()
    state.bench = end_to_end.prepare(config, manifest, state.device)
    built = time.perf_counter() - began
    state.batches = end_to_end.collated(state.bench)
    return {
        "build_s": built,
        "batches": len(state.batches),
        "samples": config.batch_size * steps,
        "deterministic": config.deterministic,
        "num_workers": state.bench.workers,
        **language_model_weights(state.bench.model),
    }


def needs_bench(state: State) -> dict | None:
    if state.bench is None or state.batches is None:
        return {"status": "skipped: no bench (the bench phase did not run or failed)"}
    return None


# ----------------------------------------------------------------------------- 3. deferred host reads


def measure_deferred(state: State, mode: str) -> dict:
    """One deferred measurement (loop or step) from the initial adapter weights (end_to_end.measure with
    sync_every: read once per interval as train_epoch reads); errors recorded."""
    args = state.args
    config = dataclasses.replace(state.config, sync_every=args.sync_every, fused_optimizer=True, guard="skip")
    bench = dataclasses.replace(state.bench, config=config)
    return end_to_end.measure(bench, "custom", mode, args.warmup, args.steps, state.batches)


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def versus(timing: dict, reference: dict | None) -> dict:
    """Speed-up (samples/s over the reference's), memory ratio (peak allocated over its) and host ms saved."""
    reference = reference if reference and "error" not in reference else {}
    return {
        "speedup": _ratio(timing.get("samples_per_s"), reference.get("samples_per_s")),
        "memory_ratio": _ratio(timing.get("peak_allocated_bytes"), reference.get("peak_allocated_bytes")),
        "step_ms_saved": None
        if "step_ms" not in timing or "step_ms" not in reference
        else reference["step_ms"] - timing["step_ms"],
    }


def phase_deferred(state: State) -> dict:
    """Loop and step with deferred host reads, MFU, and ratios to phase 1's default and native."""
    skipped = needs_bench(state)
    if skipped:
        return skipped
    e2e = (state.report.get("end_to_end") or {}).get("report") or {}
    peak = flops.peak_flops(state.report["device"]["name"], state.config.precision)
    results, compared = {}, {}
    for mode in end_to_end.MODES:
        timing = results[mode] = measure_deferred(state, mode)
        if "error" not in timing:
            timing["mfu"] = flops.mfu(timing["samples_per_s"], e2e.get("flops_per_sample"), peak)
        compared[mode] = {
            name: versus(timing, e2e.get("results", {}).get(name, {}).get(mode)) for name in end_to_end.FORWARDS
        }
    loop = compared["loop"]["native"]
    met = (
        None
        if None in (loop["speedup"], loop["memory_ratio"])
        else loop["speedup"] >= 2 and loop["memory_ratio"] <= 0.5
    )
    options = {"sync_every": state.args.sync_every, "fused_optimizer": True, "guard": "skip"}
    return {"options": options, "results": results, "versus": compared, "target_met": met}


# ----------------------------------------------------------------------------- 3b. CUDA graphs


def graph_configs(state: State) -> dict:
    """The CUDA-graph configurations: the compiled Q-Former and frozen blocks replayed as CUDA graphs
    (compile_mode reduce-overhead), with deferred host reads (no host sync inside the step, so the
    replays run back to back: what should remove the host bound), and with the AdamW step compiled
    instead (it reads every step: fused AdamW's found_inf, which deferred reads need, is not compiled)."""
    graphs = dict(compile_mode="reduce-overhead", compile_qformer=True, compile_frozen=True)
    return {
        "graphs_deferred": dataclasses.replace(
            state.config, **graphs, sync_every=state.args.sync_every, fused_optimizer=True, guard="skip"
        ),
        "graphs_compiled_optimizer": dataclasses.replace(
            state.config, **graphs, compile_optimizer=True, fused_optimizer=False
        ),
    }


def phase_graphs(state: State) -> dict:
    """Each of graph_configs, loop and step, against phase 1's default and native; the model is
    compiled once (probed on the first batch: the compile time is ``compile_s``) and uncompiled after."""
    skipped = needs_bench(state)
    if skipped:
        return skipped
    e2e = (state.report.get("end_to_end") or {}).get("report") or {}
    peak = flops.peak_flops(state.report["device"]["name"], state.config.precision)
    configs = graph_configs(state)
    began = time.perf_counter()
    first = dataclasses.replace(state.bench, config=next(iter(configs.values())))
    try:
        choices = [c.as_dict() for c in end_to_end.compile_model(first, state.batches[0])]
        compile_s = time.perf_counter() - began
        results, compared = {}, {}
        for name, config in configs.items():
            bench = dataclasses.replace(state.bench, config=config)
            results[name], compared[name] = {}, {}
            for mode in end_to_end.MODES:
                timing = results[name][mode] = end_to_end.measure(
                    bench, "custom", mode, state.args.warmup, state.args.steps, state.batches
                )
                if "error" not in timing:
                    timing["mfu"] = flops.mfu(timing["samples_per_s"], e2e.get("flops_per_sample"), peak)
                compared[name][mode] = {
                    ref: versus(timing, e2e.get("results", {}).get(ref, {}).get(mode)) for ref in end_to_end.FORWARDS
                }
    finally:
        step_options.uncompile_step_modules(state.bench.model)  # the later phases measure the eager model
        torch._dynamo.reset()  # and the graphs' memory pools go
    options = {name: {k: getattr(c, k) for k in OPTIONS_SHOWN} for name, c in configs.items()}
    return {"options": options, "compile": choices, "compile_s": compile_s, "results": results, "versus": compared}


OPTIONS_SHOWN = (
    "compile_mode",
    "compile_qformer",
    "compile_frozen",
    "compile_optimizer",
    "sync_every",
    "fused_optimizer",
)


# ----------------------------------------------------------------------------- 4. the quantized LM


def language_model_weights(model) -> dict:
    """The language model's parameter bytes and parameter count per dtype (int8 / uint8 once quantized)."""
    params = list(quantization.language_model_of(model).parameters())
    dtypes = Counter()
    for p in params:
        dtypes[str(p.dtype).removeprefix("torch.")] += p.numel()
    return {
        "language_model_bytes": sum(p.numel() * p.element_size() for p in params),
        "language_model_dtypes": dict(sorted(dtypes.items())),
    }


@contextlib.contextmanager
def quantized_copy(bench, mode: str):
    """``bench.model`` with a quantized copy of its language model (``mode``); yields the number of
    layers quantized. The original waits on the host meanwhile, so the peaks measured are the
    quantized model's, and is put back after (Q-Former scope: LoRA is not in the language model)."""
    if mode == "none":
        yield 0
        return
    model = compat.unwrap(bench.model)
    step_options.set_lm_checkpointing(bench.model, False)  # its hooks stay off the copy; step_parts sets it
    original = model.language_model
    model.language_model = copy.deepcopy(original)
    original.to("cpu")
    try:
        yield quantization.quantize_language_model(bench.model, mode, precision.get(bench.config.precision).weights)
    finally:
        model.language_model = original.to(bench.device)
        free_memory()


def quantized_item(state: State, mode: str) -> dict:
    """The step alone on the first --quantized-batches batches (1 untimed) with the LM per ``mode``."""
    if mode != "none" and not state.bitsandbytes_ok:
        return {"status": "not installed"}
    if state.elapsed() > state.args.time_limit:
        return {"status": "skipped: time"}
    began = time.perf_counter()
    try:
        with quantized_copy(state.bench, mode) as layers:
            weights = language_model_weights(state.bench.model)
            timing = end_to_end.measure(
                state.bench, "custom", "step", 1, state.args.quantized_batches - 1, state.batches
            )
    except Exception as err:  # noqa: BLE001 - recorded (e.g. bitsandbytes without kernels for this device)
        return {"status": f"error: {type(err).__name__}: {str(err).strip()[:300]}"}
    status = "done" if "error" not in timing else "error: " + timing["error"]
    return {"status": status, "quantized_layers": layers, **weights, "wall_s": time.perf_counter() - began} | {
        "timing": timing
    }


def loss_difference(reference: dict, other: dict) -> dict | None:
    """Per batch |loss - bf16 loss| (per answer token) and its largest relative size; None if either is missing."""
    ref, got = (item.get("timing", {}).get("losses") for item in (reference, other))
    if not ref or not got:
        return None
    diffs = [abs(a - b) for a, b in zip(got, ref)]
    return {"abs": diffs, "max_abs": max(diffs), "max_rel": max(d / abs(r) for d, r in zip(diffs, ref))}


def phase_quantized(state: State) -> dict:
    """The same batches through the unquantized, int8 and nf4 language models: losses and peaks."""
    skipped = needs_bench(state)
    if skipped:
        return skipped
    results = {mode: quantized_item(state, mode) for mode in quantization.MODES}
    differences = {mode: loss_difference(results["none"], results[mode]) for mode in ("int8", "nf4")}
    return {"batches": state.args.quantized_batches, "results": results, "loss_vs_unquantized": differences}


# ----------------------------------------------------------------------------- 5. --batch-size auto on 24 GiB


class FakeMemory:
    """auto_batch's memory reader on a CPU: the real probe steps run, their peak is stated
    (FAKE_BYTES_PER_SAMPLE x batch), the budget is the asked one. Exercises the phase, not the card."""

    def __init__(self, budget_gib: float):
        self.budget_gib = budget_gib

    def budget(self) -> tuple[int, str]:
        return int(self.budget_gib * GIB), "--memory-budget-gib"

    def peak_of_step(self, run_step) -> int:
        return run_step().samples * FAKE_BYTES_PER_SAMPLE


def phase_auto_batch(state: State) -> dict:
    """auto_batch.resolve with the nf4 LM (bf16 without bitsandbytes) under a --budget-gib cap.
    Quantizes the bench's language model in place: the last phase, nothing needs it in 16 bit after."""
    skipped = needs_bench(state)
    if skipped:
        return skipped
    bench, args = state.bench, state.args
    mode = "nf4" if state.bitsandbytes_ok else "none"
    state.batches = None  # the pre-collated batches are not part of a training run's memory
    step_options.set_lm_checkpointing(bench.model, False)
    layers = quantization.quantize_language_model(bench.model, mode, precision.get(state.config.precision).weights)
    step_options.set_lm_checkpointing(bench.model, state.config.lm_checkpointing)
    free_memory()
    config = dataclasses.replace(
        state.config, batch_size="auto", memory_budget_gib=args.budget_gib, quantize_language_model=mode
    )
    cuda = bench.device.type == "cuda"
    dataset, collator = bench.loader.loader.dataset, bench.loader.loader.collate_fn
    with memory_cap(int(args.budget_gib * GIB), bench.device) as fraction:
        _, record = auto_batch.resolve(
            config, bench.model, collator, dataset, bench.device, memory=None if cuda else FakeMemory(args.budget_gib)
        )
    return {
        "quantize_language_model": mode,
        "quantized_layers": layers,
        "budget_gib": args.budget_gib,
        "cap_fraction": fraction,
        "memory_reader": "CUDA allocator under the cap" if cuda else f"fake: {FAKE_BYTES_PER_SAMPLE} bytes per sample",
        "batch_size": record["batch_size"],
        "target_batch": TARGET_BATCH,
        "target_met": record["batch_size"] >= TARGET_BATCH if cuda and mode == "nf4" else None,
        "record": record,
    }


PHASES = {
    "end_to_end": phase_end_to_end,
    "bench": phase_bench,
    "deferred": phase_deferred,
    "graphs": phase_graphs,
    "quantized": phase_quantized,
    "auto_batch": phase_auto_batch,
}


# ----------------------------------------------------------------------------- the run


def targets(report: dict) -> dict:
    """The issue's targets from the phases' figures; None where a figure is missing."""
    e2e = (report.get("end_to_end") or {}).get("report") or {}
    loop = e2e.get("custom_vs_native", {}).get("loop", {})
    deferred = report.get("deferred") or {}
    deferred_loop = (deferred.get("results") or {}).get("loop") or {}
    auto = report.get("auto_batch") or {}
    return {
        "default_loop_speedup": loop.get("speedup"),
        "default_loop_memory_ratio": loop.get("memory_ratio"),
        "default_2x_native_at_half_memory": (e2e.get("targets") or {}).get("met"),
        "default_loop_mfu": ((e2e.get("results") or {}).get("custom", {}).get("loop") or {}).get("mfu"),
        "deferred_loop_speedup": ((deferred.get("versus") or {}).get("loop") or {}).get("native", {}).get("speedup"),
        "deferred_2x_native_at_half_memory": deferred.get("target_met"),
        "deferred_loop_mfu": deferred_loop.get("mfu"),
        **{
            f"{name}_loop_speedup": _native_speedup(report, name)
            for name in ("graphs_deferred", "graphs_compiled_optimizer")
        },
        "auto_batch_on_budget": auto.get("batch_size"),
        "nf4_batch_at_least_128_on_24_gib": auto.get("target_met"),
    }


def _native_speedup(report: dict, name: str) -> float | None:
    """The graphs phase's configuration ``name``: its loop's samples/s over the native loop's."""
    versus_native = ((report.get("graphs") or {}).get("versus") or {}).get(name, {}).get("loop", {})
    return versus_native.get("native", {}).get("speedup")


def output_path(report: dict, out: str | None) -> Path:
    folder = Path(out or os.environ.get("OUT") or report_files.default_report_dir())
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"issue19-{report_files.report_stem(report)}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    device, started = torch.device(args.device), time.perf_counter()
    report = header(args, argv, device)
    path = output_path(report, args.out)
    with tempfile.TemporaryDirectory(prefix="qformer-lora-issue19-") as image_dir, known_warnings.Recorder():
        state = State(args, gpu_end_to_end.default_config(args), device, started, image_dir, report, path)
        for name in PHASES:
            run_phase(state, name)
        state.bench = state.batches = None
    report["targets"], report["wall_s"] = targets(report), time.perf_counter() - started
    jsonio.write(path, report)
    print(f"targets: {report['targets']}\nwall {report['wall_s']:.0f} s\njson: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
