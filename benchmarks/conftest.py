"""Benchmarks run the Triton kernels in the interpreter only when asked to (it is not a
speed measurement); on a CUDA machine they run for real."""
