#!/usr/bin/env bash
# The one command for a GPU machine (one H200, nothing downloaded), ~11 minutes at most:
#   1. nvidia-smi, disk and memory facts;
#   2. the GPU-vs-CPU equality tests: python -m pytest -q -m gpu (at most PYTEST_TIMEOUT s);
#   3. benchmarks/gpu_gptoss.py: a synthetic gpt-oss-20b-shaped checkpoint generated on this
#      machine's disk and audited end to end, with the 120b projection, stopped in time to report
#      (--budget) so that the whole script stays within GPU_CHECK_BUDGET seconds;
#   4. the modular-addition ensemble (10 members on the GPU, ENSEMBLE_MINUTES, default 6),
#      written to $OUT/modadd_ensemble (resumable: copy it back and rerun to continue); its
#      step is compiled as CUDA graphs (--compile auto; plain step if compilation fails, and
#      tests/test_toy_modadd.py's gpu test checks it against the CPU step first).
# Logs and gpu_gptoss.json go to $OUT if it is set (else /tmp). Exit status: 0 if both steps
# passed, 1 if the tests failed (or none were selected), 2 if the benchmark failed or was cut
# short, 3 if both; 4 is added if the ensemble failed.
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_BUDGET=600 PYTEST_TIMEOUT=180 bash benchmarks/gpu_check.sh -- --trap-rule ww
# (arguments after -- go to gpu_gptoss.py)
set -uo pipefail

T0=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-270}      # tests + gpt-oss benchmark, seconds
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-150}
DEST=${OUT:-/tmp}
mkdir -p "$DEST"
cd "$(dirname "$0")/.." || exit 2
[ "${1:-}" = "--" ] && shift
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python3 || command -v python)}

echo "== gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S') UTC, repo $PWD, python $PY, budget ${BUDGET} s"
nvidia-smi || echo "nvidia-smi failed"
df -hT 2>/dev/null | grep -v -E "^(proc|sysfs|devpts|mqueue|cgroup)"
free -g 2>/dev/null
echo "cpus: $(nproc)"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available())"

if ! "$PY" -c "import llm_audit" 2>/dev/null; then
    echo "llm_audit not importable: pip install -e . --no-deps"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "pip install failed"
fi

# -- 1. GPU tests. Only the files that mark tests `gpu` are collected (a test module that needs a
# package this machine lacks must not stop the collection); all of tests/ if none says so.
mapfile -t FILES < <(grep -lE 'mark\.gpu|pytestmark.*gpu' tests/test_*.py 2>/dev/null)
[ ${#FILES[@]} -eq 0 ] && FILES=(tests)
echo "== pytest -m gpu ${FILES[*]} (timeout ${PYTEST_TIMEOUT} s)"
timeout -k 10 "$PYTEST_TIMEOUT" "$PY" -m pytest -q -m gpu -p no:cacheprovider "${FILES[@]}" \
    2>&1 | tee "$DEST/pytest_gpu.log"
TEST_RC=${PIPESTATUS[0]}
case $TEST_RC in
    0) echo "== pytest: PASS" ;;
    5) echo "== pytest: FAIL (no test selected by -m gpu)" ;;
    124|137) echo "== pytest: FAIL (timed out after ${PYTEST_TIMEOUT} s)" ;;
    *) echo "== pytest: FAIL (exit $TEST_RC)" ;;
esac

# -- 2. The benchmark, within what is left of the budget.
LEFT=$((BUDGET - (SECONDS - T0)))
if [ "$LEFT" -lt 120 ]; then
    LEFT=120
fi
echo "== gpu_gptoss.py (budget ${LEFT} s)"
timeout -k 20 "$((LEFT + 10))" "$PY" benchmarks/gpu_gptoss.py --budget "$LEFT" \
    --json "$DEST/gpu_gptoss.json" "$@" 2>&1 | tee "$DEST/gpu_gptoss.log"
BENCH_RC=${PIPESTATUS[0]}
case $BENCH_RC in
    0) echo "== gpu_gptoss: complete" ;;
    3) echo "== gpu_gptoss: PARTIAL (stopped at the budget; see the report above)" ;;
    *) echo "== gpu_gptoss: FAIL (exit $BENCH_RC)" ;;
esac

# -- 3. The modular-addition ensemble (weight decay {1, 0.3, 0.1, 0.03, 0} x seeds {0, 1}),
# resumable, in the time left (ENSEMBLE_MINUTES, default 8); its folders go to $DEST.
ENS_MIN=${ENSEMBLE_MINUTES:-6}
echo "== modadd-ensemble (${ENS_MIN} min)"
timeout -k 30 "$((ENS_MIN * 60 + 240))" "$PY" -m toy_experiments modadd-ensemble \
    --out "$DEST/modadd_ensemble" --device cuda --time-limit "$ENS_MIN" 2>&1 | tail -n 40 \
    | tee "$DEST/modadd_ensemble.log"
ENS_RC=${PIPESTATUS[0]}
echo "== modadd-ensemble: exit $ENS_RC"

RC=0
[ "$ENS_RC" -ne 0 ] && RC=$((RC | 4))
[ "$TEST_RC" -ne 0 ] && RC=$((RC | 1))
[ "$BENCH_RC" -ne 0 ] && RC=$((RC | 2))
echo "== gpu_check done in $((SECONDS - T0)) s: tests rc $TEST_RC, benchmark rc $BENCH_RC -> exit $RC"
exit $RC
