"""The embedding gather from a packed weight (``tir_kernels.packed_take``) against numpy indexing."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.testing

from llmir_tvm.tir_kernels.dense_packed import pack_weight
from llmir_tvm.tir_kernels.packed_take import packed_take


@pytest.mark.parametrize("shape, panel, ids_shape, dtype", [
    ((53, 37), 16, (17,), "int64"),  # N not a multiple of the panel: zero padding is never read
    ((64, 8), 8, (2, 9), "int32"),  # a [batch, tokens] index tensor
    ((5, 3), 4, (1,), "int64"),  # one token: the serial path
])
def test_rows_match_numpy(rng, shape, panel, ids_shape, dtype):
    """Every gathered row equals ``W[clip(id)]``, out-of-range ids clipped into ``[0, N)``."""
    n, k = shape
    w = rng.standard_normal(shape).astype("float32")
    ids = rng.integers(-3, n + 3, ids_shape).astype(dtype)
    fn = tvm.tirx.build(packed_take(k, n, panel, len(ids_shape), dtype), target="llvm")
    out = tvm.runtime.empty((*ids_shape, k), "float32")
    fn(tvm.runtime.tensor(pack_weight(w, panel)), tvm.runtime.tensor(ids), out)
    np.testing.assert_array_equal(out.numpy(), w[np.clip(ids, 0, n - 1)])


def test_needs_an_index_dimension():
    with pytest.raises(ValueError, match="at least one dimension"):
        packed_take(8, 8, 8, 0, "int64")


if __name__ == "__main__":
    tvm.testing.main()
