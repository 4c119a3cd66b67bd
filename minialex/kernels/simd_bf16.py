"""bfloat16 dot products in registers for Numba: `vdpbf16ps`, 32 bf16 multiply-adds per 512-bit
instruction into a `<16 x float>` accumulator (lane i += a[2i] * b[2i] + a[2i+1] * b[2i+1]).

`BF16x32` is 32 bf16 values (uint16 bit patterns, see `kernels.bf16`) in one zmm register, typed
for LLVM as `<16 x i32>`. The instruction is emitted as inline assembly rather than through LLVM's
intrinsic, whose operand types changed between LLVM versions and which needs a bfloat type that
llvmlite lacks. Numba does not initialise LLVM's assembly parser, and compiling inline assembly
without it aborts the process, so importing this module initialises it.

Only for CPUs with AVX512_BF16 (`has_avx512_bf16()`); elsewhere the instruction faults. Usable
only from `@njit` code; pass f32x16 values from `kernels.simd`.
"""
import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model

from .simd import f32x16, has_cpu_flag

llvm.initialize_native_asmparser()

_i32x16 = ir.VectorType(ir.IntType(32), 16)
_f32x16 = ir.VectorType(ir.FloatType(), 16)


def has_avx512_bf16(cpuinfo="/proc/cpuinfo"):
    """True when the CPU flags list avx512_bf16 (False when they cannot be read)."""
    return has_cpu_flag("avx512_bf16", cpuinfo)


class BF16x32Type(types.Type):
    """Numba type of 32 packed bf16 values in one 512-bit register."""

    def __init__(self):
        super().__init__(name="bf16x32")


bf16x32 = BF16x32Type()


@register_model(BF16x32Type)
class _BF16x32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _i32x16)


@intrinsic
def bsplat_pair(typingctx, pair):
    """A uint32 holding two bf16 patterns (low half: the even element) in all 16 pairs."""
    if pair != types.uint32:
        return None
    sig = bf16x32(pair)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        v = builder.insert_element(ir.Constant(_i32x16, ir.Undefined), args[0], ir.Constant(i32, 0))
        return builder.shuffle_vector(v, ir.Constant(_i32x16, ir.Undefined), ir.Constant(_i32x16, [0] * 16))

    return sig, codegen


@intrinsic
def bload(typingctx, arr, idx):
    """arr[idx : idx + 32] as a bf16x32 (unaligned load); arr is a uint16 array of bf16 patterns,
    idx a flat element offset from its data pointer, all 32 elements inside the buffer."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint16 and isinstance(idx, types.Integer)):
        return None
    sig = bf16x32(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [i]), _i32x16.as_pointer())
        return builder.load(ptr, align=2)

    return sig, codegen


@intrinsic
def vdpbf16(typingctx, acc, a, b):
    """acc + pairwise dot products of a and b: lane i gets a[2i]*b[2i] + a[2i+1]*b[2i+1] (products
    exact in float32; Intel documents the sums with round-to-nearest-even and denormals flushed)."""
    if not (acc == f32x16 and a == bf16x32 and b == bf16x32):
        return None
    sig = f32x16(acc, a, b)

    def codegen(context, builder, signature, args):
        # AT&T order (sources, then destination); the accumulator is tied to the output ("0")
        fnty = ir.FunctionType(_f32x16, [_f32x16, _i32x16, _i32x16])
        asm = ir.InlineAsm(fnty, "vdpbf16ps $3, $2, $0", "=v,0,v,v", side_effect=False)
        return builder.call(asm, list(args))

    return sig, codegen


# -- packing: float32 -> bf16 in registers, stores ------------------------------------------------
# Used by kernels.gemm_bf16 to round operands while packing them. The rounding is kernels.bf16's
# (round to nearest even, a NaN stays a quiet NaN with its sign), lane-wise in integer arithmetic.

def _round_lanes(builder, v):
    # v: <16 x float> -> <16 x i32>, each lane the bf16 pattern (0..0xFFFF) of its float32
    bits = builder.bitcast(v, _i32x16)

    def splat(x):
        return ir.Constant(_i32x16, [x] * 16)

    lsb = builder.and_(builder.lshr(bits, splat(16)), splat(1))
    rounded = builder.lshr(builder.add(builder.add(bits, splat(0x7FFF)), lsb), splat(16))
    is_nan = builder.icmp_unsigned(">", builder.and_(bits, splat(0x7FFFFFFF)), splat(0x7F800000))
    quiet = builder.or_(builder.lshr(bits, splat(16)), splat(0x0040))
    return builder.select(is_nan, quiet, rounded)


def _is_array_of(ty, dtype):
    return isinstance(ty, types.Array) and ty.dtype == dtype


@intrinsic
def bpack(typingctx, lo, hi):
    """Round two f32x16 to bf16 and interleave them: pair i = (lo[i], hi[i]), i.e. 32-bit lane i
    holds bf16(lo[i]) in its low half and bf16(hi[i]) in its high half."""
    if not (lo == f32x16 and hi == f32x16):
        return None
    sig = bf16x32(lo, hi)

    def codegen(context, builder, signature, args):
        r_lo = _round_lanes(builder, args[0])
        r_hi = _round_lanes(builder, args[1])
        return builder.or_(r_lo, builder.shl(r_hi, ir.Constant(_i32x16, [16] * 16)))

    return sig, codegen


@intrinsic
def bround_load(typingctx, arr, idx):
    """arr[idx : idx + 32] (float32, unaligned) rounded to 32 bf16 values in memory order: pair i
    = (arr[idx + 2i], arr[idx + 2i + 1])."""
    if not (_is_array_of(arr, types.float32) and isinstance(idx, types.Integer)):
        return None
    sig = bf16x32(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        p = builder.gep(ary.data, [i])
        halves = []
        for h in range(2):
            ptr = builder.bitcast(builder.gep(p, [ir.Constant(ir.IntType(64), 16 * h)]), _f32x16.as_pointer())
            r = _round_lanes(builder, builder.load(ptr, align=4))
            halves.append(builder.trunc(r, ir.VectorType(ir.IntType(16), 16)))
        i32 = ir.IntType(32)
        both = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(i32, 32), list(range(32))))
        return builder.bitcast(both, _i32x16)

    return sig, codegen


@intrinsic
def bstore(typingctx, arr, idx, v):
    """arr[idx : idx + 16] = v's 16 pairs (unaligned); arr is a uint32 array of bf16 pairs."""
    if not (_is_array_of(arr, types.uint32) and isinstance(idx, types.Integer) and v == bf16x32):
        return None
    sig = types.void(arr, idx, v)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        ptr = builder.bitcast(builder.gep(ary.data, [i]), _i32x16.as_pointer())
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def bbroadcast(typingctx, arr, idx):
    """arr[idx] in all 16 pairs; arr is a uint32 array of bf16 pairs (bsplat_pair of a load,
    without Numba's negative-index check in the micro-kernel's inner loop)."""
    if not (_is_array_of(arr, types.uint32) and isinstance(idx, types.Integer)):
        return None
    sig = bf16x32(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        s = builder.load(builder.gep(ary.data, [i]), align=4)
        i32 = ir.IntType(32)
        v = builder.insert_element(ir.Constant(_i32x16, ir.Undefined), s, ir.Constant(i32, 0))
        return builder.shuffle_vector(v, ir.Constant(_i32x16, ir.Undefined), ir.Constant(_i32x16, [0] * 16))

    return sig, codegen
