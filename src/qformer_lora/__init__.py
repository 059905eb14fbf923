"""qformer-lora: LoRA on the Q-Former of InstructBLIP / BLIP-2, with the failures pinned.

The core is flat; each workflow is a subpackage. A module imports only its own layer and the
layers above it in this list (tests/unit/test_layout.py keeps it so, and finds no cycles)::

    core            what every workflow stands on
      compat.py       the one place that knows how transformers / peft / torch releases differ
      presets.py      preset JSON -> config -> model (build_model, load_model from a local checkpoint)
      lora.py         LoRA confined to the Q-Former: target resolution, scope report, leak refusal
      forward.py      the custom forward: vision encoder -> Q-Former -> language projection -> LM
      precision.py    the one precision table: weights, adapters, autocast, grad scaler
      images.py       image files -> 8-bit RGB: the per-mode conversion table, EXIF orientation
      data.py         JSONL manifests, processors, datasets
      inputs.py       the one builder of model inputs (Collator): training, validation, generation
      metrics.py      VQA accuracy, exact match, multiple choice, BLEU-4 / CIDEr-D (the field's definitions)
      tasks.py        answering and scoring: generation options, task metrics per data (evaluate, --eval-every)
      formats/        dataset formats -> Samples: jsonl, llava, hf, coco, vqav2, scienceqa (detect, read)
      checkpoint.py   adapter (PEFT format) + trainer state (safetensors + JSON), atomic
      synthetic.py    random batches for tests, probes and benchmarks
      jsonio.py       strict JSON for every writer: a non-finite number as the string "NaN" / "Infinity"
      known_warnings.py  upstream warnings the user cannot act on: recorded in the run's log, kept off the terminal
      plotting.py     matplotlib as an optional extra, one colour and marker per series, PNG bytes
    diagnostics/    numerics.py (finite checks, localiser, guard policies), doctor.py (precision doctor)
    training/       run_config.py (options), train.py (setup() and the loop), step.py (the one training
                    step), loader.py (the data pipeline: epoch order, workers, pinned memory),
                    validation.py, run_dir.py (log, resume checks), metrics_log.py
                    (metrics.jsonl + TensorBoard), step_options.py, feature_cache.py,
                    distributed.py (torchrun / DDP), summary.py (a run at a glance), curves.py
                    (curves.png)
    inference/      generate.py (load a trained adapter, ours or plain PEFT's, or a base), export.py (the
                    merged model with a complete processor), model_card.py (its README.md), evaluate.py
                    (qformer-lora evaluate: load, score with tasks.py, write the report)
    bench/          measurement.py (one configuration through the training step), sweep.py,
                    capacity.py (memory model), flops.py (MFU), device.py, reporting.py
                    (ratios, seed table), report_files.py (JSON / Markdown / figures),
                    figures.py (one figure per question)
    repro/          reproduce.py (`qformer-lora reproduce`), trials.py (trial runs of the step),
                    probes.py, compat_probe.py, expectations.py (per-release pinned values),
                    release_diff.py (this release against the recorded ones)
    cli.py          argparse only; imports each workflow inside the command that runs it
    cli_options.py  the CLI's one vocabulary: shared options declared once, from the run config
"""

__version__ = "0.1.0"
