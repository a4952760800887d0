"""llm-audit: data-free audits of LLM checkpoints (HTSR α and correlation traps)."""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import AuditError  # noqa: E402
from .monitor import MonitorReport, monitor_weights  # noqa: E402
from .options import AuditOptions  # noqa: E402
from .pipeline import AuditResult, audit  # noqa: E402
from .records import MatrixResult  # noqa: E402

__all__ = [
    "AuditError", "AuditOptions", "AuditResult", "MatrixResult", "MonitorReport", "__version__",
    "audit", "monitor_weights",
]
