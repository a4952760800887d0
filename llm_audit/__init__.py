"""llm-audit: data-free audits of LLM checkpoints (HTSR α and correlation traps).

The public names are imported lazily (PEP 562), so `import llm_audit.cli` stays cheap and the
CLI can configure the process (threads) before torch is first imported.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AuditError": "errors", "AuditOptions": "options", "AuditResult": "pipeline",
    "AuditSummary": "summary",
    "audit": "pipeline", "MatrixResult": "records", "MonitorReport": "monitor",
    "monitor_weights": "monitor", "repair": "trap_repair", "repair_weights": "trap_repair",
}
__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llm_audit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
