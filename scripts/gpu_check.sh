#!/usr/bin/env bash
# Every GPU check of issue 11, in order, each under its own time limit, inside one overall budget:
#   1. env      python, torch (CUDA build?), triton, normzoo's imports, nvidia-smi's GPU name   -> env_TAG.json
#   2. tests    pytest -m cuda (tests/test_cuda.py)                                            -> cuda_tests_TAG.{txt,xml}
#   3. equiv    the default equivalence sweep (configs/equivalence.yaml) on the device          -> equivalence_TAG.{md,json}
#   4. speed    configs/speed_cuda.yaml on the device                                            -> speed_TAG.{md,json,png}
#   5. summary  steps, test counts, verdicts, the speed targets                                  -> gpu_check_summary_TAG.md
# TAG is the device (cuda), or cpu_tiny for the dry run. Exit 0 when every step exited 0, else 1.
# A failed or timed-out step does not stop the others; the sweeps rewrite their reports after each case, so a step
# cut at its limit (SIGINT) keeps what it finished. Nothing is installed: run it where `pip install -e .[test]` was
# done over a CUDA build of torch, or with PYTHON naming such an interpreter (the checkout is put on PYTHONPATH).
#
#   bash scripts/gpu_check.sh                          # on the GPU machine, from anywhere in the checkout
#   DEVICE=cpu TINY=1 OUT=/tmp/dry bash scripts/gpu_check.sh   # a dry run of the plumbing on a CPU: tiny sweeps
#
# Environment: DEVICE (cuda; cpu for a dry run), TINY=1 (tiny sweeps instead of the real ones), OUT (where
# everything is written; default reports/), PYTHON (default: the first of .venv/bin/python, python3, python whose
# torch sees CUDA, else the first with torch), TOTAL_S (overall budget, default 420 s), T_ENV, T_TESTS, T_EQ,
# T_SPEED (per-step limits, default 45, 120, 150, 180 s; each is cut to what is left of TOTAL_S),
# TORCHINDUCTOR_CACHE_DIR (default /tmp/normzoo_inductor_cache: a rerun on the same machine compiles nothing).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
TAG=$DEVICE
[ "$TINY" = 1 ] && TAG="${DEVICE}_tiny"
DEST=${OUT:-$ROOT/reports}
mkdir -p "$DEST" || exit 2
DEST=$(cd "$DEST" && pwd)
START=$(date +%s)
DEADLINE=$((START + ${TOTAL_S:-420}))
STEPS="$DEST/steps_$TAG.tsv"
: > "$STEPS"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/normzoo_inductor_cache}
export PYTHONUNBUFFERED=1

if [ -z "${PYTHON:-}" ]; then
    for want in "torch.cuda.is_available()" "True"; do
        for c in "$ROOT/.venv/bin/python" python3 python; do
            if command -v "$c" > /dev/null 2>&1 && "$c" -c "import torch, sys; sys.exit(0 if $want else 1)" \
                    > /dev/null 2>&1; then
                PYTHON=$c
                break 2
            fi
        done
    done
fi
if [ -z "${PYTHON:-}" ]; then
    echo "gpu_check: no python with torch found (set PYTHON=/path/to/python)" >&2
    exit 2
fi

say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

# run_step NAME LIMIT_S COMMAND...: output to DEST/NAME_TAG.txt, its tail to stdout, a row to STEPS
run_step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 15 ]; then
        say "$name: skipped, the overall budget (TOTAL_S) is spent"
        printf '%s\tskipped\t0\t0\n' "$name" >> "$STEPS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local log="$DEST/${name}_$TAG.txt" t0 rc
    say "$name: start (limit ${limit}s): $*"
    t0=$(date +%s)
    # SIGINT first: the sweeps and pytest stop cleanly and keep what they finished; SIGKILL 20 s later
    timeout -s INT -k 20 "$limit" "$@" > "$log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >> "$STEPS"
    tail -n 12 "$log" | sed "s/^/  [$name] /"
    say "$name: exit $rc after $(($(date +%s) - t0))s; full output in $log"
}

