"""Assembly of the Relax module for the two build modes: the methods' decode kernels go in here.

Every compressed weight whose method has a TVM kernel module (`Method.tvm_kernel()`, e.g.
methods/rtn/tvm.py; see base.py for its interface) is stored compact and decoded by that
module's kernel, one `call_tir` per weight, named `<method>_decode_<index>`.

- decode-once (default): a Relax function `decode` maps the compact arrays of every such
  weight to its dense weight; the runtime calls it once at load and feeds the results to
  `main` as ordinary parameters, so inference runs plain dense/conv kernels. (RieM
  reconstruction costs K*m sigmoids per weight element, ~100x a multiply-add, so recomputing it
  per call only pays where memory is the constraint.)
- fused: `main` takes the compact arrays, so no dense copy of those weights stays resident.
  A 2-D weight whose method offers a fused kernel (`Method.tvm_fused`: rtn, affine, riem...) has
  its matmul replaced by one kernel that decodes W inside the reduction (riem: a tile of rows at
  a time); every other compact weight (svd, tucker2, conv weights) is decoded per call inside
  `main` into a transient buffer.
- auto (the default): per layer, the fused kernel where the method offers one for this weight
  and batch (RieM says no: its decode costs far more than the matmul), else decode once at load:
  the fused main of above, with the remaining decodes lifted out of `main` into the function the
  runtime runs once at load (`LiftTransformParams`).
"""
from __future__ import annotations

import numpy as np

from riem_compiler import methods
from riem_compiler.compressed import CompressedWeight
from riem_compiler.codegen.tvm_import import _Imported
from riem_compiler.methods.tvm_gemv_int8 import FORM_ATTR

OPAQUE_PATTERN = 8  # relay/relax OpPatternKind kOpaque: never fused with other operators


def kernel_module(cw: CompressedWeight):
    """The TVM kernel module of cw's method; ValueError when the method has none."""
    module = methods.get(cw.method).tvm_kernel()
    if module is None:
        raise ValueError(f"method {cw.method!r} has no TVM decode kernel")
    return module


def decode_kernel_name(index: int, cw: CompressedWeight) -> str:
    """Name of the decode kernel of the index-th compact weight (riem: riem_decode_<index>)."""
    return f"{cw.method}_decode_{index}"


def _decode_primfunc(cw: CompressedWeight, name: str):
    """cw's decode kernel, marked opaque to operator fusion: FuseOps would otherwise merge an
    elementwise decode (rtn) with the transpose after it, and FuseTIR rejects the merge (the
    TE kernels have int32 shapes, legalized ops int64); a decode stays one kernel of its own."""
    return kernel_module(cw).decode_primfunc(cw, name).with_attr("op_pattern", OPAQUE_PATTERN)


def decode_kernel_schedules(kernel_weights: dict[str, CompressedWeight]) -> dict:
    """Decode kernel name -> its method's CPU schedule function."""
    return {decode_kernel_name(i, cw): kernel_module(cw).schedule_decode_cpu
            for i, cw in enumerate(kernel_weights.values())}


def _tensor_sinfo(shape, dtype):
    from tvm import relax

    return relax.TensorType([int(s) for s in shape], str(dtype))


def _compact_vars(cw: CompressedWeight, tag: str):
    from tvm import relax

    return [relax.Var(f"{tag}__{n}", _tensor_sinfo(cw.arrays[n].shape, cw.arrays[n].dtype))
            for n in kernel_module(cw).array_names(cw)]


def _add_decode_function(mod, kernel_weights: dict[str, CompressedWeight], schedule_cpu: bool):
    """decode(compact arrays of every kernel weight, in manifest order) -> tuple of dense weights."""
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    all_vars, gvars = [], []
    for idx, (name, cw) in enumerate(kernel_weights.items()):
        kname = decode_kernel_name(idx, cw)
        func = _decode_primfunc(cw, kname)
        if schedule_cpu:
            func = kernel_module(cw).schedule_decode_cpu(func)
        gvars.append(bb.add_func(func, kname))
        all_vars.append(_compact_vars(cw, f"w{idx}"))
    with bb.function("decode", params=[v for vs in all_vars for v in vs]):
        with bb.dataflow():
            outs = []
            for gv, vs, cw in zip(gvars, all_vars, kernel_weights.values()):
                outs.append(bb.emit(relax.call_tir(gv, vs, _tensor_sinfo(cw.shape, "float32"))))
            gv_out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv_out)
    return bb.get()


