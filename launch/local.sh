#!/usr/bin/env bash
# Launch training on this machine. Usage:
#   launch/local.sh deepspeed N CONFIG [key=value ...]   # DeepSpeed launcher, N GPUs (or N CPU ranks without a GPU)
#   launch/local.sh torchrun  N CONFIG [key=value ...]   # torchrun, N processes
#   launch/local.sh debug       CONFIG [key=value ...]   # one process, no launcher
# Without a visible GPU, DeepSpeed's CPU accelerator (gloo) is selected and threads are split between ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: launch/local.sh deepspeed|torchrun N CONFIG [overrides] | debug CONFIG [overrides]}
shift
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
BIN=$(dirname "$PY")
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
port=${MASTER_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
case "$mode" in
  deepspeed)
    n=${1:?number of ranks}; shift
    [ "${DS_ACCELERATOR:-}" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))}
    exec "$BIN/deepspeed" --num_gpus "$n" --master_port "$port" train.py --config "$@" ;;
  torchrun)
    n=${1:?number of ranks}; shift
    [ "${DS_ACCELERATOR:-}" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))}
    exec "$BIN/torchrun" --standalone --nproc_per_node "$n" train.py --config "$@" ;;
  debug)
    exec "$PY" train.py --config "$@" ;;
  *) echo "unknown mode '$mode' (deepspeed | torchrun | debug)" >&2; exit 2 ;;
esac
