"""The local control plane: real etcd, kube-apiserver, controller-manager, scheduler and kwok,
built from their Go modules and run as local processes, for development, tests and the demo."""
