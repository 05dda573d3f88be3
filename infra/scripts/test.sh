#!/usr/bin/env bash
# The project's test command: install, check the contracts and generated code, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."

bash infra/scripts/install.sh

echo "== buf lint / format"
buf lint
buf format -d --exit-code

if [ -s .ci/contracts-base ]; then
  base=$(tr -d '[:space:]' < .ci/contracts-base)
  if git cat-file -e "${base}^{commit}" 2>/dev/null; then
    echo "== buf breaking (FILE) against ${base}"
    buf breaking --against ".git#ref=${base}"
  else
    echo "== buf breaking skipped: ${base} is not in this clone's history"
  fi
fi

echo "== generated code is up to date"
buf generate
if [ -n "$(git status --porcelain -- clients/python)" ]; then
  git status --porcelain -- clients/python
  echo "generated code differs from proto/: run 'buf generate' and commit the result" >&2
  exit 1
fi

echo "== generated TypeScript is up to date"
buf generate --template buf.gen.typescript.yaml
if [ -n "$(git status --porcelain -- clients/typescript/src/gen)" ]; then
  git status --porcelain -- clients/typescript/src/gen
  echo "generated TypeScript differs from proto/: run 'buf generate --template buf.gen.typescript.yaml' and commit it" >&2
  exit 1
fi

echo "== Envoy edge: the contracts' descriptor set (build output, for infra/envoy/envoy.yaml)"
bash infra/envoy/build-descriptor.sh build/envoy/latentwire.binpb

if [ -x infra/scripts/validate_compose.sh ] || [ -f infra/scripts/validate_compose.sh ]; then
  echo "== docker-compose.yml"
  bash infra/scripts/validate_compose.sh
fi

echo "== pytest"
set +e
python3 -m pytest -q "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$code"
