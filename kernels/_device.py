"""The launch context shared by the Triton launchers."""

import contextlib

import torch


def device_guard(tensor):
    """Makes the tensor's GPU current for a launch (Triton launches on the current
    device, which need not be the tensor's); nothing for CPU tensors (the interpreter)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
