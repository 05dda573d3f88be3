#!/usr/bin/env bash
# Install latentwire and its tools on a fresh machine (idempotent; quick when already installed).
#   torch is pinned to the CPU wheel this machine carries: any other version pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  "$PYTHON" -m pip install -q torch==2.13.0
fi
# The suite (the root) with its dependencies, the client distribution (clients/python) among them; then
# the client again as an editable install (pip installs a direct-reference dependency as a copy).
"$PYTHON" -m pip install -q -e '.[dev]'
"$PYTHON" -m pip install -q --no-deps -e ./clients/python
# tests/test_upscaler.py's reference loader, without its torchvision requirement (no wheel for the pinned CPU torch;
# installing one would also change which image processors transformers picks). Its other needs are in [dev].
"$PYTHON" -m pip install -q --no-deps spandrel==0.4.2

# buf (contract lint, format, breaking checks) from npm.
BUF_VERSION=1.75.0
if ! command -v buf >/dev/null 2>&1 || [ "$(buf --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  npm install -g --silent "@bufbuild/buf@${BUF_VERSION}" >/dev/null 2>&1 || npm install -g "@bufbuild/buf@${BUF_VERSION}"
fi

# Headless Chromium for the web page's browser test (tests/test_gateway_browser.py drives it with Playwright;
# Playwright's own browser download is not used). Debian's package, installed only when missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends chromium >/dev/null; }
fi
