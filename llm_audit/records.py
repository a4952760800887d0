"""The per-matrix result record: one row of ``layers.csv``.

Column names follow WeightWatcher 0.7.x where the quantity is the same, so users can read them;
a failed quantity is NaN (empty in CSV), never a sentinel like -1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .anatomy import TrapInfo

NAN = math.nan


@dataclass(frozen=True)
class MatrixResult:
    name: str  # tensor name exactly as in the file (+ "[e]" for expert e of a stacked tensor)
    layer: int | None  # block index parsed from the name
    module: str  # e.g. q_proj, dense, down_proj
    expert: int | None  # expert index for MoE weights, None for dense tensors
    N: int  # max(rows, cols)
    M: int  # min(rows, cols)
    dtype: str  # stored dtype / scheme of the source tensor (GGUF: the GGML type, Q4_K, ...)
    # the Hugging Face module this matrix is (GGUF's attn_q -> q_proj); empty -> `module`, so
    # GGUF and safetensors audits of one model match on (layer, hf_module, expert)
    hf_module: str = ""
    # power-law fit of the ESD (HTSR layer quality)
    alpha: float = NAN
    alpha_weighted: float = NAN
    xmin: float = NAN
    D: float = NAN
    sigma: float = NAN
    num_pl_spikes: int = 0
    num_fingers: int = 0
    raw_alpha: float = NAN
    # norms of the ESD
    lambda_max: float = NAN
    log_norm: float = NAN
    log_spectral_norm: float = NAN
    stable_rank: float = NAN
    entropy: float = NAN
    matrix_rank: int = 0
    # Marchenko-Pastur fit of the ESD
    num_spikes: int = 0
    sigma_mp: float = NAN
    bulk_max: float = NAN
    # correlation traps: spikes of the element-shuffled matrix beyond its MP bulk
    rand_num_spikes: int = 0
    max_rand_eval: float = NAN
    rand_bulk_max: float = NAN
    rand_sigma_mp: float = NAN
    rand_distance: float = NAN
    trap_threshold: float = NAN
    # what the traps are made of (anatomy.py): their classes sum to rand_num_spikes
    traps_mean: int = 0  # the rank-1 spike of a non-zero entry mean (ww rule only)
    traps_entries: int = 0  # gone when <= 16 entries are clipped: a handful of outliers
    traps_tail: int = 0  # survive that: a heavy-tailed entry distribution
    trap_entries: int = 0  # distinct original entries behind the `entries` traps
    trap_rows: int = 0  # distinct original rows they sit in
    trap_cols: int = 0  # distinct original columns they sit in
    # confound controls for traps
    entry_mean: float = NAN
    entry_std: float = NAN
    mean_spike: float = NAN  # spike the entries' mean alone creates after shuffling: mean²·N·M
    max_abs_w_over_std: float = NAN  # largest |w| in units of the entries' std
    # quantization anomalies
    nan_scales: int = 0  # MXFP4 scales equal to 255 (NaN in the OCP MX spec) behind this matrix
    # verdicts
    warning: str = ""  # over-trained | under-trained | failed: <reason> | non-finite ... | ""
    status: str = "ok"  # ok | failed
    precision: str = ""  # float32 | float64: the precision the eigenvalues were computed in
    trap_precision: str = ""  # float32 | float64: the precision the trap count was decided in
    # cost, in seconds; a stack's shared work (reading, one batched eigensolve) split evenly
    seconds: float = NAN  # analysis of this matrix (eigen + fit + traps)
    read_seconds: float = NAN  # reading its bytes (background thread)
    decode_seconds: float = NAN  # dequantizing (background thread)
    wait_seconds: float = NAN  # analysis waiting for its bytes (I/O that compute did not hide)
    eigen_seconds: float = NAN  # Gram matrix + eigenvalues
    fit_seconds: float = NAN  # power-law, MP fit, norms, confounds
    trap_seconds: float = NAN  # shuffle + top of the shuffled spectrum

    # one record per trap (the rows of traps.csv); not a column of layers.csv
    traps: tuple[TrapInfo, ...] = field(default=(), repr=False)
    outliers: tuple[tuple[int, int], ...] = field(default=(), repr=False)  # (row, col)

    def __post_init__(self) -> None:
        if not self.hf_module:
            object.__setattr__(self, "hf_module", self.module)

    def as_row(self) -> dict:
        return {c: getattr(self, c) for c in COLUMNS}


NOT_COLUMNS = ("traps", "outliers")
COLUMNS = tuple(f.name for f in fields(MatrixResult) if f.name not in NOT_COLUMNS)
#: columns that measure cost, not the model: they differ from run to run
TIMING_COLUMNS = tuple(c for c in COLUMNS if c == "seconds" or c.endswith("_seconds"))


#: the columns of traps.csv: one row per trap
TRAP_COLUMNS = ("name", "rule", "trap", "eigenvalue", "class", "half_mass_entries", "entries")


def trap_table_rows(result: MatrixResult, rule: str) -> list[dict]:
    """The rows of traps.csv for one matrix; `entries` as 'row:col' separated by spaces."""
    return [{"name": result.name, "rule": rule, "trap": t.trap, "eigenvalue": t.eigenvalue,
             "class": t.cls, "half_mass_entries": t.half_mass_entries,
             "entries": " ".join(f"{r}:{c}" for r, c in t.entries)} for t in result.traps]
