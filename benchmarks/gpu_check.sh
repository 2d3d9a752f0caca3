#!/usr/bin/env bash
# The accelerator check of the scale work, as one script of at most 8 minutes on one H200 (about 5 expected):
#   1. train the digits U-Net (`train --data digits --net unet`) for 2000 steps on CUDA with bf16;
#   2. evaluate it on CUDA and on the CPU with the same seed (same keyed noise) and check that they agree within
#      the estimator's standard error; also CUDA bf16 against CUDA fp32;
#   3. measure the throughput of the estimators against the network alone (benchmarks/throughput.py) for the
#      three models, the CIFAR-size U-Net included, in fp32 and bf16.
# Everything is written under $OUT (default bench_out/gpu_check): JSON results, the two throughput tables and
# summary.md (device-labelled figures to copy into docs/benchmarks.md). Exits non-zero if a check fails.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh
set -euo pipefail

OUT="${OUT:-bench_out/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="${PWD}/src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
T0=$(date +%s)
stamp() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

stamp "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/torch.txt"

stamp "1. train the digits U-Net, 2000 steps, CUDA, bf16"
rm -rf "$OUT/digits-unet"
timeout 300 "$PY" -m scoredensity train --data digits --net unet --steps 2000 --device cuda --precision bf16 \
  --out "$OUT/digits-unet" --no-progress --json > "$OUT/train.json"

stamp "2. evaluate on CUDA (fp32, bf16) and on the CPU (fp32), same seed"
EVAL=(-m scoredensity evaluate "$OUT/digits-unet" --n-t 32 --seed 0 --json --no-progress)
timeout 120 "$PY" "${EVAL[@]}" --device cuda > "$OUT/eval_cuda_fp32.json"
timeout 120 "$PY" "${EVAL[@]}" --device cuda --precision bf16 > "$OUT/eval_cuda_bf16.json"
timeout 240 "$PY" "${EVAL[@]}" --device cpu --threads 16 > "$OUT/eval_cpu_fp32.json"

stamp "3. throughput (fp32 and bf16) on CUDA"
timeout 240 "$PY" benchmarks/throughput.py --device cuda --doc "$OUT/bench_throughput_cuda_fp32.md"
timeout 120 "$PY" benchmarks/throughput.py --device cuda --precision bf16 --models digits-unet,cifar-unet \
  --doc "$OUT/bench_throughput_cuda_bf16.md"

stamp "checks and summary"
"$PY" - "$OUT" <<'EOF'
import json, math, sys
from pathlib import Path

out = Path(sys.argv[1])
r = {k: json.loads((out / f"eval_{k}.json").read_text()) for k in ("cuda_fp32", "cuda_bf16", "cpu_fp32")}
lines = ["# GPU check (benchmarks/gpu_check.sh)", "", (out / "torch.txt").read_text().strip(), ""]
lines += ["| evaluation | device | precision | bits/dim | ± (images) | estimator ± | NFE/image |", "|---|---|---|---|---|---|---|"]
for k, v in r.items():
    lines.append(f"| {k} | {v['device']} | {v['precision']} | {v['bpd']:.4f} | {v['bpd_stderr']:.4f} | "
                 f"{v['estimator_stderr'] / (v['dim'] * math.log(2)):.4f} | {v['nfe_per_example']:.1f} |")
ok = True
for a, b in (("cuda_fp32", "cpu_fp32"), ("cuda_bf16", "cuda_fp32")):
    x, y = r[a], r[b]
    diff = x["nll"] - y["nll"]  # nats per image, same test images and the same keyed noise on both sides
    se = math.hypot(x["estimator_stderr"], y["estimator_stderr"])
    good = abs(diff) <= 3 * se
    ok &= good
    lines.append(f"\n{a} - {b}: {diff:+.5f} nats/image (estimator se of the difference if independent {se:.5f}): "
                 f"{'agree' if good else 'DISAGREE'} within 3 se")
lines += ["", "Throughput (fp32):", "", (out / "bench_throughput_cuda_fp32.md").read_text(),
          "Throughput (bf16):", "", (out / "bench_throughput_cuda_bf16.md").read_text()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(0 if ok else 1)
EOF
stamp "done"
