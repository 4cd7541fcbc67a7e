"""Build hook: the native sources and the demo's data travel inside the package.

``csrc/`` and ``data/snli_demo/`` at the top of the repository are the source of truth (see
the README's layout). A wheel or a plain ``pip install .`` copies them to
``lrc_kernels/_csrc/`` and ``lrc_bert/_data/snli_demo/``, so the ``cpp`` and ``cuda``
backends build just-in-time and ``python -m lrc_bert.demo`` runs from an installed package.
An editable install reads them in place. Nothing is compiled at install time, so
``pip install .`` needs no compiler; all other metadata lives in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# (source folder, destination inside the build, the suffixes copied)
PACKAGE_DATA = [
    (ROOT / "csrc", Path("lrc_kernels") / "_csrc", {".cpp", ".cu", ".h", ".cuh"}),
    (ROOT / "data" / "snli_demo", Path("lrc_bert") / "_data" / "snli_demo", {".tsv", ".md"}),
]


class build_py_with_native_sources(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        for folder, destination, suffixes in PACKAGE_DATA:
            for source in sorted(folder.rglob("*")):
                if source.suffix in suffixes:
                    copy = Path(self.build_lib) / destination / source.relative_to(folder)
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, copy)


setup(cmdclass={"build_py": build_py_with_native_sources})
