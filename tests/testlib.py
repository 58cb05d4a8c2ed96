"""Shared by the test layers (importable because pytest puts tests/ on sys.path)."""

from pathlib import Path

CGROUP2 = Path("/sys/fs/cgroup/unified")
BPFFS = Path("/sys/fs/bpf")
TEST_PREFIX = "mtest-"  # instance names, pin dirs and cgroups of kernel and lab tests


class SocketLB:
    """The data plane of one lab, driven by the same reconciler the daemon uses."""

    def __init__(self, lab, m: int = 1021):
        from meshd.dataplane import loader
        from meshd.dataplane.kernel import KernelDataplane
        from meshd.reconciler import Reconciler
        self.instance = TEST_PREFIX + lab.prefix
        self.maps = loader.load(BPFFS, self.instance, lab.cgroup, m)
        self.rec = Reconciler(KernelDataplane(self.maps))
        self.lab = lab

    def apply(self, *services: dict):
        from meshd.desired import desired_groups
        from meshd.model import parse_service
        parsed = [parse_service(s, where=s["name"]) for s in services]
        report = self.rec.apply(desired_groups(parsed))
        assert not report.errors, report.errors
        return report

    def close(self) -> None:
        from meshd.dataplane import loader
        self.maps.close()
        loader.remove(BPFFS, self.instance)
