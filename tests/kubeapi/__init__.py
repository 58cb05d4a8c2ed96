"""A Kubernetes API server for tests: a thin HTTP layer over a real etcd (kubeapi.server), the
process harness that runs it with its own etcd (kubeapi.harness), and kubectl-shaped fixture
objects (kubeapi.objects). kube-apiserver itself is neither in Debian 12 nor on PyPI."""
