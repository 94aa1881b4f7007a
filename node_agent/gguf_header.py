"""A GGUF header reader that skips array values (imported only when a file is read).

The stock ``gguf.GGUFReader`` materializes every array in the metadata (a
tokenizer's 150,000 strings); :class:`HeaderReader` records arrays by type
and length and skips their values, and names a truncated file as such. It
lives apart from :mod:`node_agent.inventory` so that ``gguf`` and ``numpy``
load only when a model file is actually read, not in an idle daemon.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import gguf
import numpy as np

__all__ = ["HeaderReader"]


class HeaderReader(gguf.GGUFReader):
    """GGUFReader that records arrays by type and length and skips their values."""

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[Any], list[int], list[Any]]:
        if gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        offs = orig_offs + 12
        itype, n = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0])
        if itype == gguf.GGUFValueType.STRING:
            offs = _skip_strings(self.data, offs, n, self.byte_order)
        elif itype in self.gguf_scalar_to_np:
            offs += n * np.dtype(self.gguf_scalar_to_np[itype]).itemsize
        else:
            raise ValueError(f"unsupported array element type {itype.name}")
        if offs > len(self.data):
            raise ValueError("array runs past the end of the file")
        return offs - orig_offs, [raw_itype, alen], [], [gguf.GGUFValueType.ARRAY, itype]

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        """Name a truncated file as such before the stock reader fails on a short view."""
        for field in fields:
            dims, raw_dtype, offset = field.parts[3], field.parts[4], field.parts[5]
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
            end = start_offs + int(offset[0]) + int(np.prod(dims)) * type_size // block
            if end > len(self.data):
                size = len(self.data)
                raise ValueError(f"truncated: tensor data ends at byte {end}, file has {size}")
        super()._build_tensors(start_offs, fields)


def _skip_strings(data: Any, offs: int, count: int, byte_order: str) -> int:
    """Offset after ``count`` GGUF strings (u64 length + bytes) starting at ``offs``."""
    swapped = byte_order == "S"
    fmt = ("<Q" if sys.byteorder == "big" else ">Q") if swapped else "=Q"
    buf, end = memoryview(data), len(data)
    for _ in range(count):
        (n,) = struct.unpack_from(fmt, buf, offs)
        offs += 8 + n
        if offs > end:
            raise ValueError("string array runs past the end of the file")
    return offs
