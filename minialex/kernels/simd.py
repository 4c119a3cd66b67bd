"""A 16-lane float32 vector type for Numba, for the kernels LLVM will not vectorise well on
its own: the GEMM and direct-convolution micro-kernels, im2col, Linear and cross-entropy.

LLVM's auto-vectoriser does not keep a register-blocked GEMM micro-kernel in
vector registers: fixed-size local accumulator arrays get unrolled and then
vectorised along k with gathers, scalar accumulators need the SLP vectoriser
(off in Numba) and spill, and accumulating straight into C stays scalar because
of possible aliasing.  So the micro-kernel is written with explicit vectors:
`F32x16` is a Numba type whose data model is LLVM's `<16 x float>`, and the
intrinsics below map one-to-one onto LLVM instructions (`load`, `store`,
`llvm.fma.v16f32`, ...).  Locals of this type live in zmm registers on
AVX-512 machines; elsewhere LLVM legalises each one into two ymm (or four xmm)
registers, so the code stays correct, just slower.

Memory intrinsics take an array and a *flat element offset from the array's
data pointer* (for a C-contiguous 2-D array, `i * ncols + j`; for a strided
view, `i * (strides[0] // 4) + j` when its rows are unit-stride).  They do no
bounds checking: callers guarantee that all 16 lanes lie inside the buffer.

Usable only from `@njit` code.
"""
import os

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from ..errors import MinialexError

LANES = 16

_f32 = ir.FloatType()
_vec = ir.VectorType(_f32, LANES)
_i32 = ir.IntType(32)


class F32x16Type(types.Type):
    """Numba type of a `<16 x float>` register value."""

    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _vec)


def instruction_path(variable, fast, has_instruction):
    """`fast`, or "emulated" when environment variable `variable` is "emulate" or the CPU lacks the
    instruction (has_instruction() is false): which arithmetic a kernel family runs now. Any value
    but emulate, auto or unset is a MinialexError (one line)."""
    mode = os.environ.get(variable, "")
    if mode == "emulate":
        return "emulated"
    if mode not in ("", "auto"):
        raise MinialexError(f"{variable} must be 'emulate', 'auto' or unset, not {mode!r}")
    return fast if has_instruction() else "emulated"


def has_cpu_flag(flag, cpuinfo="/proc/cpuinfo"):
    """True when the CPU flags line lists `flag` (False when it cannot be read)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


def _is_f32_array(ty):
    return isinstance(ty, types.Array) and ty.dtype == types.float32


def _elem_ptr(context, builder, arrty, arr, idx, idxty):
    """Pointer to element `idx` (flat, in elements) past the array's data pointer."""
    ary = context.make_array(arrty)(context, builder, arr)
    idx = context.cast(builder, idx, idxty, types.intp)
    return builder.gep(ary.data, [idx])


def _store_vector(context, builder, signature, args, nontemporal):
    # args (arr, idx, v): v to arr[idx : idx + 16]; a streaming store needs (and states) alignment 64
    ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
    vptr = builder.bitcast(ptr, _vec.as_pointer())
    st = builder.store(args[2], vptr, align=64 if nontemporal else 4)
    if nontemporal:
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(_i32, 1)]))


@intrinsic
def vzero(typingctx):
    """All-zero vector."""
    sig = f32x16()

    def codegen(context, builder, signature, args):
        return ir.Constant(_vec, [0.0] * LANES)

    return sig, codegen


@intrinsic
def vload(typingctx, arr, idx):
    """arr[idx : idx + 16] as a vector (unaligned load)."""
    if not (_is_f32_array(arr) and isinstance(idx, types.Integer)):
        return None
    sig = f32x16(arr, idx)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        vptr = builder.bitcast(ptr, _vec.as_pointer())
        return builder.load(vptr, align=4)

    return sig, codegen


@intrinsic
def vstore(typingctx, arr, idx, v):
    """arr[idx : idx + 16] = v (unaligned store)."""
    if not (_is_f32_array(arr) and isinstance(idx, types.Integer) and v == f32x16):
        return None
    sig = types.void(arr, idx, v)

    def codegen(context, builder, signature, args):
        _store_vector(context, builder, signature, args, nontemporal=False)
        return context.get_dummy_value()

    return sig, codegen


