"""Command line: parses arguments and calls the modules; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys

from . import compat, lora, presets


def _add_lora_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=presets.DEFAULT_PRESET,
                        help=f"architecture preset name or JSON path (default: {presets.DEFAULT_PRESET}; "
                             f"shipped: {', '.join(presets.list_presets())})")
    parser.add_argument("--scope", choices=sorted(lora.SCOPES), default="qformer",
                        help="where LoRA may go: the Q-Former only (default) or Q-Former + language model")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2*r)")
    parser.add_argument("--targets", default=",".join(lora.DEFAULT_TARGETS),
                        help="comma-separated layer names matched inside the Q-Former (default: %(default)s)")


def _spec(args) -> lora.LoraSpec:
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return lora.LoraSpec(r=args.r, alpha=args.alpha if args.alpha is not None else 2 * args.r,
                         targets=targets, scope=args.scope)


def cmd_verify(args) -> int:
    spec = _spec(args)
    preset = presets.load_preset(args.preset)
    model = presets.build_model(preset, device="meta")
    report = {"preset": preset.name, "versions": compat.versions()} | lora.scope_report(
        lora.apply_lora(model, spec), spec)
    print(json.dumps(report, indent=2) if args.json else format_scope_report(report))
    return 0


def format_scope_report(report: dict) -> str:
    spec = report["lora"]
    lines = [
        f"preset {report['preset']}  (torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}, peft {report['versions']['peft']})",
        f"LoRA r={spec['r']} alpha={spec['alpha']} targets={','.join(spec['targets'])} scope={spec['scope']}",
        f"LoRA tensors:         {report['lora_tensors']:,}",
        f"trainable parameters: {report['trainable_parameters']:,} of {report['total_parameters']:,} "
        f"({report['trainable_percent']:.4f} %)",
        f"adapter dtype:        {', '.join(report['adapter_dtypes']) or '-'}",
        "",
        f"{'component':<22}{'parameters':>16}{'trainable':>14}{'LoRA tensors':>14}",
    ]
    for name, c in report["components"].items():
        lines.append(f"{name:<22}{c['parameters']:>16,}{c['trainable']:>14,}{c['lora_tensors']:>14,}")
    leaks = report["bare_name_matches_outside_qformer"]
    lines.append("")
    lines.append(f"bare target names would also match outside the Q-Former: {len(leaks)} layer(s)"
                 + (f", e.g. {', '.join(leaks[:3])}" if leaks else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qformer-lora", description=__doc__.splitlines()[0].replace(
        "Command line: ", "qformer-lora: "))
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="build a preset on the meta device, apply LoRA, print the scope report",
                            description="Build the preset without allocating memory (meta device), apply LoRA "
                                        "within the chosen scope and print where the adapter went.")
    _add_lora_options(verify)
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (presets.PresetError, lora.ScopeError) as err:
        print(f"qformer-lora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
