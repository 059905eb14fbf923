#!/usr/bin/env python3
"""Aggregate reports/compat/*.json (one per transformers x peft pair) into reports/COMPAT.md.

    python scripts/compat_report.py [--in reports/compat] [--out reports/COMPAT.md]

(`nox -s compat_report` runs this.) Standard library only, so it runs anywhere. One table
per failure mode, rows = releases in version order, with the exact messages; then the
boundaries: the first release in the matrix where each behaviour differs from the one
before it. The matrix is sparse, so a boundary is stated as "between the last release
with the old behaviour and the first with the new one".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TASK_TYPES = ("SEQ_2_SEQ_LM", "CAUSAL_LM", "FEATURE_EXTRACTION", "None")
PRESET_LABELS = {
    "tiny-instructblip-flan-t5": "IB-T5",
    "tiny-instructblip-vicuna": "IB-LLaMA",
    "tiny-blip2-flan-t5": "B2-T5",
    "tiny-blip2-opt": "B2-OPT",
}
FULL_PRESET = "instructblip-flan-t5-xl"


def version_key(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", text)[:3])


BOUNDARIES_FILE = "boundaries.json"  # scripts/bisect_boundary.py's output, not a pair's report


def load_reports(folder: Path) -> list[dict]:
    reports = []
    for path in sorted(folder.glob("*.json")):
        if path.name == BOUNDARIES_FILE:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        data["_file"] = path.name
        versions = data.get("versions") or {}
        requested = data.get("requested") or {}
        data["_t"] = versions.get("transformers") or requested.get("transformers") or path.stem.split("-")[0]
        data["_p"] = versions.get("peft") or requested.get("peft") or path.stem.split("-")[-1]
        reports.append(data)
    return sorted(reports, key=lambda d: (version_key(d["_t"]), version_key(d["_p"])))


def release(d: dict) -> str:
    return f"{d['_t']} / {d['_p']}"


def usable(d: dict) -> bool:
    return (d.get("install") or {}).get("status") == "ok" and (d.get("import") or {}).get("status") == "ok"


def outcome_text(o: dict | None) -> str:
    if not o:
        return "not observed"
    if o.get("status") == "ok":
        return "ok" if o.get("loss_finite", True) else "ok, loss not finite"
    if o.get("status") == "ok-no-loss":
        return "ok, no loss"
    return f"{o.get('exception')}: {o.get('message')}"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class Messages:
    """Exact messages numbered once (E1, E2, ...) so tables stay readable."""

    def __init__(self):
        self.codes: dict[str, str] = {}

    def code(self, text: str) -> str:
        if text in ("ok", "not observed"):
            return text
        if text not in self.codes:
            self.codes[text] = f"E{len(self.codes) + 1}"
        return self.codes[text]

    def render(self) -> list[str]:
        lines = []
        for text, code in self.codes.items():
            if "\n" in text or len(text) > 300:
                lines += [f"* **{code}**:", "", "  ```", *("  " + line for line in text.splitlines()), "  ```"]
            else:
                lines.append(f"* **{code}**: `{text}`")
        return lines


def grouped(outcomes: dict[str, str]) -> str:
    """'ok' when every preset agrees, else 'E1 (IB-T5, IB-LLaMA); ok (B2-T5, B2-OPT)'."""
    by_value: dict[str, list[str]] = {}
    for preset, value in outcomes.items():
        by_value.setdefault(value, []).append(PRESET_LABELS.get(preset, preset))
    if len(by_value) == 1:
        return next(iter(by_value))
    return "; ".join(f"{v} ({', '.join(p)})" for v, p in by_value.items())


# ----------------------------------------------------------------------------- sections
def section_pairs(rows: list[dict]) -> list[str]:
    lines = [
        "## Pairs run",
        "",
        "| transformers | peft | python | torch | accelerate | huggingface_hub | tokenizers | numpy | install | "
        "tests passed / failed | probe / whole session |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in rows:
        v = d.get("versions") or {}
        install = d.get("install") or {}
        if install.get("status") != "ok":
            status = f"**failed** at step {install.get('step', '?')}"
        elif (d.get("import") or {}).get("status") != "ok":
            status = f"installed; **import failed**: {outcome_text(d.get('import'))}"
        else:
            status = "ok"
        tests = d.get("tests") or {}
        passed = sum(t.get("passed", 0) for t in tests.values())
        failed = sum(t.get("failures", 0) + t.get("errors", 0) for t in tests.values())
        empty = [n for n, t in tests.items() if not t.get("tests")]
        test_text = (
            f"{passed} / {failed}" + (f" (nothing collected: {', '.join(empty)})" if empty else "")
            if tests
            else "not run"
        )
        probe = f"{d['probe_seconds']} s" if "probe_seconds" in d else "—"
        if "session_seconds" in d:
            probe += f" / {d['session_seconds']} s"
        lines.append(
            f"| {d['_t']} | {d['_p']} | {v.get('python', '—')} | {v.get('torch', '—')} | "
            f"{v.get('accelerate', '—')} | {v.get('huggingface-hub', '—')} | {v.get('tokenizers', '—')} | "
            f"{v.get('numpy', '—')} | {cell(status)} | {test_text} | {probe} |"
        )
    failures = [d for d in rows if (d.get("install") or {}).get("status") != "ok"]
    for d in failures:
        lines += [
            "",
            f"Install failure, transformers {release(d)} (pip's last lines):",
            "",
            "```",
            (d.get("install") or {}).get("pip_output_tail", "").strip(),
            "```",
        ]
    return lines


def section_kwarg_conflict(rows: list[dict]) -> list[str]:
    messages = Messages()
    lines = [
        "## 1. The library's own forward through PEFT wrappers (the seed's kwarg conflict)",
        "",
        "`get_peft_model(model, LoraConfig(target_modules=[query, key, value, dense], task_type=T))`, then "
        "`peft_model(**native inputs)` on the tiny presets (IB = InstructBLIP, B2 = BLIP-2). The custom "
        "forward ran through the same wrapper in every cell; where it did not succeed the cell says so.",
        "",
        "| transformers / peft | " + " | ".join(TASK_TYPES) + " |",
        "|---|" + "---|" * len(TASK_TYPES),
    ]
    for d in rows:
        if not usable(d):
            lines.append(f"| {release(d)} | " + " | ".join(["not run"] * len(TASK_TYPES)) + " |")
            continue
        cells = []
        for task in TASK_TYPES:
            outcomes = {}
            for preset, p in (d.get("presets") or {}).items():
                o = (p.get("peft_task_types") or {}).get(task) if isinstance(p, dict) else None
                text = messages.code(outcome_text(o))
                if o and o.get("custom_ok") is False:
                    text += " (custom forward failed)"
                outcomes[preset] = text
            cells.append(cell(grouped(outcomes)))
        lines.append(f"| {release(d)} | " + " | ".join(cells) + " |")
    lines += ["", "Messages (exact, object addresses replaced by `0x…`):", "", *messages.render()]
    return lines


def _native(d: dict, key: str) -> dict:
    return {preset: p.get(key) for preset, p in (d.get("presets") or {}).items() if isinstance(p, dict)}


def section_convention(rows: list[dict]) -> list[str]:
    messages = Messages()
    lines = [
        "## 2. Input convention of the library's own forward, and the custom forward beside it",
        "",
        "`compat.native_convention`: *prepend* = the model prepends the query embeddings itself; "
        "*placeholders* = `input_ids` must carry `num_query_tokens` image tokens. The native forward is "
        "the unwrapped model called with `compat.native_inputs`; the difference is |custom − native| loss.",
        "",
        "| transformers / peft | convention | native forward | custom forward | max loss difference |",
        "|---|---|---|---|---|",
    ]
    for d in rows:
        if not usable(d):
            lines.append(f"| {release(d)} | not run | | | |")
            continue
        conv = grouped({k: v or "error" for k, v in _native(d, "native_convention").items()})
        native = grouped({k: messages.code(outcome_text(v)) for k, v in _native(d, "native_forward").items()})
        custom = grouped({k: messages.code(outcome_text(v)) for k, v in _native(d, "custom_forward").items()})
        diffs = [v for v in _native(d, "loss_difference").values() if v is not None]
        lines.append(
            f"| {release(d)} | {conv} | {cell(native)} | {cell(custom)} | {max(diffs):.2e} |"
            if diffs
            else f"| {release(d)} | {conv} | {cell(native)} | {cell(custom)} | — |"
        )
    if messages.codes:
        lines += ["", *messages.render()]
    return lines


def section_counts(rows: list[dict]) -> list[str]:
    lines = [
        "## 3. LoRA counts (r = 8, targets query/key/value/dense, Q-Former only)",
        "",
        f"Full size: `{FULL_PRESET}` built on the meta device. Tiny: LoRA tensors / trainable / total.",
        "",
        "| transformers / peft | full: LoRA tensors | full: trainable | full: total | full: base model | "
        "share | count regime (T5) | " + " | ".join(PRESET_LABELS.values()) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(PRESET_LABELS),
    ]
    for d in rows:
        counts = d.get("lora_counts") or {}
        if not usable(d) or "status" in counts:
            lines.append(f"| {release(d)} | {outcome_text(counts) if counts else 'not run'} |" + " |" * 10)
            continue
        full = counts.get(FULL_PRESET) or {}
        tiny = []
        for preset in PRESET_LABELS:
            c = counts.get(preset) or {}
            tiny.append(
                f"{c['lora_tensors']} / {c['trainable_parameters']:,} / {c['total_parameters']:,}"
                if "lora_tensors" in c
                else cell(outcome_text(c))
            )
        if "lora_tensors" in full:
            lines.append(
                f"| {release(d)} | {full['lora_tensors']} | {full['trainable_parameters']:,} | "
                f"{full['total_parameters']:,} | {full['base_parameters']:,} | {full['trainable_percent']} % | "
                f"{(counts.get('parameter_count_regime') or {}).get('t5', '—')} | " + " | ".join(tiny) + " |"
            )
        else:
            lines.append(f"| {release(d)} | {cell(outcome_text(full))} | | | | | | " + " | ".join(tiny) + " |")
    return lines


def section_dtype_and_nan(rows: list[dict]) -> list[str]:
    lines = [
        "## 4. Adapter dtype on an fp16 base, and the seed's NaN under default settings",
        "",
        "`get_peft_model` with defaults on `presets.build_model(tiny-instructblip-flan-t5, dtype=float16)`; "
        "then AdamW(lr=1e-4, eps=1e-8) over the adapter parameters, 3 steps of the custom forward on "
        "`synthetic.random_batch` (per-step loss finite?).",
        "",
        "| transformers / peft | adapter dtype | loss finite per step | losses |",
        "|---|---|---|---|",
    ]
    for d in rows:
        if not usable(d):
            lines.append(f"| {release(d)} | not run | | |")
            continue
        dtype = d.get("adapter_dtype") or {}
        nan = d.get("nan_default") or {}
        dtype_text = ", ".join(dtype["adapter_dtypes"]) if "adapter_dtypes" in dtype else outcome_text(dtype)
        if "finite_per_step" in nan:
            finite = " ".join("finite" if f else "**NaN**" for f in nan["finite_per_step"])
            # float(): a non-finite loss is the string "NaN" in strict JSON (qformer_lora.jsonio)
            losses = ", ".join(f"{float(x):.4g}" for x in nan["losses"])
        else:
            finite, losses = cell(outcome_text(nan)), ""
        lines.append(f"| {release(d)} | {cell(dtype_text)} | {finite} | {losses} |")
    return lines


ATTENTION_COMPONENTS = (("vision_model", "vision"), ("qformer", "Q-Former"), ("language_model", "LM"))


def _attention_cell(components: dict | None) -> str:
    """{"vision_model": {"in_use": "sdpa"}, ...} or {"vision_model": "sdpa", ...} -> "vision sdpa, Q-Former
    eager, LM sdpa" ("all sdpa" when the three agree); a refusal -> its exception and message."""
    if not components:
        return "not observed"
    if "status" in components:  # a refusal or an error
        return outcome_text({**components, "status": "error"})
    values = {c: (v.get("in_use") if isinstance(v, dict) else v) for c, v in components.items()}
    if len(set(values.values())) == 1:
        return f"all {next(iter(values.values()))}"
    return ", ".join(f"{label} {values.get(c, '?')}" for c, label in ATTENTION_COMPONENTS)


