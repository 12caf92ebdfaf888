"""Bottom layer: how a tensor is stored on disk (bit packing, linear, k-means, sparse) and read back.

Imports only torch, pydantic and `dnnprune.errors`, so every layer above may use it.
"""

from dnnprune.codecs.bitpack import pack_bits, packed_nbytes, unpack_bits
from dnnprune.codecs.kmeans import kmeans_codebook, kmeans_grid, lloyd_1d
from dnnprune.codecs.linear import linear_codes, linear_grid
from dnnprune.codecs.spec import (
                                   Encoding,
                                   KMeansSpec,
                                   LinearSpec,
                                   SparseSpec,
                                   as_encoding,
)
from dnnprune.codecs.state import (
                                   SEPARATOR,
                                   declared_shape,
                                   declared_tensors,
                                   decode_state,
                                   decode_tensor,
                                   encode_state,
                                   encode_tensor,
                                   encoded_nbytes,
                                   on_grid,
)

__all__ = [
    "SEPARATOR", "Encoding", "KMeansSpec", "LinearSpec", "SparseSpec", "as_encoding", "declared_shape",
    "declared_tensors", "decode_state", "decode_tensor", "encode_state", "encode_tensor", "encoded_nbytes",
    "kmeans_codebook", "kmeans_grid", "linear_codes", "linear_grid", "lloyd_1d", "on_grid", "pack_bits",
    "packed_nbytes", "unpack_bits",
]
