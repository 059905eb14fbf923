"""Report files of a bench sweep: JSON, Markdown and one PNG per figure, written atomically.

``<stem>.json`` (strict JSON, jsonio), ``<stem>.md`` and ``<stem>-<figure>.png`` for each
figure of bench/figures.py the report has data for; the Markdown shows each figure under its
section. Files are written atomically (temporary file, then os.replace); without matplotlib
the figures are skipped with a note. The numbers come from bench/reporting.py. The end-to-end
benchmark (bench/end_to_end.py) writes ``end-to-end-<stem>-<precision>-b<batch>.json`` / ``.md``.

``python -m qformer_lora.bench.report_files REPORT.json [--out DIR]`` re-summarises a saved
report (e.g. after a summary was added) and rewrites its Markdown and figures.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .. import jsonio, plotting, writes
from . import figures as report_figures
from .capacity import GIB, budgets
from .measurement import OPTIONS_BATCH, ran
from .reporting import TARGETS, summarise

# ----------------------------------------------------------------------------- report files


def report_stem(report: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"]["name"].lower()).strip("-") or "device"
    return f"{slug}-{report['created'][:10]}"


def default_report_dir() -> Path:
    return Path(os.environ.get("QFORMER_LORA_REPORT_DIR") or Path("reports") / "gpu")


def figure_path(out_dir: Path, report: dict, name: str) -> Path:
    return out_dir / f"{report_stem(report)}-{name}.png"


def write_reports(report: dict, out_dir: str | os.PathLike | None = None, *, plot: bool = True) -> dict:
    """<gpu-slug>-<date>.json / .md and the figures under ``out_dir``.

    Returns {"json": path, "md": path, "figures": {figure name: path}}; "figures" is None when
    matplotlib is not installed (or ``plot`` is false: a partial report during the sweep).
    Drawing replaces the stem's figures of an earlier rendering, so none is left stale."""
    out_dir = Path(out_dir) if out_dir is not None else default_report_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report_stem(report)
    drawn = report_figures.draw(report) if plot else None
    if plot and drawn is None:
        print(plotting.missing("the report's figures"))
    written = {}
    for name, png in (drawn or {}).items():
        written[name] = figure_path(out_dir, report, name)
        writes.atomic(written[name], png, "the report's figure")
    if drawn is not None:  # a figure with no data this time, or the single PNG of earlier versions
        for stale in [figure_path(out_dir, report, n) for n in report_figures.FIGURES if n not in drawn]:
            stale.unlink(missing_ok=True)
        (out_dir / f"{stem}.png").unlink(missing_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    jsonio.write(paths["json"], report)
    writes.atomic(paths["md"], markdown(report, {n: p.name for n, p in written.items()}), "the Markdown report")
    return paths | {"figures": written if drawn is not None else None}


def print_paths(paths: dict) -> None:
    """One line per report file that write_reports wrote (or skipped)."""
    print(f"json: {paths['json']}\nmd: {paths['md']}")
    if paths["figures"] is None:
        print("figures: skipped (matplotlib is not installed)")
    for name, path in (paths["figures"] or {}).items():
        print(f"figure ({name}): {path}")


def _num(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _md_results(report: dict) -> list[str]:
    """Title, settings and the measured table: one row per configuration and batch size."""
    dev, seq, v, s = report["device"], report["sequence"], report["versions"], report["settings"]
    lines = [
        f"# Memory and speed against batch size: {dev['name']}",
        "",
        f"{report['created']}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; "
        f"driver {dev.get('driver_version') or '-'}, CUDA {dev.get('cuda_runtime') or '-'}.",
        f"Prompt {seq['prompt_len']}, answer {seq['answer_len']}, instruction {seq['instruction_len']} tokens; "
        f"{s['measured_steps']} measured steps after {s['warmup_steps']} warm-up; {s['optimizer']}.",
        "",
        "| configuration | image px | batch | peak allocated GiB | peak reserved GiB | step ms | samples/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in report["points"]:
        for r in e["results"]:
            if ran(r):
                cells = [
                    _num(r["peak_allocated_gib"]),
                    _num(r["peak_reserved_gib"]),
                    _num(1000 * r["step_time_s"], ".1f"),
                    _num(r["samples_per_s"]),
                ]
            else:
                cells = ["OOM" if r["oom"] else f"failed: {r['error']}"] + [""] * 3
            lines.append(f"| {e['label']} | {e['image_size']} | {r['batch_size']} | " + " | ".join(cells) + " |")
    return lines


def _md_memory_model(report: dict) -> list[str]:
    """The fitted memory model and the max batch per budget."""
    dev = report["device"]
    lines = []
    names = list(budgets(dev.get("total_memory_bytes")))
    lines += [
        "",
        "## Memory model: peak allocated = a + b x batch",
        "",
        "| configuration | a GiB | b GiB/sample | " + " | ".join(f"max batch {n}" for n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for e in (e for e in report["points"] if e["memory_model"]):
        m = e["memory_model"]
        lines.append(
            f"| {e['label']} | {m['allocated']['a'] / GIB:.2f} | {m['allocated']['b'] / GIB:.3f} | "
            + " | ".join(_num(m["max_batch"].get(n), "d") for n in names)
            + " |"
        )
    return lines


def _md_seed_and_forwards(report: dict) -> list[str]:
    """The seed's table and the custom / native ratios."""
    lines = []
    lines += [
        "",
        "## The seed's table: max batch on 24 GiB",
        "",
        "| configuration | seed | fp32 weights | bf16 weights |",
        "|---|---|---:|---:|",
    ]
    lines += [
        f"| {r['row']} | {r['seed']} | {_num(r['fp32'], 'd')} | {_num(r['bf16'], 'd')} |" for r in report["seed_table"]
    ]
    lines += [
        "",
        "## Custom vs native forward (custom / native)",
        "",
        "| configuration | batch | memory | step time |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {c['label']} | {c['batch_size']} | {_num(c['memory_ratio'])} | {_num(c['time_ratio'])} |"
        for c in report["comparisons"]
    ]
    return lines


def _md_options(report: dict) -> list[str]:
    """The step options against the native forward, with MFU."""
    lines = []
    option_batches = sorted({o["batch_size"] for o in report.get("options", [])}) or [OPTIONS_BATCH]
    lines += [
        "",
        f"## Step options at batch {', '.join(map(str, option_batches))} against the native forward",
        "",
        f"Targets: samples/s >= {TARGETS['speedup']:g}x native, peak memory <= {TARGETS['memory_ratio']:g}x "
        f"native. MFU = samples/s x the plain custom step's counted FLOPs per sample / the card's dense "
        f"16-bit peak.",
        "",
        "| configuration | samples/s | peak allocated GiB | speed-up | memory ratio | GFLOP/sample | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for o in report.get("options", []):
        if o["error"]:
            lines.append(f"| {o['label']} | failed: {o['error']} | | | | | |")
            continue
        label = o["label"] + (f" (not used: {'; '.join(o['not_used'])})" if o.get("not_used") else "")
        lines.append(
            f"| {label} | {_num(o['samples_per_s'], '.1f')} | {_num(o['peak_allocated_gib'])} | "
            f"{_num(o['speedup'])} | {_num(o['memory_ratio'])} | "
            f"{_num(o['flops_per_sample'] and o['flops_per_sample'] / 1e9, '.1f')} | {_num(o['mfu'], '.1%')} |"
        )
    return lines


def _md_checks(report: dict) -> list[str]:
    """The held-out check and the capped prediction check."""
    lines = []
    lines += [
        "",
        "## Memory model on a held-out batch (fitted without the largest batch)",
        "",
        "| configuration | fitted on | held-out batch | predicted GiB | measured GiB | error |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {h['label']} | {', '.join(map(str, h['fitted_on']))} | {h['batch_size']} | {h['predicted_gib']:.2f} | "
        f"{h['measured_gib']:.2f} | {h['relative_error']:+.1%} |"
        for h in report.get("holdout", [])
    ]
    lines += ["", "## Prediction check (under a memory cap)", ""]
    lines += [
        f"- {x['label']}: {x['reason']}"
        if x["status"] != "done"
        else f"- {x['label']}, {x['budget_gib']:g} GiB cap: predicted {x['predicted']}, measured {x['measured']}"
        f" (error {_num(x['relative_error'], '.1%')}; probes {x['probes']})"
        for x in report["validation"]
    ]
    return lines


def markdown(report: dict, figures: dict[str, str] | None = None) -> str:
    """The report as Markdown: one section per question the sweep answers, each followed by its
    figure when ``figures`` (figure name -> file name beside the Markdown) has one."""
    sections = (
        (_md_results, "throughput"),
        (_md_memory_model, "memory"),
        (_md_seed_and_forwards, "seed-table"),
        (_md_options, "options"),
        (_md_checks, None),
    )
    lines = []
    for section, figure in sections:
        lines += section(report)
        if figure in (figures or {}):
            lines += ["", f"![{figure}]({figures[figure]})"]
    return "\n".join(lines + ["", "## Summary", "", report["paragraph"], ""])


# ----------------------------------------------------------------------------- end-to-end reports


def end_to_end_stem(report: dict) -> str:
    """``end-to-end-<card>-<date>-<precision>-b<batch>``: one file per measured configuration."""
    config = report["config"]
    return f"end-to-end-{report_stem(report)}-{config['precision']}-b{config['batch_size']}"


def end_to_end_markdown(report: dict) -> str:
    """A bench/end_to_end.py report as Markdown: one row per forward and mode, then the summary."""
    dev, seq, v, s = report["device"], report["sequence"], report["versions"], report["settings"]
    lines = [
        f"# The training loop end to end, from JPEG files: {dev['name']}",
        "",
        f"{report['created']}; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}. "
        f"Prompt {seq['prompt_len']}, answer {seq['answer_len']}, instruction {seq['instruction_len']} tokens; "
        f"{s['measured_steps']} measured steps after {s['warmup_steps']} warm-up.",
        "",
        "| forward | measured | samples/s | step ms | loader wait ms/batch | peak allocated GiB | MFU |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, modes in report["results"].items():
        for mode, t in modes.items():
            if "error" in t:
                lines.append(f"| {name} | {mode} | failed: {t['error']} | | | | |")
                continue
            lines.append(
                f"| {name} | {mode} | {_num(t['samples_per_s'], '.1f')} | {_num(t['step_ms'], '.1f')} | "
                f"{_num(t['loader_wait_ms_per_batch'], '.1f')} | {_num(t['peak_allocated_gib'])} | "
                f"{_num(t.get('mfu'), '.1%')} |"
            )
    return "\n".join(lines + ["", "## Summary", "", report["paragraph"], ""])


def write_end_to_end(report: dict, out_dir: str | os.PathLike | None = None) -> dict:
    """<end_to_end_stem>.json and .md under ``out_dir`` (default: default_report_dir()), atomically;
    returns {"json": path, "md": path}."""
    out_dir = Path(out_dir) if out_dir is not None else default_report_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = end_to_end_stem(report)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    jsonio.write(paths["json"], report)
    writes.atomic(paths["md"], end_to_end_markdown(report), "the Markdown report")
    return paths


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m qformer_lora.bench.report_files",
        description="Re-summarise a saved bench report and rewrite its Markdown and figures.",
    )
    parser.add_argument("report", type=Path, help="a <gpu>-<date>.json written by `qformer-lora bench`")
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: beside the report)")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
        paths = write_reports(summarise(report), args.out or args.report.parent)
    except (OSError, ValueError, KeyError) as err:
        parser.exit(2, f"{args.report}: not a bench report ({type(err).__name__}: {err})\n")
    print_paths(paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
