"""Which kernel features meshd reports missing, and the one line it reports them in."""

from __future__ import annotations

import errno
import os

from meshd.dataplane import features as F
from meshd.errors import BpfError, KernelFeatureMissing


def test_kernel_versions_are_compared_as_numbers():
    assert F.kernel_version("6.18.44-fc-v669") == (6, 18)
    assert F.kernel_version("5.4.0-150-generic") == (5, 4)
    assert F.missing((F.SET_RETVAL, F.SOCK_DESTROY, F.SELF_PID), "6.9.1", btf=True) == [F.SELF_PID]
    assert F.missing((F.SET_RETVAL,), "5.18.0", btf=True) == []
    assert F.missing((F.BTF, F.SET_RETVAL), "5.15.0", btf=False) == [F.BTF, F.SET_RETVAL]


def test_a_load_failure_on_an_old_kernel_names_what_is_missing_in_one_line():
    err = BpfError(errno.EINVAL, "bpf_object__load", "sock_lb.bpf.o")
    out = F.explain(err, "the socket LB", (F.BTF, F.SET_RETVAL), release="5.15.0", btf=True)
    assert isinstance(out, KernelFeatureMissing)
    msg = str(out)
    assert "\n" not in msg and "5.15.0" in msg and "bpf_set_retval" in msg and "5.18+" in msg


def test_a_load_failure_on_a_kernel_that_has_everything_is_left_as_it_was():
    err = BpfError(errno.EPERM, "bpf_object__load", "sock_lb.bpf.o")
    assert F.explain(err, "the socket LB", (F.BTF, F.SET_RETVAL), release="6.18.0",
                     btf=True) is err


def test_self_identity_is_this_process_in_its_own_pid_namespace():
    dev, ino, tgid = F.self_identity(os.getpid())
    st = os.stat("/proc/self/ns/pid")
    assert ino == st.st_ino and tgid > 0
    assert dev == (os.major(st.st_dev) << 20) | os.minor(st.st_dev)
