#!/usr/bin/env bash
# Builds the local control plane's binaries from their Go modules at pinned versions.
#
#   build-binaries.sh BIN_DIR
#
# Versions come from the environment (set by kubetune.devcluster.binaries, the single place that
# pins them): KUBERNETES_VERSION, ETCD_VERSION, KWOK_VERSION, HELM_VERSION, COREDNS_VERSION.
#
# Why a separate "tools" module for Kubernetes: k8s.io/kubernetes requires its staging modules at
# v0.0.0 and maps them to ./staging with replace directives, so `go install pkg@version` refuses it.
# A module that requires k8s.io/kubernetes and replaces every staging module with its published tag
# builds the real commands. The staging list is read from the go.mod that the proxy serves.
set -euo pipefail

bin_dir=${1:?usage: build-binaries.sh BIN_DIR}
: "${KUBERNETES_VERSION:?}" "${ETCD_VERSION:?}" "${KWOK_VERSION:?}" "${HELM_VERSION:?}" "${COREDNS_VERSION:?}"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
mkdir -p "$bin_dir"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# Runs a `go build -v` / `go install -v` (its package names go to a log) with a progress line
# every 15 s instead of minutes of silence; on failure the compiler's last lines are shown.
with_progress() {
  local log="$work/go-$RANDOM.log"
  "$@" 2>"$log" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do kill -0 "$pid" 2>/dev/null && sleep 1; done
    kill -0 "$pid" 2>/dev/null || break
    step "  $(grep -vc '^go: downloading' "$log" || true) packages compiled, now $(tail -n1 "$log")"
  done
  if ! wait "$pid"; then tail -n 40 "$log"; step "go build failed"; exit 1; fi
}

k8s_minor=${KUBERNETES_VERSION#v1.}        # 36.3
staging_tag=v0.${k8s_minor}                # v0.36.3

# The Kubernetes commands (and kwok, which shares most packages) come from one tools module and
# one `go build`. Only the missing ones are built: adding the node's kubelet to a
# cache that already has the control plane compiles just their own packages (Go's build cache
# holds the rest).
k8s_cmds=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet
  sigs.k8s.io/kwok/cmd/kwok)
k8s_missing=()
for pkg in "${k8s_cmds[@]}"; do [ -x "$bin_dir/${pkg##*/}" ] || k8s_missing+=("$pkg"); done

if [ ${#k8s_missing[@]} -gt 0 ]; then
  step "kubernetes $KUBERNETES_VERSION + kwok $KWOK_VERSION: resolving modules"
  mkdir -p "$work/k8s" && cd "$work/k8s"
  go mod init kubetune.local/k8s-tools >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk '{print $1}' | sort -u > staging.txt
  step "$(wc -l < staging.txt) staging modules replaced with $staging_tag"
  {
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo "require sigs.k8s.io/kwok $KWOK_VERSION"
    while read -r m; do echo "replace $m => $m $staging_tag"; done < staging.txt
  } >> go.mod
  {
    printf '//go:build tools\n\npackage tools\n\nimport (\n'
    for pkg in "${k8s_cmds[@]}"; do printf '\t_ "%s"\n' "$pkg"; done
    printf ')\n'
  } > tools.go
  go mod tidy -e >/dev/null 2>&1 || true
  go mod download all >/dev/null 2>&1 || true
  major=${KUBERNETES_VERSION#v}; major=${major%%.*}
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  ld=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ld="$ld -X $pkg.gitCommit=0000000000000000000000000000000000000000 -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  step "compiling ${k8s_missing[*]##*/} (one go build; slow when cold)"
  with_progress go build -v -trimpath -ldflags "-s -w $ld" -o "$bin_dir/" "${k8s_missing[@]}"
  step "kubernetes binaries done"
fi

if [ ! -x "$bin_dir/etcd" ]; then
  step "etcd $ETCD_VERSION"
  mkdir -p "$work/etcd" && cd "$work/etcd"
  go mod init kubetune.local/etcd-tools >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
  with_progress go build -v -trimpath -ldflags "-s -w" -o "$bin_dir/etcd" go.etcd.io/etcd/server/v3
  step "etcd done"
fi

if [ ! -x "$bin_dir/helm" ]; then
  step "helm $HELM_VERSION"
  # Helm's own Makefile sets these; without them helm assumes an old Kubernetes version.
  helm_gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  kmin=$(awk '$1 == "k8s.io/client-go" {print $2}' "$helm_gomod" | cut -d. -f2)
  hld="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  hld="$hld -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$kmin"
  hld="$hld -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$kmin"
  with_progress env GOBIN="$bin_dir" go install -v -trimpath -ldflags "-s -w $hld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  step "helm done"
fi

# CoreDNS, the real node's cluster DNS. Its version is not part of the folder's name (that would
# rebuild everything above when it changes); coredns.version beside it says which one is there.
if [ ! -x "$bin_dir/coredns" ] || [ "$(cat "$bin_dir/coredns.version" 2>/dev/null)" != "$COREDNS_VERSION" ]; then
  step "coredns $COREDNS_VERSION (go install; about a minute cold)"
  with_progress env GOBIN="$bin_dir" go install -v -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  echo "$COREDNS_VERSION" > "$bin_dir/coredns.version"
  step "coredns done"
fi

step "all binaries in $bin_dir"
