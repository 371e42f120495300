#!/usr/bin/env bash
# One GPU check, for a person with one H100/H200 for 15 minutes: run it once, bring back one JSON file.
#
#   PYTHONPATH=/path/to/wheels bash bench/gpu_check.sh          # -> ${OUT:-./gpu_check_out}/gpu_check.json
#
# It installs nothing. The GPU machine (docs/DESIGN.md) has Python 3.12, torch 2.11 + CUDA 13, triton, transformers,
# pytest; megatron-core (and datasets, math-verify, ...) must be carried as wheels installed with
# `pip install --no-index --no-deps --target DIR` and DIR put on PYTHONPATH by the caller. The repository root is
# prepended to PYTHONPATH here.
#
# Parts, in this order, each under its own `timeout` (a hang costs at most that part's limit), all within an overall
# budget (GPU_CHECK_BUDGET_S, default 465 s, under 8 minutes): a part gets min(its limit, what is left) and is skipped
# when less than 15 s are left.
#   env          torch / CUDA / device / triton / megatron versions
#   pytest_gpu   pytest -m gpu -q
#   dasd_step    bench/dasd_step.py --rollouts 32 --steps 2 --baseline --profile --json ..., the single-pass full and
#                sampled variants, each also on the landed baseline path (GPU_CHECK_DASD_ARGS replaces the arguments;
#                its --json file is rewritten after every variant, so a part cut short keeps what it measured)
#   kernels      bench/fused_kernels.py (--json when it takes it; "missing" when the file is not there)
#   loss         bench/loss.py --device cuda --tokens 16384 --vocab 151936 --dtype bf16 --compile --repeats 3
#   train_setup  a tiny random Qwen3 HF folder with a tokenizer and a JSONL of sums (tests/hf_fixtures.py)
#   train        dasd train --nproc 1, 3 steps, bf16, a checkpoint every step, the built-in rollout server (CPU)
#   lora         bench/lora.py --rollouts 32 --steps 2 --json ...: LoRA vs full at the Qwen3-0.6B shape (memory, time)
#   model        bench/model.py --seq 4096 --dtype bfloat16 --out ...
# gpu_check.json: per part the command, rc, wall seconds, the limit it ran under, its status (ok / failed /
# timed_out / skipped / missing / dry), its RESULT json (or pytest's counts, or the training run's metrics), and the
# tail of its log when it did not pass; the full logs are next to it (<part>.log). Exit status: 0 when every part
# that ran passed, 1 otherwise (the JSON is written either way), 2 when there is no GPU (and not a dry/tiny run).
#
# Environment:
#   OUT                    output folder (default ./gpu_check_out)
#   PYTHON                 the interpreter (default python)
#   GPU_CHECK_DRY=1        print the commands and record them; run only the env part (checks the plumbing on CPU)
#   GPU_CHECK_TINY=1       run every part at CPU-smoke sizes (no pytest -m gpu): the plumbing end to end on a CPU
#   GPU_CHECK_PARTS=a,b    run only these parts (train needs train_setup)
#   GPU_CHECK_BUDGET_S     overall budget in seconds (default 465)
#   GPU_CHECK_DASD_ARGS    arguments of bench/dasd_step.py (replacing the default ones, --json is added)

set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$(mkdir -p "${OUT:-./gpu_check_out}" && cd "${OUT:-./gpu_check_out}" && pwd)"  # relative to the caller
cd "$ROOT"
PY="${PYTHON:-python}"
DRY="${GPU_CHECK_DRY:-0}"
TINY="${GPU_CHECK_TINY:-0}"
PARTS="${GPU_CHECK_PARTS:-}"
BUDGET="${GPU_CHECK_BUDGET_S:-465}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
META="$OUT_DIR/parts"
rm -rf "$META" && mkdir -p "$META"
ORDER=()

want() { [[ -z "$PARTS" || ",$PARTS," == *",$1,"* ]]; }

