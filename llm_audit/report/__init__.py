"""Stage 5: reports (csv, json, md + figures, self-contained html), written atomically."""

from .writers import FORMATS, atomic_write, parse_formats, write_reports

__all__ = ["FORMATS", "atomic_write", "parse_formats", "write_reports"]
