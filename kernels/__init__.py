"""Triton kernels, installed as mmsd_ext.kernels."""