# meta NAME KEY VALUE: one line of the part's record (read back by the collector)
meta() { printf '%s=%s\n' "$2" "$3" >>"$META/$1.meta"; }

# run_part NAME LIMIT_S KIND RESULT_PATH CMD...: run CMD under timeout, log to NAME.log, record rc / wall / limit.
# KIND tells the collector how to read the result: json (RESULT_PATH, else a RESULT line or the last JSON line of
# the log), pytest, train (RESULT_PATH is the run folder), env.
run_part() {
    local name=$1 limit=$2 kind=$3 result=$4
    shift 4
    ORDER+=("$name")
    : >"$META/$name.meta"
    meta "$name" kind "$kind"
    meta "$name" result "$result"
    printf '%q ' "$@" >"$META/$name.cmd"
    if ! want "$name"; then
        meta "$name" status not_selected
        return 0
    fi
    local left=$((DEADLINE - $(date +%s)))
    if ((left < 15)); then
        meta "$name" status skipped
        meta "$name" reason "overall budget spent (${BUDGET}s)"
        echo "[gpu_check] $name: skipped (budget spent)"
        return 0
    fi
    ((limit > left)) && limit=$left
    meta "$name" limit_s "$limit"
    if [[ "$DRY" == 1 && "$kind" != env ]]; then
        echo "[gpu_check dry] $name (limit ${limit}s): timeout -k 10 $limit $(cat "$META/$name.cmd")"
        meta "$name" status dry
        return 0
    fi
    echo "[gpu_check] $name (limit ${limit}s): $(cat "$META/$name.cmd")"
    local t0 t1 rc
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    meta "$name" rc "$rc"
    meta "$name" wall_s "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
    meta "$name" status ran
    echo "[gpu_check] $name: rc $rc"
}

missing_part() {  # missing_part NAME WHY: record a part that cannot run here (not a failure)
    ORDER+=("$1")
    : >"$META/$1.meta"
    meta "$1" kind none
    meta "$1" status missing
    meta "$1" reason "$2"
    echo "[gpu_check] $1: missing ($2)"
}

# ---------------------------------------------------------------------------------------------------------- parts
ENV_PY='
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "device_count": torch.cuda.device_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["device_memory_gib"] = p.total_memory / 2**30
    info["sm_count"] = p.multi_processor_count
