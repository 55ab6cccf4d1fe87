"""TensorInfo: what a reader knows about one key from the file's header alone, before any data is read."""
from typing import NamedTuple

import torch


class TensorInfo(NamedTuple):
    """Shape and dtype of one stored tensor (pymerge.merge.key_info reads the first two fields), and how many
    bytes its data takes in the file."""
    shape: torch.Size
    dtype: torch.dtype
    nbytes: int


def tensor_nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty(0, dtype=dtype).element_size()