def _attention_run(run: dict | None) -> dict | None:
    return run.get("components") if run and run.get("status") == "ok" else run


def section_attention(rows: list[dict]) -> list[str]:
    messages = Messages()
    lines = [
        "## 6. Attention: eager against SDPA (transformers#40952)",
        "",
        "Which implementation the vision tower, Q-Former and language model run on the tiny presets, observed "
        "by counting `torch.nn.functional.scaled_dot_product_attention` calls during one custom forward "
        "(`probes.attention`): with the constructor's default (as `presets.build_model`), and built with "
        '`attn_implementation="eager"` / `"sdpa"` (or the release\'s refusal). Then the sdpa build and the '
        "default build against the eager one (the default against eager is transformers#40952's comparison, "
        "measurable where sdpa is refused): same weights, Q-Former LoRA adapters (r = 8) and batch in fp32; "
        "max over presets of |Δ loss| / loss and of max |Δ LoRA gradient| / max |LoRA gradient|. Bound: 1e-5 "
        "(fp32 rounding; `probes.ATTENTION_RELATIVE_BOUND`).",
        "",
        "| transformers / peft | default | from_pretrained default | eager | sdpa | sdpa − eager: loss / gradient | "
        "default − eager: loss / gradient |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in rows:
        attention = d.get("attention") or {}
        if not usable(d) or not attention or "status" in attention:
            lines.append(f"| {release(d)} | {cell(outcome_text(attention)) if attention else 'not run'} | | | | | |")
            continue
        cells = []
        for key in ("default", "default_from_pretrained", "eager", "sdpa"):
            outcomes = {}
            for preset, o in attention.items():
                value = (o or {}).get(key) if "status" not in (o or {}) else o
                value = _attention_run(value) if key in ("eager", "sdpa") else value
                text = _attention_cell(value)
                refused = not value or "status" in value  # a message: numbered below the table
                outcomes[preset] = messages.code(text) if refused else text
            cells.append(cell(grouped(outcomes)))
        figures = []
        for other in ("sdpa", "default"):
            found = [(o.get("differences") or {}).get(other) for o in attention.values() if isinstance(o, dict)]
            found = [f for f in found if f]
            figures.append(
                f"{max(f['loss_relative_difference'] for f in found):.1e} / "
                f"{max(f['grad_relative_difference'] for f in found):.1e}"
                if found
                else "—"
            )
        lines.append(f"| {release(d)} | " + " | ".join(cells + figures) + " |")
    if messages.codes:
        lines += ["", *messages.render()]
    return lines


def section_tests(rows: list[dict]) -> list[str]:
    lines = [
        "## 5. Test results per pair",
        "",
        '`pytest -m "regression or stability"` and `pytest tests/unit/test_lora_scope.py '
        "tests/unit/test_forward_equivalence.py` against the pair's rows in "
        "`src/qformer_lora/resources/expectations/`, "
        'and `pytest tests/unit/test_step_options.py -k "not inductor"` (step options; pairs '
        "recorded before it was added lack that run), and `pytest tests/unit/test_attention.py` (attention, "
        "section 6).",
        "",
    ]
    for d in rows:
        tests = d.get("tests")
        if not tests:
            continue
        parts = []
        for name, t in tests.items():
            if "tests" not in t:
                parts.append(f"{name}: {t.get('error')} (exit {t.get('exit_code')})")
            else:
                parts.append(
                    f"{name}: {t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                    f"{t['skipped']} skipped (exit {t['exit_code']})"
                )
        mode = " (recording run: expectation checks recorded, not asserted)" if d.get("tests_mode") == "record" else ""
        lines.append(f"* **{release(d)}**{mode} — " + "; ".join(parts))
        for t in tests.values():
            for f in t.get("failed", []):
                lines.append(f"  * `{f['test']}` ({f['kind']}): {cell(f['message'])}")
    return lines


# ----------------------------------------------------------------------------- behaviours
# One signature per recorded behaviour: equal signatures = the same behaviour. The Boundaries
# section compares them between consecutive pairs; scripts/bisect_boundary.py compares them
# between the releases in between.
def kwarg_sig(d: dict) -> tuple:
    out = {}
    for preset, p in (d.get("presets") or {}).items():
        for task, o in ((p or {}).get("peft_task_types") or {}).items():
            o = o or {}
            message = re.sub(r"\b\w+(ForConditionalGeneration|ForCausalLM)\b", "<Model>", o.get("message", ""))
            out[(task, PRESET_LABELS.get(preset, preset))] = (
                "ok" if o.get("status") == "ok" else f"{o.get('exception')}: {message}"
            )
    return tuple(sorted(out.items()))


def kwarg_describe(sig) -> str:
    by_outcome: dict[str, dict[str, list[str]]] = {}
    for (task, preset), value in sig:
        by_outcome.setdefault(value, {}).setdefault(task, []).append(preset)
    parts = []
    for value, tasks in by_outcome.items():
        order = sorted(tasks, key=lambda t: TASK_TYPES.index(t) if t in TASK_TYPES else len(TASK_TYPES))
        where = ", ".join(
            ("task_type=None" if t == "None" else t)
            + ("" if len(tasks[t]) == len(PRESET_LABELS) else f" ({', '.join(tasks[t])})")
            for t in order
        )
        parts.append(f"{where}: " + ("ok" if value == "ok" else f"`{value}`"))
    return "; ".join(parts) if parts else "not observed"


def conv_sig(d: dict) -> tuple:
    return tuple(sorted({v or "error" for v in _native(d, "native_convention").values()}))


def dtype_sig(d: dict) -> tuple:
    return tuple((d.get("adapter_dtype") or {}).get("adapter_dtypes", ["error"]))


def nan_sig(d: dict) -> tuple:
    return tuple((d.get("nan_default") or {}).get("finite_per_step", []))


def count_sig(d: dict) -> tuple:
    c = d.get("lora_counts") or {}
    return (
        (c.get(FULL_PRESET) or {}).get("total_parameters"),
        (c.get(FULL_PRESET) or {}).get("lora_tensors"),
        (c.get(FULL_PRESET) or {}).get("trainable_parameters"),
        tuple((c.get(p) or {}).get("total_parameters") for p in PRESET_LABELS),
    )


def count_describe(sig) -> str:
    total, tensors, trainable, tiny = sig
    return (
        f"{FULL_PRESET} total {total:,} ({tensors} LoRA tensors, {trainable:,} trainable); tiny totals "
        f"({', '.join(PRESET_LABELS.values())}) {', '.join(f'{t:,}' if t else '?' for t in tiny)}"
        if total
        else "not counted"
    )


def meta_sig(d: dict) -> str:
    full = (d.get("lora_counts") or {}).get(FULL_PRESET) or {}
    constructed = full.get("base_parameters_as_constructed_on_meta")
    if constructed is None or "base_parameters" not in full:
        return "not observed"
    extra = constructed - full["base_parameters"]
    return (
        "construction on meta ties embeddings as on a real device"
        if extra == 0
        else f"construction on meta leaves {extra:,} tied parameters untied (fixed by compat.finish_meta_model)"
    )


def attention_sig(d: dict) -> tuple:
    """(preset, implementation each component runs by default) for every tiny preset."""
    out = []
    for preset, o in (d.get("attention") or {}).items():
        default = (o or {}).get("default") if isinstance(o, dict) else None
        out.append((PRESET_LABELS.get(preset, preset), _attention_cell(default)))
    return tuple(sorted(out))


def custom_sig(d: dict) -> str:
    ok = all((p or {}).get("custom_forward", {}).get("status") == "ok" for p in (d.get("presets") or {}).values())
    return "custom forward ok on every tiny preset" if ok else "custom forward fails somewhere"


# name -> (title, signature, describe); the names are scripts/bisect_boundary.py's --behaviour values
BEHAVIOURS = {
    "kwarg_conflict": ("Kwarg conflict (library forward through PEFT task wrappers)", kwarg_sig, kwarg_describe),
    "native_convention": ("Native input convention", conv_sig, lambda s: " / ".join(s)),
    "adapter_dtype": ("Adapter dtype on an fp16 base (default get_peft_model)", dtype_sig, lambda s: ", ".join(s)),
    "nan_default": (
        "NaN under default settings (per-step loss finite)",
        nan_sig,
        lambda s: " ".join("finite" if f else "NaN" for f in s) or "not observed",
    ),
    "lora_counts": ("LoRA / parameter counts", count_sig, count_describe),
    "meta_device": (f"{FULL_PRESET} built on the meta device", meta_sig, str),
    "custom_forward": ("Custom forward", custom_sig, str),
    "attention": (
        "Default attention implementation (vision / Q-Former / LM)",
        attention_sig,
        lambda s: grouped({p: v for p, v in s}) if s else "not observed",
    ),
}


def changes(rows: list[dict], signature) -> list[tuple[dict, dict]]:
    """(last row with the old behaviour, first row with the new one) for each change between usable rows."""
    out, previous = [], None
    for row in rows:
        if not usable(row):
            continue
        if previous is not None and signature(row) != signature(previous):
            out.append((previous, row))
        previous = row
    return out


def pair_name(d: dict) -> str:
    return f"{d['_t']}-{d['_p']}"


def _steps_text(found: dict) -> str:
    """ "5.13.0 (last before: 5.12.1)" for one step; for several, each with what it changed to:
    "5.13.0 (→ <behaviour>; last before: 5.12.1), then 5.16.0 (→ …; last before: 5.15.1)" (the
    last parenthesis left open for exact_text's search details). Records written before steps were
    recorded have last_before / first_changed only: one step."""
    steps = found.get("steps") or [{"last_before": found["last_before"], "first_changed": found["first_changed"]}]
    if len(steps) == 1:
        return f"{steps[0]['first_changed']} (last before: {steps[0]['last_before']}"
    parts = [f"{s['first_changed']} (→ {s['to']}; last before: {s['last_before']}" for s in steps]
    return "), then ".join(parts)


def exact_text(found: dict | None) -> str:
    """The bisected release of one boundary (scripts/bisect_boundary.py), or why there is none."""
    if found is None:
        return ""
    if found.get("status") != "bisected":
        # first line only: an install failure's reason goes on with pip's last lines (kept in the JSON)
        lines = str(found.get("reason") or "no reason recorded").splitlines()
        return f" — not bisected: {lines[0]}" + (" (pip's last lines in boundaries.json)" if len(lines) > 1 else "")
    held = ", ".join(f"{name} held at {version}" for name, version in (found.get("held") or {}).items())
    yanked = ", ".join(y["version"] for y in found.get("yanked_skipped") or [])
    probed = len(found.get("probes", []))
    return (
        f" — first at {found['bisected']} {_steps_text(found)}; "
        f"bisected over {found['candidates'][0]}…{found['candidates'][-1]}, {held}, "
        + (f"yanked and skipped: {yanked}, " if yanked else "")
        + f"{probed} {'release' if probed == 1 else 'releases'} probed)"
    )


def section_boundaries(rows: list[dict], exact: dict | None = None) -> list[str]:
    """``exact``: (behaviour, from pair, to pair) -> the bisection record (reports/compat/boundaries.json)."""
    exact = exact or {}
    lines = [
        "## Boundaries (first release in the matrix where a behaviour changes)",
        "",
        "Where `scripts/bisect_boundary.py` (`nox -s bisect`) has bisected the releases in between, the exact "
        "first release follows the boundary (reports/compat/boundaries.json has the releases observed).",
        "",
    ]
    for name, (title, sig, describe) in BEHAVIOURS.items():
        lines.append(f"* **{title}**:")
        first = next((r for r in rows if usable(r)), None)
        if first is not None:
            lines.append(f"  * at {release(first)}: {describe(sig(first))}")
        found = changes(rows, sig)
        for old, new in found:
            lines.append(
                f"  * between {release(old)} and **{release(new)}**: {describe(sig(old))} → {describe(sig(new))}"
                + exact_text(exact.get((name, pair_name(old), pair_name(new))))
            )
        if not found:
            lines.append("  * no change across the releases run")
    return lines


def load_exact(folder: Path) -> dict:
    """(behaviour, from pair, to pair) -> bisection record, from ``folder``/boundaries.json if it exists."""
    path = folder / BOUNDARIES_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {(b["behaviour"], b["from_pair"], b["to_pair"]): b for b in data.get("boundaries", [])}


CHANGES_FILE = "CHANGES.md"  # hand-written: each change between recorded releases and its cause


def render(rows: list[dict], exact: dict | None = None, changes: str = "") -> str:
    header = [
        "# Compatibility across transformers × peft releases",
        "",
        "Generated by `nox -s compat_report` from `reports/compat/*.json`; each file is written by "
        '`nox -s "compat(<transformers>-<peft>)"` (probe: `python -m qformer_lora.repro.compat_probe`). '
        "Do not edit by hand. torch 2.13.0 (CPU) throughout; Python and the neighbours of each pair "
        "are in the first table.",
        "",
    ]
    body = section_pairs(rows) + [""] + section_boundaries(rows, exact) + [""]
    body += [changes.strip(), ""] if changes.strip() else []
    for section in (
        section_kwarg_conflict,
        section_convention,
        section_counts,
        section_dtype_and_nan,
        section_tests,
        section_attention,
    ):
        body += section(rows) + [""]
    return "\n".join(header + body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in", dest="folder", type=Path, default=Path("reports/compat"))
    parser.add_argument("--out", type=Path, default=Path("reports/COMPAT.md"))
    args = parser.parse_args(argv)
    rows = load_reports(args.folder)
    if not rows:
        print(f"compat_report: no JSON files in {args.folder}; run a compat session first", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    changes = args.folder / CHANGES_FILE
    notes = changes.read_text(encoding="utf-8") if changes.is_file() else ""
    args.out.write_text(render(rows, load_exact(args.folder), notes), encoding="utf-8")
    print(f"compat_report: {len(rows)} release pair(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
