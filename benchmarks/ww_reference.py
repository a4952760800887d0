"""Reference run of the real WeightWatcher 0.7.7 on a safetensors checkpoint.

Runs in a separate venv that has weightwatcher==0.7.7, torch, safetensors and pandas:

    /work/wwvenv/bin/python benchmarks/ww_reference.py MODEL.safetensors OUT.csv
        [--include REGEX] [--fix-fingers clip_xmax]

Every floating-point 2-D tensor of the file (in file order, i.e. by data offset) is wrapped in
an nn.Embedding (name contains "embed") or a bias-free nn.Linear inside an nn.Sequential, so
WeightWatcher sees the tensor itself (as float32, untransposed) and its layer's longname is the
tensor's index; 1-D tensors (norms, biases) and integer buffers are left out. WeightWatcher's
own filters still apply: it skips matrices with M < 8, M > 15000 or N > 50000. The details
DataFrame is written with a first column `name` = the safetensors tensor name (WW's own `name`,
the module index, becomes `ww_name`); the analyze() wall time and the skipped tensors are
printed and written to OUT.csv + ".time".
"""

import argparse
import re
import time

import torch
import weightwatcher as ww
from safetensors import safe_open


def load_matrices(path, include=None):
    """Return [(tensor name, 2-D float tensor)] in file (data offset) order."""
    out = []
    with safe_open(path, framework="pt") as f:
        for name in f.offset_keys():
            if include and not re.search(include, name):
                continue
            t = f.get_tensor(name)
            if t.ndim == 2 and t.is_floating_point():
                out.append((name, t.float()))  # numpy (WeightWatcher) has no bfloat16
    return out


def as_module(name, t):
    if "embed" in name:
        return torch.nn.Embedding.from_pretrained(t, freeze=True)
    m = torch.nn.Linear(1, 1, bias=False)
    m.weight = torch.nn.Parameter(t, requires_grad=False)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="path to a .safetensors file")
    ap.add_argument("out", help="output CSV")
    ap.add_argument("--include", help="regex on tensor names (re.search)")
    ap.add_argument("--fix-fingers", choices=["clip_xmax"], default=None)
    args = ap.parse_args()

    mats = load_matrices(args.model, args.include)
    model = torch.nn.Sequential(*(as_module(n, t) for n, t in mats))
    kwargs = {"fix_fingers": args.fix_fingers} if args.fix_fingers else {}

    t0 = time.perf_counter()
    details = ww.WeightWatcher(model=model).analyze(randomize=True, mp_fit=True, **kwargs)
    wall = time.perf_counter() - t0

    # WW's own `name` is the module name (= the index); keep it as ww_name.
    names = [mats[int(ln)][0] for ln in details["longname"]]
    details = details.rename(columns={"name": "ww_name"})
    details.insert(0, "name", names)
    details.to_csv(args.out, index=False)
    skipped = [f"{n} {tuple(t.shape)}" for n, t in mats if n not in set(names)]
    lines = [f"analyze_wall_s={wall:.3f}", f"matrices={len(mats)}", f"analysed={len(names)}"]
    lines += [f"skipped={s}" for s in skipped]
    with open(args.out + ".time", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
