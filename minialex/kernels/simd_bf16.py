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

from .simd import f32x16

llvm.initialize_native_asmparser()

_i32x16 = ir.VectorType(ir.IntType(32), 16)
_f32x16 = ir.VectorType(ir.FloatType(), 16)


def has_avx512_bf16(cpuinfo="/proc/cpuinfo"):
    """True when the CPU flags list avx512_bf16 (False when they cannot be read)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False


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
