"""The stage tensor codec: exact round trips, chunking, and clear errors for bad frames."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from node.inference.codec import (
    DEFAULT_CHUNK_BYTES,
    FrameError,
    TensorAssembler,
    decode_tensor,
    encode_tensor,
    read_header,
    tensor_bytes,
)
from node.proto.macmesh.v1 import stage_pb2 as pb
from node.rpc import MAX_MESSAGE_BYTES

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def _bits(array: mx.array) -> np.ndarray:
    """The raw bit patterns, so -0.0, NaN payloads and bf16 compare exactly."""
    width = {4: mx.uint32, 2: mx.uint16}[array.itemsize]
    return np.array(array.view(width))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1 << 30, 1000, 7])
def test_round_trip_is_bit_exact(dtype: mx.Dtype, chunk: int) -> None:
    x = (mx.random.normal((1, 37, 64), key=mx.random.key(3)) * 100).astype(dtype)
    x = mx.concatenate(
        [x, mx.array([[[0.0, -0.0, float("inf"), float("nan")] * 16]], dtype=dtype)], axis=1
    )
    chunks = encode_tensor(x, chunk)
    assert all(len(c.data) <= chunk for c in chunks)
    assert sum(len(c.data) for c in chunks) == x.nbytes
    y = decode_tensor(chunks)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(_bits(y), _bits(x))


def test_encoding_reads_the_mlx_buffer_in_c_order() -> None:
    x = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    transposed = x.T  # a strided view: must be made contiguous, in the logical order
    assert bytes(tensor_bytes(transposed)) == np.arange(12, dtype="<f4").reshape(3, 4).T.tobytes()
    bf16 = mx.array([1.0, -2.0], dtype=mx.bfloat16)
    assert bytes(tensor_bytes(bf16)) == np.array([0x3F80, 0xC000], dtype="<u2").tobytes()


def test_unsupported_dtype_is_named() -> None:
    with pytest.raises(FrameError, match="int32"):
        encode_tensor(mx.array([1, 2, 3]))


def test_prefill_of_8k_tokens_5120_wide_fits_under_the_grpc_limit() -> None:
    """80 MiB of bf16 activations: chunked well below gRPC's (raised) 64 MiB limit."""
    x = (mx.arange(8192 * 5120) % 65521).astype(mx.bfloat16).reshape(1, 8192, 5120)
    chunks = encode_tensor(x)
    assert len(chunks) == 10
    assert max(c.ByteSize() for c in chunks) < min(MAX_MESSAGE_BYTES, DEFAULT_CHUNK_BYTES + 1024)
    assert mx.array_equal(decode_tensor(chunks), x).item()


def _chunk(
    dtype: int = pb.TENSOR_DTYPE_FLOAT32, shape=(1, 2, 4), offset: int = 0, size: int | None = None
) -> pb.TensorChunk:
    n = int(np.prod(shape)) * (2 if dtype != pb.TENSOR_DTYPE_FLOAT32 else 4)
    return pb.TensorChunk(
        dtype=dtype, shape=list(shape), offset=offset, data=b"\0" * (n if size is None else size)
    )


@pytest.mark.parametrize(
    ("chunk", "message"),
    [
        (_chunk(dtype=pb.TENSOR_DTYPE_UNSPECIFIED), "TENSOR_DTYPE_UNSPECIFIED"),
        (_chunk(dtype=17), "unknown dtype 17"),
        (_chunk(shape=()), r"shape \[\] is empty"),
        (_chunk(shape=(1, 0, 4), size=4), r"shape \[1, 0, 4\] is empty"),
        (_chunk(size=40), "overruns the tensor's 32 bytes"),
        (_chunk(size=0), "carries no data"),
        (_chunk(offset=8, size=8), "starts at offset 8"),
    ],
)
def test_malformed_chunks_raise_frame_errors(chunk: pb.TensorChunk, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        TensorAssembler().add(chunk)


def test_oversized_tensor_is_rejected_from_its_header() -> None:
    huge = pb.TensorChunk(dtype=pb.TENSOR_DTYPE_FLOAT32, shape=[1, 1 << 20, 8192], data=b"\0" * 16)
    with pytest.raises(FrameError, match="larger than the 1024-byte limit"):
        read_header(huge, max_tensor_bytes=1024)


def test_chunks_must_arrive_in_order_and_agree() -> None:
    x = mx.arange(16, dtype=mx.float32)
    first, second, third, fourth = encode_tensor(x, 16)
    assembler = TensorAssembler()
    assert assembler.add(first) is None
    with pytest.raises(FrameError, match="out of order: expected offset 16"):
        assembler.add(third)
    other = pb.TensorChunk(dtype=pb.TENSOR_DTYPE_FLOAT16, shape=[16], offset=16, data=second.data)
    with pytest.raises(FrameError, match="chunk says TENSOR_DTYPE_FLOAT16"):
        assembler.add(other)
    assert assembler.add(second) is None and assembler.add(third) is None
    assert mx.array_equal(assembler.add(fourth).to_mx(), x).item()
    with pytest.raises(FrameError, match="incomplete: 16 of 64 bytes"):
        decode_tensor([first])