def _concat_halves(a, b, lanes):
    # the 16-lane vector of lanes `lanes` of a followed by the same lanes of b
    if not (a == f32x16 and b == f32x16):
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        idx = list(lanes) + [LANES + i for i in lanes]
        return builder.shuffle_vector(args[0], args[1], ir.Constant(ir.VectorType(_i32, LANES), idx))

    return sig, codegen


@intrinsic
def vcat_lo(typingctx, a, b):
    """(a[0:8], b[0:8]) as one vector."""
    return _concat_halves(a, b, range(8))


@intrinsic
def vcat_hi(typingctx, a, b):
    """(a[8:16], b[8:16]) as one vector."""
    return _concat_halves(a, b, range(8, 16))


def _store_half(typingctx, arr, idx, v, lanes):
    # arr[idx : idx + 8] = the 8 lanes `lanes` of v (one 256-bit store)
    if not (_is_f32_array(arr) and isinstance(idx, types.Integer) and v == f32x16):
        return None
    sig = types.void(arr, idx, v)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        half = builder.shuffle_vector(args[2], args[2], ir.Constant(ir.VectorType(_i32, 8), list(lanes)))
        builder.store(half, builder.bitcast(ptr, ir.VectorType(_f32, 8).as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vstore_lo8(typingctx, arr, idx, v):
    """arr[idx : idx + 8] = lanes 0-7 of v."""
    return _store_half(typingctx, arr, idx, v, range(8))


@intrinsic
def vstore_hi8(typingctx, arr, idx, v):
    """arr[idx : idx + 8] = lanes 8-15 of v."""
    return _store_half(typingctx, arr, idx, v, range(8, 16))


@intrinsic
def vstore_nt(typingctx, arr, idx, v):
    """arr[idx : idx + 16] = v with a non-temporal (streaming) store, which writes the line
    without first reading it into the cache: for results far larger than the cache that are
    not read again soon (an FC layer's weight gradient). The address must be 64-byte aligned;
    call `store_fence()` before other threads read what was written."""
    if not (_is_f32_array(arr) and isinstance(idx, types.Integer) and v == f32x16):
        return None
    sig = types.void(arr, idx, v)

    def codegen(context, builder, signature, args):
        _store_vector(context, builder, signature, args, nontemporal=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    """Orders this thread's earlier stores, non-temporal ones included, before later ones."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vbroadcast(typingctx, arr, idx):
    """arr[idx] in all 16 lanes; LLVM folds it into the FMA as a {1to16} memory operand."""
    if not (_is_f32_array(arr) and isinstance(idx, types.Integer)):
        return None
    sig = f32x16(arr, idx)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        s = builder.load(ptr, align=4)
        v = builder.insert_element(ir.Constant(_vec, ir.Undefined), s, ir.Constant(_i32, 0))
        mask = ir.Constant(ir.VectorType(_i32, LANES), [0] * LANES)
        return builder.shuffle_vector(v, ir.Constant(_vec, ir.Undefined), mask)

    return sig, codegen


@intrinsic
def vsplat(typingctx, x):
    """A scalar float32 in all 16 lanes."""
    if x != types.float32:
        return None
    sig = f32x16(x)

    def codegen(context, builder, signature, args):
        v = builder.insert_element(ir.Constant(_vec, ir.Undefined), args[0], ir.Constant(_i32, 0))
        mask = ir.Constant(ir.VectorType(_i32, LANES), [0] * LANES)
        return builder.shuffle_vector(v, ir.Constant(_vec, ir.Undefined), mask)

    return sig, codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c, fused (one rounding), lane-wise."""
    if not (a == f32x16 and b == f32x16 and c == f32x16):
        return None
    sig = f32x16(a, b, c)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(_vec, [_vec, _vec, _vec])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")
        return builder.call(fn, list(args))

    return sig, codegen


@intrinsic
def vadd(typingctx, a, b):
    """a + b, lane-wise."""
    if not (a == f32x16 and b == f32x16):
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return sig, codegen


@intrinsic
def vsub(typingctx, a, b):
    """a - b, lane-wise."""
    if not (a == f32x16 and b == f32x16):
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        return builder.fsub(args[0], args[1])

    return sig, codegen


@intrinsic
def vrelu(typingctx, v):
    """Lane-wise 0 where v <= 0, else v: relu_forward's rule, so a NaN lane stays NaN."""
    if v != f32x16:
        return None
    sig = f32x16(v)

    def codegen(context, builder, signature, args):
        zero = ir.Constant(_vec, [0.0] * LANES)
        return builder.select(builder.fcmp_ordered("<=", args[0], zero), zero, args[0])

    return sig, codegen


@intrinsic
def vkeep(typingctx, m, v):
    """Lane-wise 0 where m <= 0, else v: a ReLU's backward (threshold_backward) with m the
    rectified output, so a NaN in m keeps v."""
    if not (m == f32x16 and v == f32x16):
        return None
    sig = f32x16(m, v)

    def codegen(context, builder, signature, args):
        zero = ir.Constant(_vec, [0.0] * LANES)
        return builder.select(builder.fcmp_ordered("<=", args[0], zero), zero, args[1])

    return sig, codegen


@intrinsic
def vmax(typingctx, a, b):
    """Lane-wise a if a > b else b (x86's max: a NaN in a gives b, a NaN in b gives NaN)."""
    if not (a == f32x16 and b == f32x16):
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return sig, codegen


def _every_other(typingctx, a, b, first):
    # lanes first, first + 2, ..., first + 30 of the 32 lanes of a followed by b
    if not (a == f32x16 and b == f32x16):
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        mask = ir.Constant(ir.VectorType(_i32, LANES), [first + 2 * i for i in range(LANES)])
        return builder.shuffle_vector(args[0], args[1], mask)

    return sig, codegen


@intrinsic
def veven(typingctx, a, b):
    """Elements 0, 2, ..., 30 of the 32 floats a then b (one two-source permute)."""
    return _every_other(typingctx, a, b, 0)


@intrinsic
def vodd(typingctx, a, b):
    """Elements 1, 3, ..., 31 of the 32 floats a then b."""
    return _every_other(typingctx, a, b, 1)


@intrinsic
def vmax_index(typingctx, best, at, v, v_at):
    """(best, at) with each lane replaced by (v, v_at) where v > best or v is NaN: one tap of a
    max pool's window in row-major order keeps the first maximum and the last NaN (torch's
    rule), `at` carrying where it came from as exact small integers."""
    if not all(t == f32x16 for t in (best, at, v, v_at)):
        return None
    sig = types.UniTuple(f32x16, 2)(best, at, v, v_at)

    def codegen(context, builder, signature, args):
        best, at, v, v_at = args
        take = builder.or_(builder.fcmp_ordered(">", v, best), builder.fcmp_unordered("uno", v, v))
        return context.make_tuple(builder, signature.return_type,
                                  [builder.select(take, v, best), builder.select(take, v_at, at)])

    return sig, codegen


@intrinsic
def vstore_int64(typingctx, arr, idx, v):
    """arr[idx : idx + 16] = v converted to int64 (truncating; v holds integers), arr int64."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64 and isinstance(idx, types.Integer)
            and v == f32x16):
        return None
    sig = types.void(arr, idx, v)

    def codegen(context, builder, signature, args):
        i64v = ir.VectorType(ir.IntType(64), LANES)
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        builder.store(builder.fptosi(args[2], i64v), builder.bitcast(ptr, i64v.as_pointer()), align=8)
        return context.get_dummy_value()

    return sig, codegen


def _reduce_lanes(builder, x, combine):
    """Lane 0 of a tree reduction: halves combined pairwise, 16 -> 8 -> 4 -> 2 -> 1 lanes."""
    width = LANES
    while width > 1:
        half = width // 2
        lo = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_i32, half), list(range(half))))
        hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_i32, half), list(range(half, width))))
        x = combine(lo, hi)
        width = half
    return builder.extract_element(x, ir.Constant(_i32, 0))


@intrinsic
def vhmax(typingctx, v):
    """Largest of the 16 lanes as a float32 (halves compared pairwise, as vmax)."""
    if v != f32x16:
        return None
    sig = types.float32(v)

    def codegen(context, builder, signature, args):
        return _reduce_lanes(builder, args[0],
                             lambda a, b: builder.select(builder.fcmp_ordered(">", a, b), a, b))

    return sig, codegen


# exp(x) = 2^n * exp(r), n = rint(x / ln 2), |r| <= ln(2)/2; ln 2 split in two so n * ln 2 is
# subtracted without rounding error; exp(r) by Cephes' expf polynomial (about 1 ulp).
_EXP_LO, _EXP_HI = -104.0, 88.8   # exp is 0 below (after rounding) and inf above
_LOG2E = 1.44269504088896341
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


def _vconst(x):
    return ir.Constant(_vec, [float(x)] * LANES)


def _vcall(builder, name, *args):
    fnty = ir.FunctionType(_vec, [_vec] * len(args))
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), list(args))


@intrinsic
def vexp(typingctx, x):
    """exp of each lane, within 2 ulp of the correctly rounded result (denormal results
    included); exp(-inf) = 0, exp(inf) = inf and a NaN lane stays NaN.

    Numba has no vector exp without Intel's SVML, so a loop of np.exp runs one lane at a time;
    this is the usual range reduction and polynomial, in registers.
    """
    if x != f32x16:
        return None
    sig = f32x16(x)

    def codegen(context, builder, signature, args):
        v = args[0]
        # clamp with ordered compares, so a NaN lane passes through (and is restored below)
        xc = builder.select(builder.fcmp_ordered(">", v, _vconst(_EXP_HI)), _vconst(_EXP_HI), v)
        xc = builder.select(builder.fcmp_ordered("<", xc, _vconst(_EXP_LO)), _vconst(_EXP_LO), xc)
        fx = _vcall(builder, "llvm.rint.v16f32", builder.fmul(xc, _vconst(_LOG2E)))
        r = _vcall(builder, "llvm.fma.v16f32", fx, _vconst(-_LN2_HI), xc)
        r = _vcall(builder, "llvm.fma.v16f32", fx, _vconst(-_LN2_LO), r)
        y = _vconst(_EXP_POLY[0])
        for c in _EXP_POLY[1:]:
            y = _vcall(builder, "llvm.fma.v16f32", y, r, _vconst(c))
        y = _vcall(builder, "llvm.fma.v16f32", y, builder.fmul(r, r), r)
        y = builder.fadd(y, _vconst(1.0))
        # 2^n in two halves, each a normal float for n in [-150, 129], so results that
        # overflow, underflow or land among the denormals are rounded once, correctly
        ivec = ir.VectorType(_i32, LANES)
        n = builder.fptosi(builder.select(builder.fcmp_unordered("uno", v, v), _vconst(0.0), fx), ivec)
        n1 = builder.ashr(n, ir.Constant(ivec, [1] * LANES))
        n2 = builder.sub(n, n1)

        def pow2(e):
            bits = builder.shl(builder.add(e, ir.Constant(ivec, [127] * LANES)), ir.Constant(ivec, [23] * LANES))
            return builder.bitcast(bits, _vec)

        out = builder.fmul(builder.fmul(y, pow2(n1)), pow2(n2))
        return builder.select(builder.fcmp_unordered("uno", v, v), v, out)

    return sig, codegen


@intrinsic
def vmul(typingctx, a, b):
    """a * b, lane-wise."""
    if not (a == f32x16 and b == f32x16):
        return None
    sig = f32x16(a, b)

    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1])

    return sig, codegen


@intrinsic
def vhsum(typingctx, v):
    """Sum of the 16 lanes as a float32 (tree reduction: halves added pairwise)."""
    if v != f32x16:
        return None
    sig = types.float32(v)

    def codegen(context, builder, signature, args):
        return _reduce_lanes(builder, args[0], builder.fadd)

    return sig, codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the cache line holding arr[idx] into L1 (read, high locality); never faults."""
    if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        ptr = _elem_ptr(context, builder, signature.args[0], args[0], args[1], signature.args[1])
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, _i32, _i32, _i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(_i32, 0),
                          ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def vtranspose_8x16(typingctx, src, src_off, src_ld, dst, dst_off, dst_ld):
    """Transpose an 8 x 16 float32 block: dst[dst_off + c*dst_ld + r] = src[src_off + r*src_ld + c].

    Eight 16-lane row loads, a three-stage shuffle network, sixteen 8-lane
    stores (merged into 16-lane stores by LLVM when dst_ld == 8): the in-register
    transpose used when packing operands whose k axis runs along memory rows.
    """
    if not (_is_f32_array(src) and _is_f32_array(dst) and isinstance(src_off, types.Integer)
            and isinstance(src_ld, types.Integer) and isinstance(dst_off, types.Integer)
            and isinstance(dst_ld, types.Integer)):
        return None
    sig = types.void(src, src_off, src_ld, dst, dst_off, dst_ld)

    def codegen(context, builder, signature, args):
        s_arr, s_off, s_ld, d_arr, d_off, d_ld = args
        s_ty, s_offty, s_ldty, d_ty, d_offty, d_ldty = signature.args
        base = _elem_ptr(context, builder, s_ty, s_arr, s_off, s_offty)
        ld = context.cast(builder, s_ld, s_ldty, types.intp)
        rows = []
        for r in range(8):
            off = builder.mul(ld, ir.Constant(ld.type, r))
            p = builder.bitcast(builder.gep(base, [off]), _vec.as_pointer())
            rows.append(builder.load(p, align=4))

        def shuf(a, b, idx):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(idx)), idx))

        # Three interleave stages, each merging pairs of vectors so that the
        # rows belonging to one column end up adjacent:
        #   stage 1: rows (0,1),(2,3),(4,5),(6,7) -> per column 2 rows side by side
        #   stage 2: row pairs (0-1, 2-3), (4-5, 6-7) -> per column 4 rows (4 columns a vector)
        #   stage 3: row quads (0-3, 4-7) -> per column all 8 rows (2 columns a vector),
        # then each 8-lane half (one column of 8 rows) is stored at dst + col*dst_ld.
        s1 = []
        for r in range(0, 8, 2):
            a, b = rows[r], rows[r + 1]
            lo = shuf(a, b, [x for c in range(8) for x in (c, 16 + c)])          # cols 0..7
            hi = shuf(a, b, [x for c in range(8, 16) for x in (c, 16 + c)])     # cols 8..15
            s1.append((lo, hi))
        s2 = []
        for p in range(0, 4, 2):
            parts = []
            for h in range(2):
                a, b = s1[p][h], s1[p + 1][h]
                lo = shuf(a, b, [x for c in range(4) for x in (2 * c, 2 * c + 1, 16 + 2 * c, 17 + 2 * c)])
                hi = shuf(a, b, [x for c in range(4, 8) for x in (2 * c, 2 * c + 1, 16 + 2 * c, 17 + 2 * c)])
                parts.append(lo)
                parts.append(hi)
            s2.append(parts)  # each: 4 columns x 4 rows; columns h*8 + (0..3), h*8 + (4..7)
        dptr = _elem_ptr(context, builder, d_ty, d_arr, d_off, d_offty)
        dld = context.cast(builder, d_ld, d_ldty, types.intp)
        vec8 = ir.VectorType(_f32, 8)
        for q in range(4):  # s2 part index: columns 4q .. 4q+3
            a, b = s2[0][q], s2[1][q]
            for half in range(2):
                idx = []
                for c in (2 * half, 2 * half + 1):
                    idx += [4 * c + t for t in range(4)] + [16 + 4 * c + t for t in range(4)]
                v = shuf(a, b, idx)
                for t in range(2):
                    col = 4 * q + 2 * half + t
                    part = shuf(v, v, list(range(8 * t, 8 * t + 8)))
                    off = builder.mul(dld, ir.Constant(dld.type, col))
                    p = builder.bitcast(builder.gep(dptr, [off]), vec8.as_pointer())
                    builder.store(part, p, align=4)
        return context.get_dummy_value()

    return sig, codegen
