#!/usr/bin/env bash
# Prints the path of NVIDIA's perf_analyzer (Triton's load generator), installing it first when
# it is missing: the binary inside the tritonclient 2.50.0 manylinux wheel (later wheels need
# glibc 2.38 or carry none), in an environment of its own outside the repo (the project's venv
# pins a newer tritonclient), next to the CUDA 12 runtime library it links from PyPI's
# nvidia-cuda-runtime-cu12. The printed path is a wrapper that puts that library on
# LD_LIBRARY_PATH. It also needs Debian's libb64-0d (hack/node-prereqs.sh installs it).
# Keyed by a hash of this script, which holds the pins.
set -euo pipefail
tritonclient=2.50.0
cudart=12.9.79
cache=${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}
key=$(sha256sum "$0" | cut -c1-16)
dir="$cache/perf-analyzer/$key"
if [ ! -x "$dir/perf_analyzer" ]; then
  mkdir -p "$cache/perf-analyzer"
  exec 9>"$cache/perf-analyzer/.lock"
  flock 9
  if [ ! -x "$dir/perf_analyzer" ]; then
    echo "kubetune: installing perf_analyzer (tritonclient $tritonclient) into $dir" >&2
    rm -rf "$dir"
    python3 -m venv "$dir/venv"
    "$dir/venv/bin/pip" install --quiet --no-deps --only-binary :all: \
      "tritonclient==$tritonclient" "nvidia-cuda-runtime-cu12==$cudart" >&2
    lib=$(echo "$dir"/venv/lib/python3*/site-packages/nvidia/cuda_runtime/lib)
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
      "$lib" "$dir/venv/bin/perf_analyzer" > "$dir/perf_analyzer.tmp"
    chmod +x "$dir/perf_analyzer.tmp"
    "$dir/perf_analyzer.tmp" --version >&2  # fails here when a library is missing
    mv "$dir/perf_analyzer.tmp" "$dir/perf_analyzer"
  fi
fi
echo "$dir/perf_analyzer"
