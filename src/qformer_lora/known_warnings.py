"""Upstream warnings the user cannot act on: recorded once in the run's log, kept off the terminal.

Each entry of :data:`KNOWN` names one warning by category, message and the module it is
attributed to (the three things a ``warnings`` filter matches), and says why it is hidden;
:data:`KNOWN_LOGS` does the same for messages a library logs (transformers' logger) rather
than warns.
Inside ``with Recorder(...)`` a warning that matches an entry is handed to the recorder's sink
once (``train``: a ``{"type": "warning", ...}`` record in metrics.jsonl; ``reproduce``: the
report's ``warnings``; any other command: the ``qformer_lora`` logger at DEBUG level) and not
printed. Every other warning, ours included (a truncated prompt, a fallback from an
unavailable step option, a precision finding), is shown exactly as before. Nothing is
filtered outside the ``with`` block: no process-wide ignore.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    """One upstream warning: ``message`` is a regular expression matched at the start of the
    text, ``module`` one matched against the whole name of the module the warning is
    attributed to (as ``warnings.filterwarnings`` matches them)."""

    name: str
    category: type[Warning]
    message: str
    module: str
    reason: str

    def matches(self, message: str, category: type[Warning], module: str) -> bool:
        return (
            issubclass(category, self.category)
            and re.match(self.message, message) is not None
            and re.fullmatch(self.module, module) is not None
        )


KNOWN = (
    KnownWarning(
        "is_gradient_checkpointing deprecated",
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        r"transformers\.modeling_utils",
        "PEFT's PeftModel.__init__ reads the deprecated property (peft 0.21 on transformers 5.24; peft 0.22 "
        "reads is_activation_checkpointing first and no longer raises it: expectations table known_warnings); "
        "it is raised whenever an adapter is applied or loaded, and nothing the user sets changes it",
    ),
    KnownWarning(
        "lr_scheduler.step() before optimizer.step()",
        UserWarning,
        r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`",
        r"qformer_lora\.training\.step",
        "fp16-amp: GradScaler skipped the first optimizer step on an overflowing gradient while it "
        "finds its scale, and the schedule advances anyway (on purpose, so every run follows one "
        "schedule); torch takes that for a misordered loop",
    ),
)


@dataclass(frozen=True)
class KnownLogMessage:
    """One message a library logs: ``library`` is the logger whose handlers print it (transformers
    logs through its own, not propagating to the root), or, for a library without handlers of its own
    (bitsandbytes: Python's last-resort handler prints its records), the logger that logs it, whose
    own filters then see the record; ``logger`` a regular expression of the full logger name,
    ``message`` one matched at the start of the text."""

    name: str
    library: str
    logger: str
    message: str
    reason: str

    def matches(self, record: logging.LogRecord) -> bool:
        return (
            re.fullmatch(self.logger, record.name) is not None
            and re.match(self.message, record.getMessage()) is not None
        )


KNOWN_LOGS = (
    KnownLogMessage(
        "cache off under gradient checkpointing",
        "transformers",
        r"transformers(\..+)?",
        r"Caching is incompatible with gradient checkpointing",
        "bench's native-forward rows run the library's own forward with the language model checkpointed; "
        "transformers turns the cache off for it (a training step has none to keep) and says so",
    ),
    KnownLogMessage(
        "bitsandbytes hub kernel not loaded",
        "bitsandbytes.backends.cpu.ops",
        r"bitsandbytes\.backends\.cpu\.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "bitsandbytes >= 0.49 on a CPU with avx512_bf16 tries, when it is imported (peft imports it), to fetch "
        "an optional nf4 inference kernel from the Hugging Face Hub and logs when it cannot (no hub, or a "
        "publisher it does not trust); it then uses its own kernels, which the quantized-kernel probe checks",
    ),
)

log = logging.getLogger("qformer_lora")


def module_of(filename: str) -> str:
    """The name of the loaded module whose file is ``filename`` ('' when none is)."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "__file__", None) == filename:
            return name
    return ""


class Recorder:
    """``with Recorder(sink) as hidden``: the known warnings raised inside go to ``sink(record)``
    once each, everything else is shown. ``record``: name, category, message (its first
    line), source (module) and reason. Without a sink the records wait in ``records`` until
    :meth:`attach` gives one (a run's log exists only after its model is built); a recorder
    that never gets one logs them at DEBUG level on exit."""

    def __init__(
        self,
        sink: Callable[[dict], None] | None = None,
        known: tuple[KnownWarning, ...] = KNOWN,
        known_logs: tuple[KnownLogMessage, ...] = KNOWN_LOGS,
    ):
        self.known, self.known_logs, self.records = known, known_logs, []
        self._sink, self._delivered = sink, 0
        self._pid = os.getpid()  # a forked DataLoader worker inherits the block but must not write the log

    def attach(self, sink: Callable[[dict], None]) -> None:
        """Send the records so far, and every later one, to ``sink``."""
        self._sink = sink
        self._deliver()

    def _deliver(self) -> None:
        if self._sink is not None and os.getpid() == self._pid:
            for record in self.records[self._delivered :]:
                self._sink(record)
            self._delivered = len(self.records)

    def __enter__(self) -> Recorder:
        self._catcher = warnings.catch_warnings()  # restores the filters and the hook on exit
        self._catcher.__enter__()
        for known in self.known:  # reach the hook every time, even under -W error or "once"
            warnings.filterwarnings("always", message=known.message, category=known.category, module=known.module)
        self._show = warnings.showwarning
        warnings.showwarning = self._showwarning
        # on the library's handlers: a record logged by any of its modules passes them; a library without
        # handlers gets the filter on the logging logger itself (a logger filters what it logs)
        self._handlers = []
        for known in self.known_logs:
            library = logging.getLogger(known.library)
            self._handlers += library.handlers or [library]
        for handler in self._handlers:
            handler.addFilter(self._log_filter)
        return self

    def __exit__(self, *exc) -> None:
        for handler in self._handlers:
            handler.removeFilter(self._log_filter)
        self._catcher.__exit__(*exc)
        if self._sink is None:
            for record in self.records:
                log.debug("hidden upstream warning: %s (%s)", record["message"], record["reason"])

    def _showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text, module = str(message), module_of(filename)
        known = next((k for k in self.known if k.matches(text, category, module)), None)
        if known is None:
            self._show(message, category, filename, lineno, file, line)
            return
        self._record(known, category.__name__, text, module)

    def _log_filter(self, record: logging.LogRecord) -> bool:
        known = next((k for k in self.known_logs if k.matches(record)), None)
        if known is None:
            return True
        self._record(known, f"log {record.levelname}", record.getMessage(), record.name)
        return False

    def _record(self, known, category: str, text: str, source: str) -> None:
        if any(r["name"] == known.name for r in self.records):
            return  # once per run
        self.records.append(
            {
                "name": known.name,
                "category": category,
                "message": text.splitlines()[0] if text else "",
                "source": source,
                "reason": known.reason,
            }
        )
        self._deliver()