if [ "$TINY" = 1 ]; then  # the dry run's sweeps: a few cases, a tiny speed shape, one block
    EQ_CONFIG="$DEST/tiny_equivalence.yaml"
    SPEED_CONFIG="$DEST/tiny_speed.yaml"
    cat > "$EQ_CONFIG" << 'EOF'
grids:
  - layers: [gn8, bn]
    shapes: [[2, 16, 4, 4]]
    dtypes: [float32, bfloat16]
    layouts: [contiguous, channels_last]
    offsets: [0, 1e3]
    compiled: [false]
  - layers: [ln]
    shapes: [[2, 6, 32]]
    compiled: [true]
EOF
    cat > "$SPEED_CONFIG" << 'EOF'
threads: 1
blocks: 1
grids:
  - layers: [gn8, {name: gn8_silu, type: group_norm, num_groups: 8, activation: silu}]
    shapes: [[2, 16, 8, 8]]
    passes: [forward]
EOF
    TEST_FILTER=(-k "not compiled and not kernel_cache")  # the Inductor compiles are the slow part on a CPU
else
    EQ_CONFIG=configs/equivalence.yaml
    SPEED_CONFIG=configs/speed_cuda.yaml
    TEST_FILTER=()
fi

say "device $DEVICE, python $PYTHON, reports in $DEST, budget ${TOTAL_S:-420}s"

run_step env "${T_ENV:-45}" "$PYTHON" - "$DEST/env_$TAG.json" "$DEVICE" << 'EOF'
import datetime, json, platform, shutil, subprocess, sys
out, device = sys.argv[1], sys.argv[2]
env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "python": platform.python_version(), "executable": sys.executable, "device": device}
if shutil.which("nvidia-smi"):
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)
    env["nvidia_smi"] = (r.stdout or r.stderr).strip()
    print("nvidia-smi:", env["nvidia_smi"])
else:
    env["nvidia_smi"] = None
    print("nvidia-smi: not found")
import torch
env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    env["gpu"] = torch.cuda.get_device_name()
    env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
try:
    import triton
    env["triton"] = triton.__version__
except ImportError:
    env["triton"] = None
missing = []
for mod in ("numpy", "yaml", "tabulate", "pytest", "normzoo"):
    try:
        m = __import__(mod)
        if mod == "normzoo":
            env["normzoo"] = m.__file__
    except ImportError as err:
        missing.append(f"{mod} ({err})")
env["missing"] = missing
json.dump(env, open(out, "w"), indent=1)
print(json.dumps(env, indent=1))
if missing:
    print("missing imports: " + ", ".join(missing) + "; install with pip install -e '.[test]'", file=sys.stderr)
if device == "cuda" and not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no GPU: the next steps will fail", file=sys.stderr)
    sys.exit(2)
sys.exit(1 if missing else 0)
EOF

run_step tests "${T_TESTS:-120}" env NORMZOO_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -m cuda -q -rs -p no:cacheprovider \
    --junitxml="$DEST/cuda_tests_$TAG.xml" ${TEST_FILTER[@]+"${TEST_FILTER[@]}"} tests/test_cuda.py

run_step equivalence "${T_EQ:-150}" "$PYTHON" scripts/write_equivalence_report.py "$EQ_CONFIG" --device "$DEVICE" \
    --out "$DEST/equivalence_$TAG"

run_step speed "${T_SPEED:-180}" "$PYTHON" scripts/write_speed_report.py "$SPEED_CONFIG" --device "$DEVICE" \
    --out "$DEST/speed_$TAG"

# the summary always runs (it only reads the files above), whatever the budget left
timeout 30 "$PYTHON" scripts/gpu_summary.py "$DEST" --device "$DEVICE" --tag "$TAG" > /dev/null 2>&1 \
    || say "summary: failed (exit $?)"
failed=$(awk -F'\t' '$2 != "0" {printf "%s%s(%s)", sep, $1, $2; sep=" "}' "$STEPS")
echo
cat "$DEST/gpu_check_summary_$TAG.md" 2> /dev/null
echo
say "done in $(($(date +%s) - START))s; steps not passing: ${failed:-none}. Reports in $DEST:"
ls -1 "$DEST" | grep -E "_$TAG\.(md|json|png|txt|xml|tsv)$" | sed 's/^/  /'
[ -z "$failed" ]
