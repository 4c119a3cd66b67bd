"""int8 dot products in registers for Numba: `vpdpbusd`, 64 multiply-adds of unsigned by signed
bytes per 512-bit instruction into a `<16 x i32>` accumulator:

    acc[i] += a[4i]*b[4i] + a[4i+1]*b[4i+1] + a[4i+2]*b[4i+2] + a[4i+3]*b[4i+3]

with a's bytes read as uint8 (0..255) and b's as int8 (-128..127); the four products and their sum
are exact, the addition to the accumulator wraps modulo 2**32 (vpdpbusds would saturate instead).

`U8x64` and `S8x64` are 64 bytes in one zmm register, typed for LLVM as `<16 x i32>`; two types so
that the typing refuses operands in the wrong order. `I32x16` is the accumulator. The instruction
is emitted as inline assembly rather than through LLVM's intrinsic, whose operand types changed
between LLVM versions (see kernels.simd_bf16, which does the same for vdpbf16ps); importing this
module initialises LLVM's assembly parser, without which compiling inline assembly aborts.

Beside the instruction: loads, the 4-byte broadcast (one activation row's group of 4 k in every
lane), int32 -> float32 conversion, and the two stores of the requantising epilogue (float32 and
uint8 with rint and clamp), which write only the first `count` lanes so tile edges need no
scratch tile. Only for CPUs with AVX512_VNNI (`has_avx512_vnni()`); elsewhere the instruction
faults. Usable only from `@njit` code; memory intrinsics take a flat element offset from the
array's data pointer and do no bounds checking.
"""
import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from .simd import f32x16, has_cpu_flag

llvm.initialize_native_asmparser()

_i1 = ir.IntType(1)
_i8 = ir.IntType(8)
_i32 = ir.IntType(32)
_i32x16 = ir.VectorType(_i32, 16)
_f32x16 = ir.VectorType(ir.FloatType(), 16)
_i8x16 = ir.VectorType(_i8, 16)


def has_avx512_vnni(cpuinfo="/proc/cpuinfo"):
    """True when the CPU flags list avx512_vnni (False when they cannot be read)."""
    return has_cpu_flag("avx512_vnni", cpuinfo)


class U8x64Type(types.Type):
    """64 unsigned bytes in one 512-bit register (vpdpbusd's first source)."""

    def __init__(self):
        super().__init__(name="u8x64")


class S8x64Type(types.Type):
    """64 signed bytes in one 512-bit register (vpdpbusd's second source)."""

    def __init__(self):
        super().__init__(name="s8x64")


class I32x16Type(types.Type):
    """16 int32 lanes in one 512-bit register (vpdpbusd's accumulator)."""

    def __init__(self):
        super().__init__(name="i32x16")


u8x64 = U8x64Type()
s8x64 = S8x64Type()
i32x16 = I32x16Type()


@register_model(U8x64Type)
@register_model(S8x64Type)
@register_model(I32x16Type)
class _Vec512Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _i32x16)


def _is_array_of(ty, dtype):
    return isinstance(ty, types.Array) and ty.dtype == dtype


def _elem_ptr(context, builder, signature, args):
    # pointer to element args[1] (flat, in elements) past the data pointer of array args[0]
    ary = context.make_array(signature.args[0])(context, builder, args[0])
    i = context.cast(builder, args[1], signature.args[1], types.intp)
    return builder.gep(ary.data, [i])


def _splat(builder, scalar, vecty):
    v = builder.insert_element(ir.Constant(vecty, ir.Undefined), scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(vecty, ir.Undefined), ir.Constant(_i32x16, [0] * 16))


def _lane_mask(context, builder, count, countty):
    # <16 x i1>: lane i set when i < count
    n = context.cast(builder, count, countty, types.int64)
    n = builder.trunc(builder.select(builder.icmp_signed(">", n, ir.Constant(n.type, 16)),
                                     ir.Constant(n.type, 16), n), _i32)
    return builder.icmp_signed("<", ir.Constant(_i32x16, list(range(16))), _splat(builder, n, _i32x16))


def _masked_store(builder, value, ptr, mask):
    vecty = value.type
    fnty = ir.FunctionType(ir.VoidType(), [vecty, ptr.type, ir.VectorType(_i1, 16)])
    name = f"llvm.masked.store.v16{'f32' if vecty == _f32x16 else 'i8'}.p0"
    builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), [value, ptr, mask])


@intrinsic
def izero(typingctx):
    """All-zero int32 accumulator."""
    def codegen(context, builder, signature, args):
        return ir.Constant(_i32x16, [0] * 16)

    return i32x16(), codegen


