"""Compiles the BPF objects (bpf/*.bpf.c -> meshd/bpf_obj/*.bpf.o, CO-RE) while the wheel is
built, so the wheel carries them as package data and the target needs libbpf1, not clang.
Everything else is declared in pyproject.toml."""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithBpf(build_py):
    def run(self):
        # a checkout or an sdist has bpf/; a tree without it must already hold the objects
        if (ROOT / "bpf" / "build.sh").exists():
            subprocess.run(["bash", str(ROOT / "bpf" / "build.sh")], check=True)
        super().run()


setup(cmdclass={"build_py": BuildPyWithBpf})
