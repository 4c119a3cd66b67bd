"""Weight and bias gradients of the GEMM paths (blocked, batched): a (Cout, K/g) view to
accumulate into, and the store into the caller's arrays."""
import numpy as np


def weight_rows(dw, dtype):
    """(dw2, in_place): dw as C-contiguous (Cout, K/g) rows of `dtype` when it can be viewed so
    (in_place True: the kernels accumulate straight into it), else a zeroed scratch that
    store() adds or copies into dw."""
    in_place = dw.flags.c_contiguous and dw.dtype == dtype
    rows = dw.reshape(dw.shape[0], -1) if in_place else np.zeros((dw.shape[0], dw[0].size), dtype=dtype)
    return rows, in_place


def store(dw, dw2, in_place, db, db_sum, accumulate):
    """dW and db (or None) (+)= this call's gradients: dw2 already is dw when in_place, else the
    gradient of this call alone; db_sum is the bias gradient (float64)."""
    if not in_place:
        if accumulate:
            dw += dw2.reshape(dw.shape)
        else:
            dw[...] = dw2.reshape(dw.shape)
    if db is not None:
        if accumulate:
            db += db_sum.astype(db.dtype)
        else:
            db[...] = db_sum
