"""Argument checks shared by the ops: each error names the argument at fault."""

import math

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name, value, dtypes=FLOAT_DTYPES):
    tensor(name, value)
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {allowed}, got {str(value.dtype).replace('torch.', '')}")
    return value


def rank(name, value, ndim, shape_doc):
    if value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor {shape_doc}, got shape {tuple(value.shape)}")
    return value


# Integer dtypes whose every value an int64 holds: the public ops take them for k, lengths and
# groups (W-TALC keeps lengths as int32) and widen them, before the checks; the raw ops take int64.
NARROW_INTS = (torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32)


# The integer tensors the public functions take (the narrower ones widened to int64), in words.
INT_TENSORS = "an int64 tensor (or int32, int16, int8, uint8, uint16, uint32)"


def widen_int(name, value):
    """``value`` as int64 if it is a tensor of a narrower integer dtype; a tensor of another
    dtype than these (float, bool, uint64, which could wrap in int64) a TypeError naming
    ``name``; anything else (an int, a list, None) as it is, for the caller to check."""
    if isinstance(value, torch.Tensor):
        if value.dtype in NARROW_INTS:
            return value.to(torch.int64)
        if value.dtype != torch.int64:
            raise TypeError(f"{name}: expected {INT_TENSORS}, got {str(value.dtype).replace('torch.', '')}")
    return value


def int_array(name, value):
    """A list, tuple or numpy array of integers (W-TALC keeps video lengths in one) as a CPU
    int64 tensor; anything else a TypeError or ValueError naming ``name``."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested sequences
        raise ValueError(f"{name}: expected a 1-d sequence of integers ({exc})") from None
    if array.size == 0 and array.dtype.kind == "f":
        array = array.astype(np.int64)  # numpy reads [] as float64
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got {array.dtype}")
    if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name}: expected values below 2**63, got max {int(array.max())}")
    return torch.as_tensor(array.astype(np.int64))


def int64(name, value):
    tensor(name, value)
    if value.dtype != torch.int64:
        raise TypeError(f"{name}: expected an int64 tensor, got {str(value.dtype).replace('torch.', '')}")
    return value


def same_device(reference_name, reference, **others):
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name}: expected a tensor on {reference.device} like {reference_name}, got {value.device}")


def has_values(what, **tensors):
    """Refuse meta tensors where ``what`` must read values: its results depend on them, and
    meta tensors hold none (torch's own error would be about ``.item()`` or a copy)."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            raise ValueError(f"{name}: a meta tensor holds no values, and {what} reads them")


def finite(value):
    """math.isfinite for a number, by comparisons: under torch.compile(dynamic=True) a float
    argument arrives as a SymFloat, which math.isfinite cannot take inside a graph."""
    return -math.inf < value < math.inf  # False for NaN


def number(name, value):
    """A number argument as a float: int, float or a numpy integer / floating scalar
    (what indexing a numpy array gives); bools and everything else are refused, and an
    int too large for a float is a ValueError naming the argument, not an OverflowError."""
    if isinstance(value, np.integer):
        value = int(value)
    elif isinstance(value, np.floating):
        value = float(value)  # .item() of a longdouble is a longdouble
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"{name}: expected a number within the float range, got an int of "
                             f"{value.bit_length()} bits") from None
    return value


def positive_number(name, value):
    value = number(name, value)
    if not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value}")
    return float(value)
