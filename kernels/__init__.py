"""distgan's GPU kernels (Triton) with their PyTorch references. Imports torch and triton, never distgan.

The kernels (minibatch discrimination's pairwise L1, the fused spectral-norm power iteration)
land here with their own issues; this package is installed alongside distgan from the start.
"""
