"""Triton kernels, one module per op family. Imported lazily by the backend registry, so
importing eekernels never requires triton."""
