#!/usr/bin/env bash
# Puts the `kubetune` command on the venv's PATH: the project installed into the venv
# (hack/venv.sh) in editable mode, without dependencies (the venv has them, from
# requirements.lock), so `$(make venv)/bin/kubetune` runs this clone's operator/ code.
#
# The venv is shared by every clone on the machine: the clone that last ran `make demo` or
# `make test` is the one the command runs. Nothing is done when it already points here.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$1
installed() {
  [ -x "$venv/bin/kubetune" ] && env -u PYTHONPATH "$venv/bin/python" -c \
    "import sys, kubetune; sys.exit(not kubetune.__file__.startswith(sys.argv[1]))" \
    "$here/operator/" 2>/dev/null
}
installed && exit 0
exec 9>"$venv/.cli.lock"
flock 9
installed && exit 0
echo "kubetune: installing the kubetune command into $venv (editable, no dependencies)" >&2
"$venv/bin/pip" install --quiet --no-deps --editable "$here" >&2
installed
