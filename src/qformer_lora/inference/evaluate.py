"""Loading a run or a bare base and writing its report; the answering and scoring themselves
are the core's (qformer_lora/tasks.py, which training's in-loop evaluation shares). Results:
``predictions.jsonl`` (one record per sample), ``results.json`` and ``results.md``, written
together and atomically (:func:`write`).
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from .. import jsonio, writes
from . import generate


def report(results: dict, *, task: str, samples: int, source: str, data_path: str, options) -> dict:
    """The results.json document: the metrics and everything needed to reproduce them."""
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": source,
        "data": data_path,
        "task": task,
        "samples": samples,
        "generation": asdict(options),
        "metrics": results,
    }


def markdown(document: dict) -> str:
    rows = [f"| {name} | {value:.4f} |" for name, value in document["metrics"].items() if isinstance(value, float)]
    header = [
        f"# Evaluation of {document['model']}",
        "",
        f"{document['samples']} samples of {document['data']} ({document['task']}), {document['created']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    return "\n".join(header + rows) + "\n"


def write(out_dir: str | os.PathLike, document: dict, records: list[dict]) -> Path:
    """predictions.jsonl, results.json and results.md into ``out_dir``, all or none: a staging
    directory renamed into place, an existing ``out_dir`` moved aside first and deleted only once the
    new one is in place (restored if that fails). writes.WriteError names ``out_dir`` on ENOSPC, ..."""
    out_dir = Path(out_dir)
    with writes.writing(out_dir, "the evaluation report"):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
        aside = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
        try:
            lines = "".join(jsonio.dumps(r) + "\n" for r in records)  # strict JSON (jsonio)
            (staging / "predictions.jsonl").write_text(lines, encoding="utf-8")
            (staging / "results.json").write_text(jsonio.dumps(document, indent=1), encoding="utf-8")
            (staging / "results.md").write_text(markdown(document), encoding="utf-8")
            if out_dir.exists():
                os.replace(out_dir, aside)
            os.replace(staging, out_dir)
        except BaseException:
            if aside.exists() and not out_dir.exists():
                os.replace(aside, out_dir)  # the previous report, back where it was
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    return out_dir


def load(checkpoint_path=None, base_checkpoint=None, budgets: dict | None = None, device="cpu", adapter=None):
    """(model, input builder, run config or None, name) of a training checkpoint; of a LoRA adapter
    trained elsewhere with plain PEFT (``adapter``, on ``base_checkpoint`` or the base it records);
    or of a bare base or merged checkpoint, with the prompt/answer ``budgets`` given (zero-shot)."""
    config = None
    if checkpoint_path is not None:
        model, processor, _, config = generate.load_trained(checkpoint_path)
        name = str(checkpoint_path)
    elif adapter is not None:
        model, processor, _, _ = generate.load_adapter(adapter, base_checkpoint)
        name = f"{adapter} (adapter on {base_checkpoint or generate.adapter_base(adapter)})"
    else:
        model, processor, _ = generate.load_merged(base_checkpoint)
        name = f"{base_checkpoint} (as saved: zero-shot for a base)"
    model.to(device)
    return model, generate.collator(model, processor, config or budgets), config, name
