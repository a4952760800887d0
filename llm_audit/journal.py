"""Durable, resumable audit results: one JSON line per finished job under ``OUT/.partial/``.

Each line holds a job's result rows keyed by the job's fingerprint (the options that change
results, the tensor parts' files, offsets, dtypes and shapes). A line is appended, flushed and
fsync'ed as soon as the job is done, so a killed audit loses at most the job in flight; a
truncated last line is ignored. ``--resume`` reuses the rows whose fingerprint still matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from . import __version__
from .anatomy import TrapInfo
from .options import AuditOptions
from .records import COLUMNS, MatrixResult
from .routing import MatrixJob

log = logging.getLogger(__name__)
PARTIAL_DIR = ".partial"
ROWS_FILE = "rows.jsonl"
_RESULT_OPTIONS = ("seed", "randomize", "trap_rule", "anatomy", "fix_fingers", "precision")


def job_key(job: MatrixJob, opts: AuditOptions) -> str:
    """What decides a job's result rows: options, code version, and which bytes: each part's
    file (its resolved path, size, modification time and inode: another checkpoint with the
    same names and shapes, or this one rewritten in place, does not match) and byte range."""
    parts = []
    for p in job.parts:
        st = p.file.stat()
        parts.append((p.name, str(p.file.resolve()), st.st_size, st.st_mtime_ns, st.st_ino,
                      p.begin, p.end, p.dtype, list(p.shape)))
    ident = {"version": __version__, "options": {k: getattr(opts, k) for k in _RESULT_OPTIONS},
             "job": [job.name, job.scheme, job.layer, job.module, job.expert], "parts": parts}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


class Journal:
    """Append-only record of finished jobs in `folder/.partial/rows.jsonl` (context manager)."""

    def __init__(self, folder: str | Path, resume: bool = False) -> None:
        self.dir = Path(folder) / PARTIAL_DIR
        self.path = self.dir / ROWS_FILE
        self.done: dict[str, tuple[MatrixResult, ...]] = self._load() if resume else {}
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def cached(self, key: str) -> tuple[MatrixResult, ...] | None:
        return self.done.get(key)

    def record(self, key: str, rows: tuple[MatrixResult, ...]) -> None:
        line = json.dumps({"key": key, "rows": [r.as_row() for r in rows],
                           "traps": [[dataclasses.asdict(t) for t in r.traps] for r in rows],
                           "outliers": [r.outliers for r in rows]})
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _load(self) -> dict[str, tuple[MatrixResult, ...]]:
        done: dict[str, tuple[MatrixResult, ...]] = {}
        if not self.path.is_file():
            return done
        bad = 0
        with open(self.path, "rb") as f:  # bytes: a damaged line must not stop the others
            for line in f:
                try:
                    entry = json.loads(line.decode("utf-8"))
                    rows = tuple(_restore(r, t, o) for r, t, o in zip(
                        entry["rows"], entry["traps"], entry["outliers"], strict=True))
                    done[str(entry["key"])] = rows
                except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                    bad += 1
        if bad:
            log.warning("%s: %d damaged or incomplete line(s) ignored; their matrices are "
                        "computed again", self.path, bad)
        log.info("%s: %d finished jobs to resume from", self.path, len(done))
        return done


def _restore(row: dict, traps: list[dict], outliers: list) -> MatrixResult:
    infos = tuple(TrapInfo(**{**t, "entries": tuple(tuple(e) for e in t["entries"])})
                  for t in traps)
    return MatrixResult(**{k: v for k, v in row.items() if k in COLUMNS}, traps=infos,
                        outliers=tuple(tuple(o) for o in outliers))


def discard_journal(folder: str | Path) -> None:
    """Remove `folder/.partial` once the reports are written."""
    shutil.rmtree(Path(folder) / PARTIAL_DIR, ignore_errors=True)
