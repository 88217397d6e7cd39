"""Walking traced programs, for the mixed-precision tests (test_layers, test_train_step)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
# The primitives that multiply: they should take the compute dtype (see is_product).
PRODUCTS = ("dot_general", "conv_general_dilated")


def equations(jaxpr) -> Iterator:
    """Every equation of a (closed) jaxpr and of the jaxprs nested in its equations (jit,
    shard_map, custom_vjp, scan, ...)."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    yield from equations(sub)


def dtypes(variables) -> set:
    """The dtypes of a list of jaxpr variables (PRNG key types too: as they are, since jax 0.7's
    ``jnp.dtype`` refuses them)."""
    return {v.aval.dtype for v in variables if hasattr(v.aval, "dtype")}


def is_float32_sum(eqn) -> bool:
    """A ``dot_general`` asked for ``Precision.HIGHEST``: a float32 sum written as a matrix
    product (``losses.mixture_gaussian_log_density``'s derivatives), not a layer's product."""
    precision = eqn.params.get("precision") if eqn.primitive.name == "dot_general" else None
    return precision is not None and jax.lax.Precision.HIGHEST in tuple(precision)


def is_product(eqn) -> bool:
    """A layer's matmul or convolution (``PRODUCTS``), which takes the compute dtype."""
    return eqn.primitive.name in PRODUCTS and not is_float32_sum(eqn)


def is_reduction(eqn) -> bool:
    """Whether ``eqn`` sums/compares several values into one: over axes (``reduce_*``,
    ``arg*``, ``cum*``, a float32 sum written as a matmul: ``is_float32_sum``) or over devices
    (``psum*``, ``pmax``, ``pmin``).

    A ``reduce_*`` over axes that all have size 1 is not one: it only drops the axes, exactly,
    in any dtype (jax 0.7 transposes ``jnp.stack``'s new axis that way; later versions use a
    reshape)."""
    name = eqn.primitive.name
    if is_float32_sum(eqn):
        return True
    if name == "reduce_precision":
        return False
    if name.startswith("reduce_") and "axes" in eqn.params:
        shape = eqn.invars[0].aval.shape
        return math.prod(shape[a] for a in eqn.params["axes"]) > 1
    return name.startswith(("reduce_", "arg", "cum", "psum", "pmax", "pmin"))
