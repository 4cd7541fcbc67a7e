"""Build hook: the native sources travel inside the package.

``csrc/`` at the top of the repository is the source of truth (see the README's layout).
A wheel or a plain ``pip install .`` copies it to ``lrc_kernels/_csrc/`` as package data,
so the ``cpp`` and ``cuda`` backends can build just-in-time from an installed package.
An editable install reads ``csrc/`` in place. Nothing is compiled at install time, so
``pip install .`` needs no compiler; all other metadata lives in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
NATIVE_SUFFIXES = {".cpp", ".cu", ".h", ".cuh"}


class build_py_with_native_sources(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "lrc_kernels" / "_csrc"
        for source in sorted((ROOT / "csrc").rglob("*")):
            if source.suffix in NATIVE_SUFFIXES:
                copy = target / source.relative_to(ROOT / "csrc")
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, copy)


setup(cmdclass={"build_py": build_py_with_native_sources})