for mod in ("triton", "megatron.core", "transformers", "tokenizers", "datasets", "math_verify", "transformer_engine"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        info[mod] = getattr(m, "__version__", "present")
    except Exception as exc:
        info[mod] = None
        info[mod + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
print("RESULT " + json.dumps(info))
'
run_part env 30 env "" "$PY" -c "$ENV_PY"

if [[ "$DRY" != 1 && "$TINY" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[gpu_check] no CUDA device visible to $PY (GPU_CHECK_DRY=1 or GPU_CHECK_TINY=1 check the plumbing on a CPU)"
    NO_GPU=1
else
    NO_GPU=0
fi

if [[ "$NO_GPU" == 0 ]]; then
    if [[ "$TINY" == 1 ]]; then
        DASD_ARGS=(--tiny --steps 1 --baseline --profile --variants full/single_pass)
        LOSS_ARGS=(--device cpu --tokens 128 --vocab 1000 --dtype fp32 --check-tokens 64)
        MODEL_ARGS=(--tiny --seq 64 --steps 1 --warmup 1)
        TRAIN_DTYPE=float32
    else
        DASD_ARGS=(--rollouts 32 --steps 2 --baseline --profile --variants full/single_pass,sampled/single_pass
                   --baseline-variants full/single_pass,sampled/single_pass)
        LOSS_ARGS=(--device cuda --tokens 16384 --vocab 151936 --dtype bf16 --compile --repeats 3)
        MODEL_ARGS=(--seq 4096 --dtype bfloat16)
        TRAIN_DTYPE=bfloat16
    fi
    if [[ -n "${GPU_CHECK_DASD_ARGS:-}" ]]; then
        read -r -a DASD_ARGS <<<"$GPU_CHECK_DASD_ARGS"
    fi

    if [[ "$TINY" == 1 ]]; then
        ORDER+=(pytest_gpu)
        : >"$META/pytest_gpu.meta"
        meta pytest_gpu kind pytest
        meta pytest_gpu status skipped
        meta pytest_gpu reason "GPU_CHECK_TINY: no GPU tests on a CPU"
    else
        run_part pytest_gpu 90 pytest "" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
    fi

    run_part dasd_step 170 json "$OUT_DIR/dasd_step.json" \
        "$PY" bench/dasd_step.py "${DASD_ARGS[@]}" --json "$OUT_DIR/dasd_step.json"

    if [[ -f bench/fused_kernels.py ]]; then
        if timeout -k 5 30 "$PY" bench/fused_kernels.py --help 2>/dev/null | grep -q -- "--json"; then
            run_part kernels 50 json "$OUT_DIR/kernels.json" "$PY" bench/fused_kernels.py --json "$OUT_DIR/kernels.json"
        else
            run_part kernels 50 json "" "$PY" bench/fused_kernels.py
        fi
    else
        missing_part kernels "bench/fused_kernels.py is not in this tree"
    fi

    run_part loss 75 json "" "$PY" bench/loss.py "${LOSS_ARGS[@]}"

    WORK="$OUT_DIR/work"
    SETUP_PY="
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), 'tests'))
from hf_fixtures import make_tiny_hf, write_sum_problems
os.makedirs('$WORK', exist_ok=True)
make_tiny_hf('$WORK/model', 'qwen3')
write_sum_problems('$WORK/data.jsonl')
print('RESULT {\"model\": \"$WORK/model\", \"data\": \"$WORK/data.jsonl\"}')
"
    rm -rf "$WORK/run"
    run_part train_setup 40 json "" "$PY" -c "$SETUP_PY"
    PORT=$("$PY" -c "from dasd_megatron.testing.distributed import free_port; print(free_port())" 2>/dev/null \
           || echo 31000)
    run_part train 110 train "$WORK/run" "$PY" -m dasd_megatron.cli train --nproc 1 \
        "model.hf_config=$WORK/model" "data.source=$WORK/data.jsonl" train.steps=3 train.prompts_per_step=2 \
        train.samples_per_prompt=2 train.max_prompt_tokens=64 train.max_response_tokens=8 \
        train.micro_batch_tokens=128 model.seq_length=128 "precision.params_dtype=$TRAIN_DTYPE" \
        "run_dir=$WORK/run" "rollout.base_port=$PORT" train.checkpoint_interval=1 train.keep_last_checkpoints=2 \
        optim.lr=1e-3

    if [[ "$TINY" == 1 ]]; then
        LORA_ARGS=(--tiny --steps 1)
    else
        LORA_ARGS=(--rollouts 32 --steps 2)
    fi
    run_part lora 60 json "$OUT_DIR/lora.json" "$PY" bench/lora.py "${LORA_ARGS[@]}" --json "$OUT_DIR/lora.json"

    run_part model 50 json "$OUT_DIR/model.json" "$PY" bench/model.py "${MODEL_ARGS[@]}" --out "$OUT_DIR/model.json"
fi

# -------------------------------------------------------------------------------------------------------- collect
TOTAL=$(( $(date +%s) - START ))
"$PY" - "$OUT_DIR" "$META" "${ORDER[*]}" "$TOTAL" "$NO_GPU" "$DRY" "$TINY" <<'PYEOF'
import glob, json, os, re, sys

out_dir, meta_dir, order, total, no_gpu, dry, tiny = sys.argv[1:8]
order = order.split()


def read_meta(name):
    m = {}
    with open(os.path.join(meta_dir, name + ".meta")) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            m[k] = v
    cmd = os.path.join(meta_dir, name + ".cmd")
    if os.path.exists(cmd):
        m["cmd"] = open(cmd).read().strip()
    return m


def tail(path, n=4000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return None


def json_from_log(path):
    text = tail(path, 10**8) or ""
    lines = text.splitlines()
    for ln in reversed(lines):
        if ln.startswith("RESULT "):
            try:
                return json.loads(ln[len("RESULT "):])
            except ValueError:
                pass
    for ln in reversed(lines):
        if ln.startswith("{"):
            try:
                return json.loads(ln)
            except ValueError:
                pass
    return None


def pytest_counts(path):
    text = tail(path, 20000) or ""
    last = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)]
    if not last:
        return None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                                last[-1])}
    return {"summary": last[-1].strip("= "), **counts}


