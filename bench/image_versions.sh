#!/usr/bin/env bash
# Before a GPU session, on the CPU machine: run the GPU session's checks (and the bench's own tests)
# under the GPU image's torch and transformers, which differ from the project's pins (torch 2.11 and
# transformers 5.17 there, 2.13 and 5.24 here). A version
# difference found here costs CPU minutes; found in a device call, it costs the session's device time.
#
#   bash bench/image_versions.sh                 # tests/test_model_speed_options.py test_fp8.py test_perf.py test_bench.py
#   bash bench/image_versions.sh tests           # the whole suite (about 15 minutes)
#
# Environment: VENV (/tmp/ft-image-venv; made once, then reused), IMAGE_TORCH (2.11.0),
# IMAGE_TRANSFORMERS (5.17.0), PY (python3).
# PyPI's Linux torch is the CUDA build: about 4 GB with its CUDA libraries, fetched once. It runs on
# a CPU, so every CPU case of the tests runs with the image's versions.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/ft-image-venv}
TORCH_VERSION=${IMAGE_TORCH:-2.11.0}
TRANSFORMERS_VERSION=${IMAGE_TRANSFORMERS:-5.17.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[image_versions] making $VENV: the project with its pins first"
    "${PY:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install -q -e ".[dev]"
fi
echo "[image_versions] torch==$TORCH_VERSION transformers==$TRANSFORMERS_VERSION into $VENV (pip warns that ft_train pins others)"
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION" "transformers==$TRANSFORMERS_VERSION" 2>&1 | grep -v "is ignored" || true
"$VENV/bin/python" - "$TORCH_VERSION" "$TRANSFORMERS_VERSION" <<'EOF'
import sys

import torch
import transformers

got = (torch.__version__.split("+")[0], transformers.__version__)
print(f"[image_versions] torch {torch.__version__}, transformers {transformers.__version__}")
if got != tuple(sys.argv[1:3]):
    sys.exit(f"[image_versions] wanted torch {sys.argv[1]} and transformers {sys.argv[2]}: the install did not take")
EOF

if [ $# -eq 0 ]; then
    set -- tests/test_model_speed_options.py tests/test_fp8.py tests/test_perf.py tests/test_bench.py
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