def _make_fused_main(imp: _Imported, kernel_weights: dict[str, CompressedWeight], target_kind: str,
                     for_memory: bool = True):
    """main(inputs, dense params that stay, compact arrays): compact weights decoded inside main;
    a 2-D weight consumed as matmul(x, W^T) goes through its method's fused dequantise-matmul
    kernel when the method offers one (`Method.tvm_fused`; for_memory as there). The other compact
    weights are decoded inside main (mode "fused": per call; mode "auto" lifts those decodes to
    load time afterwards). Returns (module, names of the weights that got a fused kernel,
    {weight: why it did not} for the others, names of the fused weights whose kernel multiplies by
    int8 activations)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    import tvm

    old = imp.mod["main"]
    # the old main becomes a private function, called from (then inlined into) the new main
    rest = tvm.IRModule({gv: f for gv, f in imp.mod.functions.items() if gv.name_hint != "main"})
    bb = relax.BlockBuilder(rest)
    gv_inner = bb.add_func(old.without_attr("global_symbol").without_attr("num_input"), "riem_inner_main")
    inputs = [relax.Var(p.name, p.ty)
              for i, p in enumerate(old.params[: imp.num_input])]
    kept, compact, decode_gvs = [], {}, {}
    for name, p in zip(imp.param_names, old.params[imp.num_input:]):
        if name not in kernel_weights:
            kept.append(relax.Var(_safe(name), p.ty))
    for idx, (name, cw) in enumerate(kernel_weights.items()):
        compact[name] = _compact_vars(cw, f"w{idx}")
        kname = decode_kernel_name(idx, cw)
        decode_gvs[name] = bb.add_func(_decode_primfunc(cw, kname), kname)
    with bb.function("main", params=inputs + kept + [v for vs in compact.values() for v in vs]):
        with bb.dataflow():
            args = list(inputs)
            kept_iter = iter(kept)
            for name in imp.param_names:
                if name in kernel_weights:
                    cw = kernel_weights[name]
                    args.append(bb.emit(relax.call_tir(decode_gvs[name], compact[name],
                                                       _tensor_sinfo(cw.shape, "float32"))))
                else:
                    args.append(next(kept_iter))
            out = bb.emit(relax.Call(gv_inner, args))
            gv_out = bb.emit_output(out)
        bb.emit_func_output(gv_out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", imp.num_input)
    mod = relax.transform.InlinePrivateFunctions()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    mod = relax.transform.Normalize()(mod)
    # matmul(x, permute_dims(decode(...))) -> fused kernel, for 2-D weights whose method has one
    by_gv = {decode_gvs[n].name_hint: (idx, n) for idx, n in enumerate(kernel_weights)}
    w_pat = wildcard()
    mm_pat = is_op("relax.matmul")(wildcard(), is_op("relax.permute_dims")(w_pat))

    bb2 = relax.BlockBuilder(mod)
    fused_cache: dict[tuple, object] = {}
    reasons: dict[str, str] = {}
    int8_layers: set[str] = set()  # fused with int8 activations (tvm_gemv_int8.py)

    def rewriter(expr, matches):
        call = matches[mm_pat]
        w = matches[w_pat]
        x = call.args[0]
        if not (isinstance(w, relax.Call) and w.op.name == "relax.call_tir"):
            return expr
        gv = w.args[0]
        if gv.name_hint not in by_gv:
            return expr
        idx, name = by_gv[gv.name_hint]
        cw = kernel_weights[name]
        xshape = [int(s) for s in x.ty.shape]
        rows = int(np.prod(xshape[:-1]))
        key = (name, rows)
        if key not in fused_cache:
            fname = f"{cw.method}_fused_linear_{idx}_{rows}"
            kernel = methods.get(cw.method).tvm_fused(cw, rows, fname, target_kind, for_memory=for_memory)
            if isinstance(kernel, str):
                reasons[name] = kernel
                return expr
            if kernel.attrs is not None and kernel.attrs.get(FORM_ATTR, False):
                int8_layers.add(name)
            fused_cache[key] = bb2.add_func(kernel.with_attr("op_pattern", OPAQUE_PATTERN), fname)
        x2 = relax.op.reshape(x, [rows, xshape[-1]])
        y = relax.call_tir(fused_cache[key], [x2] + list(w.args[1].fields), _tensor_sinfo([rows, cw.shape[0]], "float32"))
        return relax.op.reshape(y, xshape[:-1] + [cw.shape[0]])

    from tvm.relax.dpl import rewrite_call

    new_main = rewrite_call(mm_pat, rewriter, mod["main"])
    mod = bb2.get()
    mod["main"] = new_main
    mod = relax.transform.Normalize()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    fused = sorted({name for name, _ in fused_cache})
    for name, cw in kernel_weights.items():
        if name not in fused and name not in reasons:
            reasons[name] = (f"a {len(cw.shape)}-D weight (conv) is not a matmul operand" if len(cw.shape) != 2
                             else "not used as the weight of a matmul x @ W.T")
    for name in fused:  # a weight fused at one use and refused at another still has its decode
        reasons.pop(name, None)
    return mod, fused, reasons, sorted(int8_layers)


def _safe(name: str) -> str:
    return "p_" + name.replace(".", "_")
