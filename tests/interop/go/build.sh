#!/usr/bin/env bash
# Builds bin/sigil-interop-go, a static binary that any user can run.
# Works offline once `go mod download` has filled the module cache.
set -euo pipefail
cd "$(dirname "$0")"

# Use the installed toolchain and the pinned go.sum; never fetch either.
export GOTOOLCHAIN=local
export CGO_ENABLED=0

mkdir -p bin
go build -trimpath -buildvcs=false -o bin/sigil-interop-go .
chmod 0755 bin/sigil-interop-go
echo "built $(pwd)/bin/sigil-interop-go"
