"""The skeleton every op family shares: custom ops with their fakes, the autograd, and the one dispatch point.

A family (``scaled_lora``, ``adapter``) is an :class:`OpSpec`: its math (the differentiable torch forward and
backward, what a double backward recomputes, the fake shapes) and one arguments object, a ``NamedTuple`` of its
tensors besides x and the scale, from which the custom ops' schemas follow. :class:`FusedOp` turns a spec into
the registered ops ``metapeft::<family>_fwd`` / ``_bwd``, an ``autograd.Function`` and :meth:`FusedOp.call`.

Every backend's launchers (``metapeft.ops.backends.OpImpl``) keep one contract, with ``args`` the arguments
object, ``extra`` the family's options (the adapter's activation) and ``kept`` the activation the forward
saves (the scaled-LoRA ``h``, the adapter's bottleneck ``z``):

    forward(x (M, K), *args, scale, *extra, dropout_p, seed) -> (out (M, N), kept (M, s))
    backward(grad (M, N), x, *(args[i] for i in spec.backward_reads), scale, kept, *extra, dropout_p, seed,
             *spec.flags(args), needs) -> grads of (x, *(args[i] for i in spec.grad_args), scale)

How a call runs (:meth:`FusedOp.call`, the only place that selects a backend):
- eager, torch backend, no dropout, ``metapeft._C`` built: the family's C++ op (``metapeft::<family>``), whose
  forward and backward are registered with the dispatcher's Autograd key (``csrc/autograd.cpp``): one dispatcher
  call from Python, a backward without Python. Its backward is built from differentiable ATen ops when grad mode
  is on, so double backward (``create_graph=True``) gives exact second derivatives here too.
- eager, torch backend, no dropout, without ``_C``: autograd through the family's differentiable torch forward
  (C++ autograd nodes, nothing of size M x N saved).
- eager otherwise (triton / cuda kernels, dropout, inside :func:`metapeft.ops.double_backward_ahead` without
  ``_C``): :class:`_FusedFunction`, which calls the backend's launchers directly and computes the scale from a
  layer's modulator itself (no autograd node for either); with dropout it regenerates the mask in backward instead
  of keeping it. It uses the ``forward(ctx, ...)`` form: an ``autograd.Function`` with ``setup_context`` binds its
  arguments with ``inspect.signature`` on every call, and the registered custom op's Python wrapper costs more
  host time than the whole op at tiny shapes (``benchmarks/results/host_overhead.md``).
- under ``torch.compile``: the registered custom op (fake kernels, registered autograd: traced without graph
  breaks); the torch backend without dropout hands the compiler its ATen composite instead, which inductor fuses.
- under forward-mode AD or a ``torch.func`` transform (``grad``, ``jacrev``, ``vmap``, ``jvp``): the family's
  differentiable torch forward with the selected backend's dropout rule, so every transform composes with it.

Meta-gradient readiness: double backward is supported on every route. A backward run with grad mode on
(``create_graph=True``) is computed from differentiable ATen ops (the family's torch backward), with the kept
activation recomputed from x under the forward backend's dropout mask.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass

import torch

from metapeft.modulator import gamma_from_modulator, modulator_gradient, scale_from_modulator
from metapeft.ops.backends import DOUBLE_BACKWARD_AHEAD, OpImpl, op_impl, register_op, select_backend
from metapeft.ops.checks import check_input, check_residual, transforms_active
from metapeft.ops.dropout import torch_dropout_factors


@dataclass(frozen=True)
class OpSpec:
    """One op family: its arguments object, its math and the facts the shared skeleton needs.

    ``args``: a ``NamedTuple`` class of the op's tensors besides x and the scale (``Tensor | None`` for optional
    ones), in schema order. ``extra``: schema items of the family's own options, e.g. ``("str activation",)``.
    ``forward_torch`` / ``backward_torch``: the differentiable torch forward and backward (launcher contract, the
    forward also taking ``dropout_factors`` and ``factor``, the backward ``dropout_factors``).
    ``recompute(x, args, dropout_p, seed, factors)``: the kept activation, differentiably (double backward).
    ``backward_reads`` / ``grad_args``: indices into ``args`` of what the backward reads / returns gradients for.
    ``passthrough``: indices of args shaped like x that enter the output with coefficient 1 (the adapter's
    residual): flattened with x, their gradient is the output's. ``backward_flags``: schema items of flags the
    backward takes, computed from ``args`` by ``flags``. ``kept`` / ``grad``: the schema names of the kept activation
    and of the backward's incoming gradient. ``fake_forward(x, *args)``: empty ``(out, kept)`` of the right shapes;
    ``fake_grads(x, *read, scale)``: the shapes of the backward's outputs. ``input_weight``: the index and name of
    the arg whose second dimension x's last one must equal (the per-call check of x; passthrough args are checked
    against x). ``composite_nd``: the torch forward without dropout accepts
    (..., K) inputs as they are.
    """

    name: str
    args: type
    forward_torch: Callable
    backward_torch: Callable
    recompute: Callable
    input_weight: tuple[int, str]
    backward_reads: tuple[int, ...]
    grad_args: tuple[int, ...]
    kept: str
    grad: str
    fake_forward: Callable
    fake_grads: Callable
    extra: tuple[str, ...] = ()
    passthrough: tuple[int, ...] = ()
    backward_flags: tuple[str, ...] = ()
    flags: Callable = lambda args: ()
    composite_nd: bool = False

    def schema_items(self) -> list[str]:
        """The arguments object as schema items, e.g. ``["Tensor weight", "Tensor? bias"]``."""
        hints = typing.get_type_hints(self.args)
        optional = {name for name in self.args._fields if type(None) in typing.get_args(hints[name])}
        return [f"Tensor{'?' if name in optional else ''} {name}" for name in self.args._fields]


def _modulator_grad(dscale, modulator, constraint, factor):
    return None if dscale is None else modulator_gradient(dscale, modulator, constraint, factor)


class _FusedFunction(torch.autograd.Function):
    """The eager kernel route (see the module docstring): x (..., K) is flattened here and the scale
    ``factor * gamma(modulator)`` computed here, so that neither costs an autograd node per call. Inputs:
    ``(op, x, modulator, constraint, factor, extra, dropout_p, seed, backend, *args)``."""

    @staticmethod
    def forward(ctx, op, x, modulator, constraint, factor, extra, dropout_p, seed, backend, *args):
        spec, impl = op.spec, op_impl(backend, op.spec.name)
        x2d = x.reshape(-1, x.shape[-1])
        args2d = op.flatten(args, x2d.shape)
        scale = scale_from_modulator(modulator, constraint, factor)
        out, kept = impl.forward(x2d, *args2d, scale, *extra, dropout_p, seed)
        # x itself (not x2d) is saved: a double backward differentiates through it; passthrough args are not kept
        ctx.save_for_backward(x, modulator, scale, kept, *op.keep(args))
        ctx.options = (op, constraint, factor, extra, dropout_p, seed, backend, spec.flags(args), impl.backward)
        return out.view(*x.shape[:-1], out.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        x, modulator, scale, kept, *args = ctx.saved_tensors
        op, constraint, factor, extra, dropout_p, seed, backend, flags, kernel_backward = ctx.options
        if torch.is_grad_enabled():  # double backward: the scale as a differentiable function of the modulator
            scale = scale_from_modulator(modulator, constraint, factor)
        need = ctx.needs_input_grad
        x2d, grad2d = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        needs = op.backward_needs(need[1], need[9:], need[2])
        grads = op.grads(grad2d, x2d, args, scale, kept, extra, dropout_p, seed, flags, needs, backend,
                         kernel_backward)
        dx, dargs = op.input_grads(grads, grad_out, need[9:])
        dx = None if dx is None else dx.view(x.shape)
        return (None, dx, _modulator_grad(grads[-1], modulator, constraint, factor), None, None, None, None, None,
                None, *dargs)


class FusedOp:
    """An op family's custom ops, autograd and dispatch point, built from its :class:`OpSpec`."""

    def __init__(self, spec: OpSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.forward_torch, self.passthrough = spec.forward_torch, spec.passthrough
        self.input_weight = spec.input_weight
        self.arity = len(spec.args._fields)
        self.keep_mask = tuple(i not in spec.passthrough for i in range(self.arity))
        self.cpp_op = None  # set by metapeft.ops.cpp_autograd where metapeft._C is built
        items = spec.schema_items()
        tail = [*spec.extra, "float dropout_p", "Tensor? seed"]
        read = [items[i] for i in spec.backward_reads]
        fwd_items = ["Tensor x", *items, "Tensor scale", *tail, "str backend"]
        bwd_items = [f"Tensor {spec.grad}", "Tensor x", *read, "Tensor scale", f"Tensor {spec.kept}", *tail,
                     *spec.backward_flags, "str backend", "bool[] needs"]
        grads = ", ".join(["Tensor"] * (len(spec.grad_args) + 2))
        self.fwd = torch.library.custom_op(f"metapeft::{spec.name}_fwd", self._fwd_impl, mutates_args=(),
                                           schema=f"({', '.join(fwd_items)}) -> (Tensor, Tensor)")
        self.bwd = torch.library.custom_op(f"metapeft::{spec.name}_bwd", self._bwd_impl, mutates_args=(),
                                           schema=f"({', '.join(bwd_items)}) -> ({grads})")
        self.fwd.register_fake(self._fwd_fake)
        self.bwd.register_fake(self._bwd_fake)
        self.fwd.register_autograd(self._op_backward, setup_context=self._op_setup_context)
        register_op("torch", spec.name, OpImpl(spec.forward_torch, spec.backward_torch, torch_dropout_factors))

    # --- the registered custom ops (the torch.compile route) ---------------------------------------------------------
    def _fwd_impl(self, *inputs):
        return op_impl(inputs[-1], self.name).forward(*inputs[:-1])

    def _fwd_fake(self, x, *inputs):
        return self.spec.fake_forward(x, *inputs[:self.arity])

    def _bwd_impl(self, *inputs):
        *inputs, backend, needs = inputs
        grads = op_impl(backend, self.name).backward(*inputs, tuple(needs))
        return tuple(g if g is not None else inputs[1].new_empty(0) for g in grads)

    def _bwd_fake(self, grad, x, *inputs):
        read, scale, needs = inputs[:len(self.spec.backward_reads)], inputs[len(self.spec.backward_reads)], inputs[-1]
        shapes = self.spec.fake_grads(x, *read, scale)
        owners = (x,) * (len(shapes) - 1) + (scale,)
        return tuple(owner.new_empty(shape if need else (0,)) for owner, shape, need in zip(owners, shapes, needs))

    def _op_setup_context(self, ctx, inputs, output):
        x, args, scale = inputs[0], inputs[1:1 + self.arity], inputs[1 + self.arity]
        *extra, dropout_p, seed, backend = inputs[2 + self.arity:]
        ctx.save_for_backward(x, scale, output[1], *self.keep(args))
        ctx.options = (tuple(extra), dropout_p, seed, self.spec.flags(args), backend)
        ctx.mark_non_differentiable(output[1])

    def _op_backward(self, ctx, grad_out, _grad_kept):
        x, scale, kept, *args = ctx.saved_tensors
        extra, dropout_p, seed, flags, backend = ctx.options
        need = ctx.needs_input_grad
        needs = self.backward_needs(need[0], need[1:1 + self.arity], need[1 + self.arity])

        def kernel_backward(*inputs):
            grads = self.bwd(*inputs[:-1], backend, list(inputs[-1]))
            return tuple(g if n else None for g, n in zip(grads, inputs[-1]))

        grads = self.grads(grad_out, x, args, scale, kept, extra, dropout_p, seed, flags, needs, backend,
                           kernel_backward)
        dx, dargs = self.input_grads(grads, grad_out, need[1:1 + self.arity])
        return (dx, *dargs, grads[-1]) + (None,) * (len(extra) + 3)

    # --- pieces shared by both autograd routes -----------------------------------------------------------------------
    def flatten(self, args, shape):
        """``args`` with the passthrough tensors (shaped like x) reshaped to x's 2-D ``shape``."""
        if not self.spec.passthrough:
            return args
        return tuple(t.reshape(shape) if i in self.spec.passthrough and t is not None else t
                     for i, t in enumerate(args))

    def keep(self, args):
        """The args a backward keeps: all but the passthrough tensors (None in their place)."""
        return [t if k else None for t, k in zip(args, self.keep_mask)]

    def backward_needs(self, need_x, need_args, need_scale):
        """The backward's ``needs`` flags (x, the ``grad_args``, the scale) from the inputs' needs."""
        return (need_x, *(need_args[i] for i in self.spec.grad_args), need_scale)

    def input_grads(self, grads, grad_out, need_args):
        """``(dx, grads of every arg)`` from the backward's outputs; a passthrough arg's gradient is ``grad_out``."""
        dargs = [None] * self.arity
        for i, g in zip(self.spec.grad_args, grads[1:-1]):
            dargs[i] = g
        for i in self.spec.passthrough:
            dargs[i] = grad_out if need_args[i] else None
        return grads[0], dargs

    def grads(self, grad, x, args, scale, kept, extra, dropout_p, seed, flags, needs, backend, kernel_backward):
        """The backward's gradients (None where not needed); differentiable when grad mode is on (double backward:
        the kept activation recomputed under the forward backend's mask), else from ``kernel_backward``."""
        read = [args[i] for i in self.spec.backward_reads]
        if torch.is_grad_enabled():
            factors = op_impl(backend, self.name).dropout
            kept = self.spec.recompute(x, args, dropout_p, seed, factors)
            return self.spec.backward_torch(grad, x, *read, scale, kept, *extra, dropout_p, seed, *flags, needs,
                                            factors)
        return kernel_backward(grad, x, *read, scale, kept, *extra, dropout_p, seed, *flags, needs)

    # --- the dispatch point ----------------------------------------------------------------------------------------
    def call(self, x, args, modulator, constraint, factor, extra, dropout_p, seed, backend):
        """Check x, select the backend for ``backend`` ("auto" or a name), run with ``scale = factor *
        gamma(modulator)``; return ``(out (..., N), name of the backend that ran)``. ``args`` is the family's
        arguments object (a tuple in its field order), checked by the caller (layers check theirs once)."""
        index, name = self.input_weight
        check_input(x, args[index], name)
        for i in self.passthrough:
            if args[i] is not None:
                check_residual(args[i], x)
        chosen = select_backend(backend, x, self.name)
        composite = chosen == "torch" and dropout_p == 0.0
        compiling = torch.compiler.is_compiling()
        if not (compiling or transforms_active()):
            if composite and self.cpp_op is not None:  # the C++ route (its backward is differentiable)
                return self.cpp_op(x, *args, modulator, constraint, factor, *extra), chosen
            if not composite or DOUBLE_BACKWARD_AHEAD[0]:
                return _FusedFunction.apply(self, x, modulator, constraint, factor, extra, dropout_p, seed, chosen,
                                            *args), chosen
        gamma = gamma_from_modulator(modulator, constraint)
        if composite and self.spec.composite_nd:  # no op and no mask: the torch forward runs on (..., K) as it is
            return self.forward_torch(x, *args, gamma, *extra, 0.0, None, factor=factor)[0], chosen
        x2d = x.reshape(-1, x.shape[-1])
        args2d = self.flatten(args, x2d.shape) if self.passthrough else args
        if compiling and not composite:  # kernels, or a torch mask from a host seed: the opaque registered op
            out = self.fwd(x2d, *args2d, gamma * factor, *extra, dropout_p, seed, chosen)[0]
        else:
            out = self.forward_torch(x2d, *args2d, gamma, *extra, dropout_p, seed, op_impl(chosen, self.name).dropout,
                                     factor)[0]
        return out.view(*x.shape[:-1], out.shape[1]), chosen
