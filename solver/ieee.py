"""float32 means IEEE float32 in every solve, on every device.

On Ampere and newer GPUs cuDNN runs float32 convolutions in TF32 (a 10-bit mantissa)
unless ``torch.backends.cudnn.allow_tf32`` is off, and PyTorch leaves it on by default.
The operator, the multigrid's transfers and its coarse element applies are float32
convolutions: in TF32 the true residual of a float32 solve stalled near 1e-2 and the
multigrid PCG took 63 iterations at 128^3 where IEEE float32 takes 10 (BENCHMARKS.md,
"GPU session"). ``conv3d`` and ``conv_transpose3d`` below are ``torch.nn.functional``'s
with TF32 off for the call (on CUDA float32 input only; the flag is restored after, so
a caller's own networks keep their setting). Matrix products are IEEE by PyTorch's
default (``torch.backends.cuda.matmul.allow_tf32`` is off) and are left alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _ieee(fn):
    def call(x, *args, **kw):
        if not (x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32):
            return fn(x, *args, **kw)
        torch.backends.cudnn.allow_tf32 = False
        try:
            return fn(x, *args, **kw)
        finally:
            torch.backends.cudnn.allow_tf32 = True
    call.__name__ = fn.__name__
    call.__doc__ = f"torch.nn.functional.{fn.__name__} with TF32 off on CUDA float32 input."
    return call


conv3d = _ieee(F.conv3d)
conv_transpose3d = _ieee(F.conv_transpose3d)
