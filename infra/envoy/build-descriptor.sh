#!/usr/bin/env bash
# The contracts' descriptor set for the edge's gRPC-JSON transcoder (infra/envoy/envoy.yaml's proto_descriptor):
# every file of proto/ with its imports (google/api, google/protobuf), without source info (comments are of
# no use to Envoy and would triple the size). A build output, not committed: run it from a checkout of the
# contracts the services run, and ship the file with the config (infra/envoy/README.md).
#   bash infra/envoy/build-descriptor.sh [OUT]      (default build/envoy/latentwire.binpb)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/envoy/latentwire.binpb}
mkdir -p "$(dirname "$out")"
buf build --as-file-descriptor-set --exclude-source-info -o "$out"
echo "$out"
