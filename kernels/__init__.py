"""Triton kernels: @triton.jit functions and thin launchers on tensors. No autograd here."""
