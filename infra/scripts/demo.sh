#!/usr/bin/env bash
# The main job on a fresh machine: install, start the whole suite on the embedded default model
# (each service its own process and port), generate an image through it, shut everything down.
#   bash infra/scripts/demo.sh [PROMPT] [-o out.png] [--seed N] [--steps N] ...   (see: latentwire demo --help)
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/scripts/install.sh
exec latentwire demo "$@"
