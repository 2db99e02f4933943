#!/usr/bin/env bash
# Distributed training: tools/dist_train.sh CONFIG GPUS [train.py options]
# On CPU-only machines add: --cfg-options env_cfg.dist_cfg.backend=gloo
# The interpreter is ${PYTHON:-python}: PYTHON=/path/to/venv/bin/python picks
# another one (e.g. a virtualenv's) than the first python on PATH.
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}

PYTHONPATH="$(dirname "$0")/..":${PYTHONPATH:-} \
"${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$(dirname "$0")/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
