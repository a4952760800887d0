"""Peak memory of an audit must not grow with the number of layers or shards.

Writes synthetic gpt-oss-layout checkpoints (MXFP4 experts, BF16 attention and router, no
embeddings, one shard per layer: the layout of issue 13) at several depths, and audits each
in a fresh process twice, as a user runs it:

- CLI: ``llm-audit DIR --out OUT -q`` (all four reports, figures included), peak RSS from
  ``/usr/bin/time -f %M``;
- API: ``llm_audit.audit(DIR)`` in a child process, peak RSS from its VmHWM.

Target: the deepest within 15% of the shallowest, both ways. ``--embedding`` adds the
full-size 201088 × 2880 BF16 embedding alone (1.16 GB on disk; target: peak < 1.5 GB;
``--decoded-baseline`` also audits it decoded whole, the path before streaming.py).

    python benchmarks/memory_streaming.py [--depths 2,4,8] [--width 1024] [--experts 4]
                                          [--embedding [--decoded-baseline]]
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
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))


def child(folder: str, decoded: bool = False) -> None:
    """Audit `folder` through the API; print {peak_rss_mb, matrices, seconds} as JSON.
    `decoded`: never stream (the baseline: every matrix decoded whole)."""
    import llm_audit
    import llm_audit.pipeline  # noqa: F401  (llm_audit's exports are lazy: load torch, pandas)
    from llm_audit import streaming

    if decoded:
        streaming.STREAM_NUMEL = 1 << 62

    t0 = time.perf_counter()
    n = 0
    if folder != "-":  # "-": import only (the baseline)
        res = llm_audit.audit(folder, device="cpu")
        n = len(res.details)
        d = res.details  # routers of < 8 experts are too small to analyse: failed rows
        bad = d[(d["status"] != "ok") & ~d["warning"].str.contains("eigenvalues")]
        assert bad.empty, bad[["name", "warning"]]
    print(json.dumps({"peak_rss_mb": vm_hwm_mb(), "matrices": n,
                      "seconds": time.perf_counter() - t0}))


def vm_hwm_mb() -> float:
    """Peak resident set of this process's address space (reset by exec), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def api(folder: str, decoded: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", folder,
                          *(["--decoded"] if decoded else [])], env=ENV,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def api_timed(folder: str, decoded: bool = False) -> dict:
    """`api` under /usr/bin/time: the peak is known even when the child is killed."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, __file__, "--child",
                          folder, *(["--decoded"] if decoded else [])], env=ENV,
                         capture_output=True, text=True)
    rc = res.returncode
    if "signal 9" in res.stderr:
        rc = -9
    return {"peak_rss_mb": int(res.stderr.strip().splitlines()[-1]) / 1024, "rc": rc,
            "seconds": time.perf_counter() - t0}


def cli(folder: str, out: str) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "llm_audit.cli",
                          folder, "--out", out, "-q"], env=ENV, capture_output=True, text=True,
                         check=True)
    return {"peak_rss_mb": int(res.stderr.strip().splitlines()[-1]) / 1024,
            "seconds": time.perf_counter() - t0}


def build_child(folder: str, layers: int, width: int, experts: int) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from tests.checkpoints import gpt_oss_config, gpt_oss_layer, write_sharded

    if layers == 0:  # the full-size gpt-oss embedding alone: heavy-tailed, a rank-8 part
        gen = torch.Generator().manual_seed(0)
        emb = torch.empty(201088, 2880, dtype=torch.bfloat16)
        v = torch.randn(8, 2880, generator=gen)
        for rows in emb.split(16384):
            n = rows.shape[0]
            u = torch.rand(n, 2880, generator=gen).clamp_min(1e-6)
            x = torch.randn(n, 2880, generator=gen) / u.sqrt()
            rows.copy_(0.01 * x + 0.02 * torch.randn(n, 8, generator=gen) @ v / 8)
        write_sharded(Path(folder), [("model.embed_tokens.weight", emb)], [], {})
        return
    gen = torch.Generator().manual_seed(layers)
    items, cuts = [], []
    for i in range(layers):
        cuts += [len(items)] if i else []
        items += gpt_oss_layer(i, width, experts, gen)
    write_sharded(Path(folder), items, cuts, gpt_oss_config(layers, width, experts, 0))


def build(folder: Path, layers: int, width: int, experts: int) -> dict:
    subprocess.run([sys.executable, __file__, "--build", str(folder),
                    *map(str, (layers, width, experts))], env=ENV, check=True)
    files = list(folder.glob("*.safetensors"))
    return {"layers": layers, "shards": len(files),
            "file_mb": sum(f.stat().st_size for f in files) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="2,4,8")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--embedding", action="store_true")
    ap.add_argument("--decoded-baseline", action="store_true",
                    help="also audit the embedding decoded whole (needs > 24 GB: OOM here)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--decoded", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.decoded)
    if a.build:
        return build_child(a.build[0], *map(int, a.build[1:]))
    print(f"memory_streaming: gpt-oss layout, width {a.width}, {a.experts} experts, no "
          f"embeddings, one shard per layer; traps on (ww), CPU, OMP_NUM_THREADS=1")
    print(f"baseline (import torch + llm_audit): peak RSS {api('-')['peak_rss_mb']:.0f} MB")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llm-audit-mem-") as tmp:
        for layers in (map(int, a.depths.split(",")) if a.depths else ()):
            folder = Path(tmp) / f"gpt-oss-{layers}L"
            info = build(folder, layers, a.width, a.experts)
            c, p = cli(str(folder), str(Path(tmp) / f"out{layers}")), api(str(folder))
            rows.append((layers, c["peak_rss_mb"], p["peak_rss_mb"]))
            print(f"{layers:3d} layers, {info['shards']} shards, {info['file_mb']:6.1f} MB on "
                  f"disk, {p['matrices']} matrices: CLI peak {c['peak_rss_mb']:6.0f} MB "
                  f"({c['seconds']:.0f} s), API peak {p['peak_rss_mb']:6.0f} MB "
                  f"({p['seconds']:.0f} s)")
        for k, label in ((1, "CLI"), (2, "API")) if rows else ():
            ratio = rows[-1][k] / rows[0][k]
            print(f"{label}: peak({rows[-1][0]} layers) / peak({rows[0][0]} layers) = "
                  f"{ratio:.3f}; target <= 1.15: {'PASS' if ratio <= 1.15 else 'FAIL'}")
        if a.embedding:
            folder = Path(tmp) / "embedding"
            build(folder, 0, 0, 0)
            c = cli(str(folder), str(Path(tmp) / "out-emb"))
            print(f"201088 x 2880 BF16 embedding (heavy-tailed, 1.16 GB): CLI peak "
                  f"{c['peak_rss_mb']:.0f} MB ({c['seconds']:.0f} s, all reports and figures); "
                  f"target < 1536 MB: {'PASS' if c['peak_rss_mb'] < 1536 else 'FAIL'}",
                  flush=True)
            s = api(str(folder))
            print(f"  API streamed: peak {s['peak_rss_mb']:.0f} MB ({s['seconds']:.0f} s)",
                  flush=True)
            if a.decoded_baseline:  # the old path: decoded whole, materialised shuffle
                d = api_timed(str(folder), decoded=True)
                print(f"  API decoded whole (baseline): peak {d['peak_rss_mb']:.0f} MB "
                      f"({d['seconds']:.0f} s, exit {d['rc']}; -9: killed, out of memory)")


if __name__ == "__main__":
    main()
