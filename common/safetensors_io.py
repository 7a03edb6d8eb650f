"""Reading safetensors with plain positioned reads into memory we own: only the bytes asked for.

Why not `safe_open(...).get_tensor`: it returns tensors backed by a memory map, and copying from the
map leaves the touched file pages resident (RssFile) until the handle is collected — a load peak of
about twice the model (docs/design.md §7). `os.preadv` into a preallocated tensor reads exactly the
requested byte ranges and nothing stays mapped, so peak RSS during load is the final RSS plus at
most one tensor being assembled.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data.
"""

from __future__ import annotations

import hashlib

import json
import os
import struct
from pathlib import Path

import torch

from partinfer.common.errors import PartinferError

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def _read_header(fd: int, file_size: int) -> tuple[dict, int, dict]:
    """Parse and check the header against the file: every field is verified before a byte of data is trusted.

    Returns (tensor name -> {dtype, shape, data_offsets}, where the data starts, metadata)."""
    if file_size < 8:
        raise PartinferError("shorter than its 8-byte header length: truncated")
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise PartinferError(f"header length {n} does not fit the file of {file_size} bytes: truncated or corrupt")
    try:
        header = json.loads(os.pread(fd, n, 8).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PartinferError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise PartinferError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PartinferError("__metadata__ is not a map of strings")
    data_size = file_size - 8 - n
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise PartinferError(f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise PartinferError(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
            raise PartinferError(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise PartinferError(f"tensor {name!r} has data offsets {offsets!r} outside the file's {data_size} data bytes")
        elems = 1
        for s in shape:
            elems *= s
        if elems * DTYPES[dtype].itemsize != offsets[1] - offsets[0]:
            raise PartinferError(f"tensor {name!r}: shape {shape} {dtype} does not match its {offsets[1] - offsets[0]} bytes")
    return header, 8 + n, metadata


DIGEST_KEY = "content_sha256"


def content_digest(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """Names a file's content: its metadata (but this digest) and every tensor's name and bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != DIGEST_KEY}, sort_keys=True).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_digest(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor], fix: str) -> None:
    """A file written with a digest (DIGEST_KEY in its metadata) must still match it: flipped bytes
    anywhere in it are a one-line error, not silently different values. Files written before digests: accepted."""
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != content_digest(meta, tensors):
        raise PartinferError(f"{path} is damaged: its content does not match the digest it was written with; {fix}")


def read_whole_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, every tensor) of a small file (neuron and compensation files), header checked first."""
    f = SafetensorsFile(path)
    try:
        return f.metadata, {name: f.read(name) for name in f.keys()}
    finally:
        f.close()


class SafetensorsFile:
    """One .safetensors file: its header, and reads of whole tensors or of runs of leading-dim rows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise PartinferError(f"cannot open {self.path}: {e.strerror}") from e
        try:
            self.header, self.data_start, self.metadata = _read_header(self.fd, os.fstat(self.fd).st_size)
        except PartinferError as e:
            os.close(self.fd)
            raise PartinferError(f"{self.path} is not a valid safetensors file, truncated or corrupt ({e}); "
                                 "replace it with a good copy") from None
        self.bytes_read = 0  # tensor bytes read so far: what a partial load really costs

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> list[int]:
        return list(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.header[name]["dtype"]]

    def _read_into(self, out: torch.Tensor, offset: int) -> None:
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(buf):
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got <= 0:
                raise PartinferError(f"{self.path} ended early while reading; the file is truncated")
            done += got
        self.bytes_read += done

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (same shape) with the whole tensor: straight from the file when dtype and device match."""
        if list(out.shape) != self.shape(name):
            raise PartinferError(f"tensor {name} in {self.path} has shape {self.shape(name)}, expected {list(out.shape)}")
        if out.dtype == self.dtype(name) and out.device.type == "cpu" and out.is_contiguous():
            self._read_into(out, self.data_start + self.header[name]["data_offsets"][0])
        else:
            out.copy_(self.read(name))
        return out

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in memory we own."""
        return self.read_rows(name, [(0, self.shape(name)[0])] if self.shape(name) else None)

    def read_rows(self, name: str, runs: list[tuple[int, int]] | None) -> torch.Tensor:
        """Rows start:stop of the leading dimension for each run, concatenated: [sum(stop - start), ...]."""
        info, dtype, shape = self.header[name], self.dtype(name), self.shape(name)
        begin = self.data_start + info["data_offsets"][0]
        if runs is None:  # a scalar
            out = torch.empty(shape, dtype=dtype)
            self._read_into(out, begin)
            return out
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        row_bytes = row_elems * torch.empty((), dtype=dtype).element_size()
        out = torch.empty([sum(b - a for a, b in runs), *shape[1:]], dtype=dtype)
        filled = 0
        for start, stop in runs:
            if not 0 <= start <= stop <= shape[0]:
                raise PartinferError(f"rows {start}:{stop} out of range for {name} {shape}")
            if stop > start:
                self._read_into(out[filled : filled + stop - start], begin + start * row_bytes)
            filled += stop - start
        return out
