"""Kernels and autograd Functions, one file per backend.

Modules here import their kernel toolchain (Triton, a compiled extension) at import
time, so ``lrc_kernels.backends`` loads them lazily, only when a backend is used.
"""
