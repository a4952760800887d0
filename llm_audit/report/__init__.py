"""Stage 5: reports (csv, json, md; html in report.html) written atomically into a folder."""

from .writers import FORMATS, atomic_write, write_reports

__all__ = ["FORMATS", "atomic_write", "write_reports"]
