#!/usr/bin/env bash
# Installs what the local cluster's real node and the image builds need from Debian's packages,
# and only what is missing (a no-op once installed, so `make test`, `make demo` and .ci/run call
# it every time). Needs root, as the node itself does.
#
#   containerd, runc               the container runtime the kubelet talks to (CRI) and its OCI runtime
#   containernetworking-plugins    CNI: bridge, host-local, loopback
#   iptables                       the rule that takes pods to the API server (the kubernetes Service)
#   buildah                        builds images/*/Dockerfile with no Docker engine
#   mmdebstrap                     the local Debian bookworm base image
#   gcc, libc6-dev                 the pause container (a static C binary)
#   ipset                          kube-router's network-policy controller (the enforcement test)
#   libb64-0d                      perf_analyzer's base64 library (hack/perf-analyzer.sh: Triton load)
#   libjemalloc2                   the operator image's allocator, for bench/bench_scale.py's host-run operator
set -euo pipefail
want=(containerd runc containernetworking-plugins iptables buildah mmdebstrap gcc libc6-dev ipset libb64-0d libjemalloc2)
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "kubetune: the local node needs these Debian packages (install them as root): ${missing[*]}" >&2
  exit 1
fi
echo "kubetune: installing Debian packages for the local node: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Another process may hold dpkg's lock (a parallel build); wait for it instead of failing.
apt_opts=(-o DPkg::Lock::Timeout=600 -o APT::Install-Recommends=false)
apt-get "${apt_opts[@]}" update -qq
apt-get "${apt_opts[@]}" install -y -qq "${missing[@]}" >&2
# Debian's containerd package starts no daemon here (no systemd); the cluster runs its own.
