"""Tensor codec for the stage wire format: raw bytes + dtype + shape, chunked above a limit.

Encoding hands MLX's own buffer to protobuf (one copy into the message's ``bytes``); decoding
wraps the received bytes with ``numpy.frombuffer`` and copies them once into an ``mx.array``.
Nothing touches individual elements: bfloat16, which numpy lacks, travels as its uint16 bit
pattern and is re-viewed as bfloat16 on arrival. Pure functions and a small reassembly buffer;
no I/O.

A tensor larger than ``max_chunk_bytes`` becomes several ``TensorChunk`` messages with the same
dtype and shape and increasing byte offsets. gRPC's message limit is raised to
``node.rpc.MAX_MESSAGE_BYTES`` (64 MiB) on every macmesh channel, and chunks default to 8 MiB,
well under it, so an 8k-token prefill of a 5120-wide bf16 model (80 MiB) travels as 10 chunks
and never meets the limit. Bad input raises ``FrameError`` naming the bad value; stages turn it
into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from node.proto.macmesh.v1 import stage_pb2 as pb

DEFAULT_CHUNK_BYTES = 8 * 1024 * 1024
# The largest tensor a receiver accepts unless told otherwise: 16k tokens x 8192 wide x fp32.
DEFAULT_MAX_TENSOR_BYTES = 16 * 1024 * 8192 * 4

WIRE_DTYPES: dict[mx.Dtype, int] = {
    mx.float32: pb.TENSOR_DTYPE_FLOAT32,
    mx.float16: pb.TENSOR_DTYPE_FLOAT16,
    mx.bfloat16: pb.TENSOR_DTYPE_BFLOAT16,
}
MX_DTYPES: dict[int, mx.Dtype] = {wire: dtype for dtype, wire in WIRE_DTYPES.items()}
# numpy has no bfloat16: carry its bits as uint16 and view them back in MLX.
_NUMPY_CARRIERS: dict[int, np.dtype] = {
    pb.TENSOR_DTYPE_FLOAT32: np.dtype("<f4"),
    pb.TENSOR_DTYPE_FLOAT16: np.dtype("<f2"),
    pb.TENSOR_DTYPE_BFLOAT16: np.dtype("<u2"),
}


class FrameError(ValueError):
    """A tensor frame that cannot be decoded; the message names the bad value."""


def dtype_name(wire_dtype: int) -> str:
    try:
        return pb.TensorDType.Name(wire_dtype)
    except ValueError:
        return f"unknown dtype {wire_dtype}"


def wire_dtype(dtype: mx.Dtype) -> int:
    try:
        return WIRE_DTYPES[dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in WIRE_DTYPES)
        raise FrameError(
            f"dtype {dtype} cannot travel between stages (supported: {supported})"
        ) from None


def tensor_bytes(array: mx.array) -> memoryview:
    """The array's bytes in C order as a flat memoryview over MLX's buffer (no copy)."""
    wire_dtype(array.dtype)  # reject unsupported dtypes with a clear message
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    view = memoryview(array)
    if not view.c_contiguous:
        view = memoryview(mx.contiguous(array))
    return view.cast("B")


def encode_tensor(
    array: mx.array, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[pb.TensorChunk]:
    """Encode ``array`` as one or more chunks of at most ``max_chunk_bytes`` bytes each."""
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be >= 1, got {max_chunk_bytes}")
    mx.eval(array)
    dtype = wire_dtype(array.dtype)
    shape = list(array.shape)
    raw = tensor_bytes(array)
    if raw.nbytes <= max_chunk_bytes:
        return [pb.TensorChunk(dtype=dtype, shape=shape, offset=0, data=bytes(raw))]
    return [
        pb.TensorChunk(
            dtype=dtype, shape=shape, offset=start, data=bytes(raw[start : start + max_chunk_bytes])
        )
        for start in range(0, raw.nbytes, max_chunk_bytes)
    ]


@dataclass(frozen=True)
class TensorHeader:
    """What the first chunk says about the whole tensor."""

    dtype: int
    shape: tuple[int, ...]

    @property
    def mx_dtype(self) -> mx.Dtype:
        return MX_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _NUMPY_CARRIERS[self.dtype].itemsize


def read_header(
    chunk: pb.TensorChunk, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> TensorHeader:
    """Validate a chunk's dtype and shape; raise ``FrameError`` naming what is wrong."""
    if chunk.dtype not in MX_DTYPES:
        raise FrameError(
            f"tensor dtype {dtype_name(chunk.dtype)} is not one of float32, float16, bfloat16"
        )
    shape = tuple(int(d) for d in chunk.shape)
    if not shape or any(d == 0 for d in shape):
        raise FrameError(f"tensor shape {list(shape)} is empty")
    header = TensorHeader(chunk.dtype, shape)
    if header.nbytes > max_tensor_bytes:
        raise FrameError(
            f"tensor of shape {list(shape)} ({header.nbytes} bytes) is larger than the "
            f"{max_tensor_bytes}-byte limit"
        )
    return header


