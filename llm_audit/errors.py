"""The error hierarchy: every failure the library raises on purpose is an ``AuditError``.

Messages say what went wrong, where (file, tensor, dtype, shape) and how to fix it; the CLI
prints them on one line and exits with code 2.
"""

from __future__ import annotations


class AuditError(Exception):
    """Root of every error llm-audit raises on purpose."""


class SourceError(AuditError):
    """The checkpoint cannot be found or opened (missing path, unknown hub repo, no network)."""


class FormatError(AuditError):
    """A file is not what it claims to be: bad safetensors header, lying sizes, bad index."""


class DecodeError(AuditError):
    """A tensor's bytes cannot be turned into a float matrix (unknown dtype or scheme)."""


class SpectralError(AuditError):
    """A matrix cannot be analysed (NaN/Inf, all zeros, too small)."""


class UsageError(AuditError):
    """Options that do not make sense together or do not parse."""