def _load64(rettype, dtype):
    def typer(typingctx, arr, idx):
        if not (_is_array_of(arr, dtype) and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            ptr = builder.bitcast(_elem_ptr(context, builder, signature, args), _i32x16.as_pointer())
            return builder.load(ptr, align=1)

        return rettype(arr, idx), codegen

    return typer


u8load = intrinsic(_load64(u8x64, types.uint8))
u8load.__doc__ = "arr[idx : idx + 64] of a uint8 array as a u8x64 (unaligned load)."
s8load = intrinsic(_load64(s8x64, types.int8))
s8load.__doc__ = "arr[idx : idx + 64] of an int8 array as an s8x64 (unaligned load)."


@intrinsic
def u8broadcast4(typingctx, arr, idx):
    """arr[idx : idx + 4] of a uint8 array in every 32-bit lane: one row's group of 4 k against
    the 16 columns of a packed weight vector."""
    if not (_is_array_of(arr, types.uint8) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = builder.bitcast(_elem_ptr(context, builder, signature, args), _i32.as_pointer())
        return _splat(builder, builder.load(ptr, align=1), _i32x16)

    return u8x64(arr, idx), codegen


@intrinsic
def vpdpbusd(typingctx, acc, a, b):
    """acc + the dot products of a's unsigned and b's signed bytes in groups of 4 (see above)."""
    if not (acc == i32x16 and a == u8x64 and b == s8x64):
        return None

    def codegen(context, builder, signature, args):
        # AT&T order (sources, then destination): Intel's `vpdpbusd acc, a, b` reads a (the
        # second operand) unsigned and b signed; the accumulator is tied to the output ("0")
        fnty = ir.FunctionType(_i32x16, [_i32x16, _i32x16, _i32x16])
        asm = ir.InlineAsm(fnty, "vpdpbusd $3, $2, $0", "=v,0,v,v", side_effect=False)
        return builder.call(asm, list(args))

    return i32x16(acc, a, b), codegen


@intrinsic
def iload(typingctx, arr, idx):
    """arr[idx : idx + 16] of an int32 array as an i32x16 (unaligned load)."""
    if not (_is_array_of(arr, types.int32) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = builder.bitcast(_elem_ptr(context, builder, signature, args), _i32x16.as_pointer())
        return builder.load(ptr, align=4)

    return i32x16(arr, idx), codegen


@intrinsic
def istore(typingctx, arr, idx, v):
    """arr[idx : idx + 16] = v for an int32 array (unaligned store)."""
    if not (_is_array_of(arr, types.int32) and isinstance(idx, types.Integer) and v == i32x16):
        return None

    def codegen(context, builder, signature, args):
        ptr = builder.bitcast(_elem_ptr(context, builder, signature, args), _i32x16.as_pointer())
        builder.store(args[2], ptr, align=4)
        return context.get_dummy_value()

    return types.void(arr, idx, v), codegen


@intrinsic
def iadd(typingctx, a, b):
    """a + b lane-wise, wrapping modulo 2**32."""
    if not (a == i32x16 and b == i32x16):
        return None

    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])

    return i32x16(a, b), codegen


@intrinsic
def i2f(typingctx, v):
    """int32 lanes -> float32, rounded to nearest even (vcvtdq2ps)."""
    if v != i32x16:
        return None

    def codegen(context, builder, signature, args):
        return builder.sitofp(args[0], _f32x16)

    return f32x16(v), codegen


def _emit_f32(context, builder, signature, args):
    ptr = _elem_ptr(context, builder, signature, args)
    _masked_store(builder, args[2], ptr, _lane_mask(context, builder, args[3], signature.args[3]))


def _emit_u8_rint(context, builder, signature, args):
    fnty = ir.FunctionType(_f32x16, [_f32x16])
    rint = builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.rint.v16f32"), [args[2]])
    zero = ir.Constant(_f32x16, [0.0] * 16)
    top = ir.Constant(_f32x16, [255.0] * 16)
    r = builder.select(builder.fcmp_ordered(">", rint, zero), rint, zero)   # a NaN lane -> 0
    r = builder.select(builder.fcmp_ordered("<", r, top), r, top)
    bytes_ = builder.trunc(builder.fptosi(r, _i32x16), _i8x16)
    ptr = _elem_ptr(context, builder, signature, args)
    _masked_store(builder, bytes_, ptr, _lane_mask(context, builder, args[3], signature.args[3]))


def _store_typer(*dtypes):
    def typer(typingctx, arr, idx, v, count):
        if not (isinstance(arr, types.Array) and arr.dtype in dtypes and isinstance(idx, types.Integer)
                and v == f32x16 and isinstance(count, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            emit = _emit_u8_rint if signature.args[0].dtype == types.uint8 else _emit_f32
            emit(context, builder, signature, args)
            return context.get_dummy_value()

        return types.void(arr, idx, v, count), codegen

    return typer


store_f32 = intrinsic(_store_typer(types.float32))
store_f32.__doc__ = """arr[idx : idx + min(count, 16)] = the first lanes of v, for a float32 array; lanes at and
past count are not written (a masked store: the edge of a tile)."""
store_u8_rint = intrinsic(_store_typer(types.uint8))
store_u8_rint.__doc__ = """arr[idx : idx + min(count, 16)] = min(max(rint(v), 0), 255) for the first lanes of v, for
a uint8 array (masked as store_f32): rint rounds half to even (the default rounding mode), as
np.rint; the clamp at 0 is the fused ReLU; a NaN lane stores 0."""
store_out = intrinsic(_store_typer(types.float32, types.uint8))
store_out.__doc__ = """store_f32 or store_u8_rint by arr's dtype: one epilogue source for both outputs of the
int8 GEMM."""
