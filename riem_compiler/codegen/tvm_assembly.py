"""Assembly of the Relax module for the two build modes: the RieM kernels go in here.

- decode-once (default): a Relax function `decode` maps the compact arrays of every RieM
  weight to its dense weight through one `call_tir` kernel each (methods/riem/tvm.py); the runtime
  calls it once at load and feeds the results to `main` as ordinary parameters, so inference
  runs plain dense/conv kernels. Reconstruction costs K*m sigmoids per weight element (~100x a
  multiply-add), so recomputing it per call only pays where memory is the constraint.
- fused: `main` takes the compact arrays; each linear layer's matmul becomes one kernel that
  reconstructs W a tile of rows at a time; other compressed weights (conv) are reconstructed
  per call inside `main` into a transient buffer.
"""
from __future__ import annotations

import numpy as np

from riem_compiler.methods.riem import tvm as tk
from riem_compiler.compressed import CompressedWeight
from riem_compiler.codegen.tvm_import import _Imported


def _kernel_name(index: int, prefix: str) -> str:
    return f"{prefix}_{index}"


def _tensor_sinfo(shape, dtype):
    from tvm import relax

    return relax.TensorType([int(s) for s in shape], str(dtype))


def _compact_vars(cw: CompressedWeight, tag: str):
    from tvm import relax

    return [relax.Var(f"{tag}__{n}", _tensor_sinfo(cw.arrays[n].shape, cw.arrays[n].dtype))
            for n in tk.riem_array_names(cw)]


def _add_decode_function(mod, riem_weights: dict[str, CompressedWeight], schedule_cpu: bool):
    """decode(compact arrays of every RieM weight, in manifest order) -> tuple of dense weights."""
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    all_vars, gvars = [], []
    for idx, (name, cw) in enumerate(riem_weights.items()):
        func = tk.decode_primfunc(cw, _kernel_name(idx, "riem_decode"))
        if schedule_cpu:
            func = tk.schedule_decode_cpu(func)
        gvars.append(bb.add_func(func, _kernel_name(idx, "riem_decode")))
        all_vars.append(_compact_vars(cw, f"w{idx}"))
    with bb.function("decode", params=[v for vs in all_vars for v in vs]):
        with bb.dataflow():
            outs = []
            for gv, vs, cw in zip(gvars, all_vars, riem_weights.values()):
                outs.append(bb.emit(relax.call_tir(gv, vs, _tensor_sinfo(cw.shape, "float32"))))
            gv_out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv_out)
    return bb.get()


def _make_fused_main(imp: _Imported, riem_weights: dict[str, CompressedWeight], target_kind: str):
    """main(inputs, dense params that stay, compact arrays): RieM weights rebuilt inside main;
    linear layers through the fused reconstruct-and-multiply kernel."""
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
        if name not in riem_weights:
            kept.append(relax.Var(_safe(name), p.ty))
    for idx, (name, cw) in enumerate(riem_weights.items()):
        compact[name] = _compact_vars(cw, f"w{idx}")
        decode_gvs[name] = bb.add_func(tk.decode_primfunc(cw, _kernel_name(idx, "riem_decode")),
                                       _kernel_name(idx, "riem_decode"))
    with bb.function("main", params=inputs + kept + [v for vs in compact.values() for v in vs]):
        with bb.dataflow():
            args = list(inputs)
            kept_iter = iter(kept)
            for name in imp.param_names:
                if name in riem_weights:
                    cw = riem_weights[name]
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
    # matmul(x, permute_dims(decode(...))) -> fused kernel, for 2-D RieM weights
    by_gv = {decode_gvs[n].name_hint: (idx, n) for idx, n in enumerate(riem_weights)}
    w_pat = wildcard()
    mm_pat = is_op("relax.matmul")(wildcard(), is_op("relax.permute_dims")(w_pat))
    x_pat = mm_pat.args[0] if hasattr(mm_pat, "args") else None

    bb2 = relax.BlockBuilder(mod)
    fused_cache: dict[tuple, object] = {}

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
        cw = riem_weights[name]
        if len(cw.shape) != 2:
            return expr
        xshape = [int(s) for s in x.ty.shape]
        rows = int(np.prod(xshape[:-1]))
        key = (name, rows)
        if key not in fused_cache:
            fname = f"riem_fused_linear_{idx}_{rows}"
            fused_cache[key] = bb2.add_func(
                tk.fused_linear_primfunc(cw, rows, fname, target_kind=target_kind), fname)
        x2 = relax.op.reshape(x, [rows, xshape[-1]])
        y = relax.call_tir(fused_cache[key], [x2] + list(w.args[1].fields), _tensor_sinfo([rows, cw.shape[0]], "float32"))
        return relax.op.reshape(y, xshape[:-1] + [cw.shape[0]])

    del x_pat
    from tvm.relax.dpl import rewrite_call

    new_main = rewrite_call(mm_pat, rewriter, mod["main"])
    mod = bb2.get()
    mod["main"] = new_main
    mod = relax.transform.Normalize()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    return mod


def _safe(name: str) -> str:
    return "p_" + name.replace(".", "_")
