"""The floating-point dtypes pymerge merges and the dtype it accumulates them in; shared by every layer
(kernels, reference, ops, methods, learned merges)."""
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, float32 for everything else (fp16 / bf16 / fp32 accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
