"""Peak memory of an audit must not grow with the number of layers or shards.

Writes two synthetic gpt-oss-layout checkpoints (MXFP4 experts, BF16 attention/router/embeddings)
of the same width — N and 4N layers, one shard per two layers, a layer straddling each shard
boundary — audits each in a fresh subprocess (correlation traps on, CPU) and prints each
child's peak RSS (VmHWM of the child's own address space; its getrusage ru_maxrss as a
cross-check) and the ratio. Target: 4N within 15% of N, both under 1.5 GB, at width 1024 with
4 experts. Checkpoints are written by another subprocess: Linux carries ru_maxrss across
fork+exec, so a big parent would inflate its children's getrusage numbers.

    python benchmarks/memory_streaming.py [--layers 2] [--width 1024] [--experts 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(folder: str, randomize: bool) -> None:
    """Audit `folder` and print {peak_rss_mb, matrices, seconds} as JSON on the last line."""
    import llm_audit
    import llm_audit.pipeline  # noqa: F401  (llm_audit's exports are lazy: load torch, pandas)

    t0 = time.perf_counter()
    n = 0
    if folder != "-":  # "-": import only (the baseline)
        res = llm_audit.audit(folder, device="cpu", randomize=randomize)
        n = len(res.details)
        d = res.details  # routers of < 8 experts are too small to analyse: failed rows
        bad = d[(d["status"] != "ok") & ~d["warning"].str.contains("eigenvalues")]
        assert bad.empty, bad[["name", "warning"]]
    print(json.dumps({"peak_rss_mb": vm_hwm_mb(), "matrices": n,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - t0}))


def vm_hwm_mb() -> float:
    """Peak resident set of this process's address space (reset by exec), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(folder: str, randomize: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__, "--child", folder]
                         + ([] if randomize else ["--no-randomize"]),
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_child(folder: str, layers: int, width: int, experts: int, vocab: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.checkpoints import write_gpt_oss

    write_gpt_oss(Path(folder), layers=layers, width=width, experts=experts, vocab=vocab,
                  shards=max(layers // 2, 1) + 1, seed=layers)


def build(folder: Path, layers: int, width: int, experts: int, vocab: int) -> dict:
    subprocess.run([sys.executable, __file__, "--build", str(folder),
                    *map(str, (layers, width, experts, vocab))], check=True)
    files = list(folder.glob("*.safetensors"))
    return {"layers": layers, "shards": len(files),
            "file_mb": sum(f.stat().st_size for f in files) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="N (the second audit has 4N)")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--no-randomize", action="store_true", help="skip correlation traps")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=5, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, not a.no_randomize)
    if a.build:
        return build_child(a.build[0], *map(int, a.build[1:]))
    print(f"memory_streaming: width {a.width}, {a.experts} experts, vocab {a.vocab}, "
          f"traps {'off' if a.no_randomize else 'on'}, OMP_NUM_THREADS=1, python "
          f"{sys.version.split()[0]}")
    base = run_child("-", True)
    print(f"baseline (import torch + llm_audit): peak RSS {base['peak_rss_mb']:.0f} MB")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llm-audit-mem-") as tmp:
        for layers in (a.layers, 4 * a.layers):
            folder = Path(tmp) / f"gpt-oss-{layers}L"
            info = build(folder, layers, a.width, a.experts, a.vocab)
            rec = {**info, **run_child(str(folder), not a.no_randomize)}
            rows.append(rec)
            print(f"{layers:3d} layers, {rec['shards']} shards, {rec['file_mb']:7.1f} MB on disk, "
                  f"{rec['matrices']:4d} matrices: peak RSS {rec['peak_rss_mb']:7.1f} MB "
                  f"(ru_maxrss {rec['ru_maxrss_mb']:.1f} MB), "
                  f"{rec['seconds']:.0f} s")
    ratio = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    ok = abs(ratio - 1) <= 0.15 and max(r["peak_rss_mb"] for r in rows) < 1536
    print(f"ratio peak(4N) / peak(N) = {ratio:.3f}; target within 15% and < 1.5 GB: "
          f"{'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
