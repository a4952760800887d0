"""Untrusted text (tensor names, shapes, metadata come from checkpoint headers) made safe for
each place it is shown: a terminal line, a figure label, an echoed value in an error.

Markdown and HTML escaping live with their reports (report/markdown.py, jinja2's autoescape);
CSV files quote every text field (report/writers.py).
"""

from __future__ import annotations

import unicodedata

ECHO_MAX = 200  # characters of an untrusted value echoed in a message or a label


def clip(text: object, limit: int = ECHO_MAX) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis and the length it had."""
    t = str(text)
    return t if len(t) <= limit else f"{t[:limit]}… ({len(t):,} characters)"


def terminal(text: object, limit: int | None = None) -> str:
    """One terminal-safe line: control and format characters (ANSI/OSC escapes, CR, LF, bidi
    overrides) shown as ``\\xNN``/``\\uNNNN`` escapes, so a name can neither move the cursor,
    recolour the terminal nor forge another line; cut to ``limit`` if given."""
    t = str(text) if limit is None else clip(text, limit)
    return "".join(_escape(ch) if unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in t)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