def train_result(run_dir):
    res = {"run_dir": run_dir}
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
    res["steps"] = [r.get("step") for r in rows]
    keep = ("step", "loss/dasd", "loss/num_tokens", "grad_norm", "update_successful", "rollout/num_samples",
            "rollout/logp_mismatch_abs")
    res["metrics"] = [{k: r[k] for k in r if k in keep or k.startswith("time/") or k.startswith("timing/")}
                      for r in rows]
    ck = os.path.join(run_dir, "checkpoints")
    res["checkpoints"] = sorted(os.listdir(ck)) if os.path.isdir(ck) else []
    res["report"] = os.path.exists(os.path.join(run_dir, "report", "report.md"))
    return res


parts, failed = {}, []
for name in order:
    m = read_meta(name)
    p = {"status": m.get("status"), "cmd": m.get("cmd")}
    for k in ("reason",):
        if k in m:
            p[k] = m[k]
    log = os.path.join(out_dir, name + ".log")
    if m.get("status") == "ran":
        rc = int(m["rc"])
        p.update(rc=rc, wall_s=float(m["wall_s"]), limit_s=int(m["limit_s"]), timed_out=rc in (124, 137),
                 log=log)
        kind, result = m.get("kind"), m.get("result") or ""
        if kind == "pytest":
            p["result"] = pytest_counts(log)
        elif kind == "train":
            p["result"] = train_result(result)
        elif result and os.path.exists(result):
            with open(result) as f:
                p["result"] = json.load(f)
        else:
            p["result"] = json_from_log(log)
        ok = rc == 0 and p["result"] is not None
        if kind == "train" and ok:
            ok = len(p["result"]["steps"]) >= 3
        p["status"] = "ok" if ok else ("timed_out" if p["timed_out"] else "failed")
        if not ok:
            failed.append(name)
            p["log_tail"] = tail(log)
    parts[name] = p

env = parts.get("env", {}).get("result") or {}
summary = {"device": env.get("device"), "total_wall_s": float(total), "dry": dry == "1", "tiny": tiny == "1",
           "no_gpu": no_gpu == "1", "failed": failed, "ok": not failed and no_gpu != "1", "parts": parts}
# the headline numbers, for a quick look
ds = (parts.get("dasd_step") or {}).get("result") or {}
summary["headline"] = {k: ds.get(k) for k in ("speedup_vs_baseline_full", "speedup_vs_baseline_sampled", "mfu",
                                              "achieved_tflops", "model_tflops_per_step", "aten_ops_per_step")}
fs = (ds.get("results") or {}).get("full/single_pass") or {}
prof = fs.get("profile") or {}
summary["headline"].update({f"full_single_pass_{k}": prof.get(k) for k in
                            ("kernel_launches", "host_syncs", "cuda_memcpy_async", "gpu_busy_fraction")})
summary["headline"]["full_single_pass_step_s"] = fs.get("step_s")
path = os.path.join(out_dir, "gpu_check.json")
with open(path, "w") as f:
    json.dump(summary, f, indent=2)
print(f"[gpu_check] wrote {path}: " + ("all parts passed" if summary["ok"] else
      ("no GPU" if no_gpu == "1" else f"failed: {failed}")))
for name, p in parts.items():
    print(f"  {name:>12}: {p['status']:<12} rc {p.get('rc')}  {p.get('wall_s', 0):7.1f} s")
sys.exit(0 if summary["ok"] else (2 if no_gpu == "1" else 1))
PYEOF