@dataclass(frozen=True)
class RawTensor:
    """A complete tensor's bytes, validated but not yet an MLX array."""

    header: TensorHeader
    data: bytes | bytearray

    def to_mx(self) -> mx.array:
        """One copy into MLX-owned memory; bfloat16 is re-viewed from its uint16 bits."""
        carrier = np.frombuffer(self.data, dtype=_NUMPY_CARRIERS[self.header.dtype])
        array = mx.array(carrier.reshape(self.header.shape))
        return array.view(mx.bfloat16) if self.header.dtype == pb.TENSOR_DTYPE_BFLOAT16 else array


class TensorAssembler:
    """Collects the chunks of one tensor, in order; ``add`` returns the tensor once complete.

    ``add`` returns None while chunks are missing. A single-chunk tensor keeps the message's
    own bytes; a chunked one is copied into one preallocated buffer. One assembler per tensor.
    The header is validated on the first chunk, so a bad shape fails before the rest arrives.
    """

    def __init__(self, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> None:
        self.max_tensor_bytes = max_tensor_bytes
        self.header: TensorHeader | None = None
        self._buffer: bytearray | None = None
        self._received = 0

    @property
    def started(self) -> bool:
        return self.header is not None

    @property
    def received_bytes(self) -> int:
        return self._received

    def add(self, chunk: pb.TensorChunk) -> RawTensor | None:
        if self.header is None:
            if chunk.offset != 0:
                raise FrameError(f"first chunk of a tensor starts at offset {chunk.offset}, not 0")
            self.header = read_header(chunk, self.max_tensor_bytes)
        elif chunk.dtype != self.header.dtype or tuple(chunk.shape) != self.header.shape:
            raise FrameError(
                f"chunk says {dtype_name(chunk.dtype)} {list(chunk.shape)} but the tensor is "
                f"{dtype_name(self.header.dtype)} {list(self.header.shape)}"
            )
        elif chunk.offset != self._received:
            raise FrameError(
                f"chunk at offset {chunk.offset} out of order: expected offset {self._received}"
            )
        total = self.header.nbytes
        size = len(chunk.data)
        if size == 0:
            raise FrameError(f"chunk at offset {chunk.offset} carries no data")
        if chunk.offset + size > total:
            raise FrameError(
                f"chunk at offset {chunk.offset} with {size} bytes overruns the tensor's "
                f"{total} bytes (shape {list(self.header.shape)}, {dtype_name(self.header.dtype)})"
            )
        if size == total:
            self._received = total
            return RawTensor(self.header, chunk.data)
        if self._buffer is None:
            self._buffer = bytearray(total)
        self._buffer[chunk.offset : chunk.offset + size] = chunk.data
        self._received = chunk.offset + size
        if self._received < total:
            return None
        buffer, self._buffer = self._buffer, None
        return RawTensor(self.header, buffer)


def decode_tensor(
    chunks: list[pb.TensorChunk], max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> mx.array:
    """Decode a complete list of chunks (the inverse of ``encode_tensor``)."""
    assembler = TensorAssembler(max_tensor_bytes)
    result = None
    for i, chunk in enumerate(chunks):
        if result is not None:
            raise FrameError(f"chunk {i} arrives after the tensor was complete")
        result = assembler.add(chunk)
    if result is None:
        header = assembler.header
        raise FrameError(
            "tensor is incomplete: "
            + (f"{assembler.received_bytes} of {header.nbytes} bytes" if header else "no chunks")
        )
    return result.to_mx()
