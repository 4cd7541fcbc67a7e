"""Shim for tools that still call setup.py; all metadata lives in pyproject.toml.

The native backends (csrc/) are built just-in-time on first use, never at install,
so ``pip install .`` needs no compiler.
"""

from setuptools import setup

setup()
