"""Newton–CG with a fixed budget: the linear algebra of the amortized bilevel engine and of
victim certification.

Both the inner problem and the adjoint system of the bilevel attack (Runkel et al. 2024) are
linear solves with the training Hessian H = ∇²_θL(θ; x) (symmetric; positive definite near a
strict minimum, and everywhere for a convex victim with weight decay):

    Newton step     (H + ρI) d = −∇_θL(θ; x),        θ ← θ + d
    adjoint         (H + ρI) v = ∂l/∂θ

``conjugate_gradient`` solves (A + ρI) u = b with a FIXED number of iterations and masks
instead of a data-dependent ``while_loop``. Under ``vmap`` a while_loop runs until the
slowest batch element stops, and under a sharding its predicate becomes a cross-device
reduction; a fixed ``fori_loop`` has neither cost, turns K batched matrix–vector products
into matrix–matrix products, and makes each element's arithmetic independent of its
neighbours. An element whose relative residual ‖r‖ ≤ tol·‖b‖ freezes (its later iterations
are computed and discarded). So does one that meets non-positive curvature pᵀ(A + ρI)p ≤ 0
(truncated CG, Steihaug 1983): the iterate reached so far is still a descent direction for the
Newton system. Iterations counted in ``CGInfo.iterations`` are the ones that changed u.

Shapes: every vector is a pytree shaped like θ; scalars are 0-d arrays of θ's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from recon_jax.objectives import squared_norm
from recon_jax.precision import cast_tree, tree_dtype

tree_map = jax.tree_util.tree_map


def tree_vdot(a, b) -> jax.Array:
    """⟨a, b⟩ = Σ over leaves of Σ a·b (a scalar)."""
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def tree_axpy(alpha, x, y):
    """α x + y, leaf by leaf (α a scalar)."""
    return tree_map(lambda a, b: alpha * a + b, x, y)


@struct.dataclass
class CGInfo:
    """What one fixed-budget CG solve did (scalars; (K,) when vmapped)."""

    iterations: jax.Array  # iterations that changed the iterate (≤ the budget)
    residual: jax.Array  # ‖(A + ρI)u − b‖ / ‖b‖ at the returned u (the recursive residual)


def _scaled_warm_start(apply: Callable, b, x0):
    """(u₀, r₀) = (c x₀, b − c (A + ρI) x₀) with c = bᵀA x₀ / ‖A x₀‖², the scale that minimises
    ‖b − c A x₀‖: so ‖r₀‖ ≤ ‖b‖ whatever x₀ is (c = 0 drops a warm start that does not point
    along a solution). One product; (0, b) when ``x0`` is None."""
    if x0 is None:
        return tree_map(jnp.zeros_like, b), b
    ax = apply(x0)
    ax2 = squared_norm(ax)
    tiny = jnp.finfo(ax2.dtype).tiny
    c = jnp.where(ax2 > tiny, tree_vdot(b, ax) / jnp.where(ax2 > tiny, ax2, 1.0), 0.0)
    return tree_map(lambda a: c * a, x0), tree_map(lambda bb, a: bb - c * a, b, ax)


def conjugate_gradient(matvec: Callable, b, x0, *, iterations: int, ridge: float = 0.0,
                       tol: float = 0.0) -> tuple[object, CGInfo]:
    """Solve (A + ρI) u = b by ``iterations`` CG iterations from u₀ = ``x0`` (Hestenes–Stiefel).

        u₀ = c x₀ (``_scaled_warm_start``: the multiple of x₀ with the least residual),
        r₀ = b − (A + ρI)u₀,  p₀ = r₀
        α_k = r_kᵀr_k / p_kᵀ(A + ρI)p_k,   u_{k+1} = u_k + α_k p_k,   r_{k+1} = r_k − α_k (A + ρI)p_k
        β_k = r_{k+1}ᵀr_{k+1} / r_kᵀr_k,   p_{k+1} = r_{k+1} + β_k p_k

    ``matvec(p)`` is A p (A symmetric). One product per iteration, plus one for r₀ unless
    ``x0`` is None (u₀ = 0, r₀ = b, no product). Iterations stop changing u (a mask, not a
    branch) once ‖r‖ ≤ tol·‖b‖ or on non-positive curvature. Returns (u, CGInfo).
    The scaling (c ≈ 1 for a good warm start) keeps ‖r₀‖ ≤ ‖b‖: a warm start carried from
    another matrix (the amortized adjoint, whose H changes every step) can otherwise start CG
    with a residual many times ‖b‖ and carry it on, as measured on a hidden-layer victim where
    H's smallest eigenvalues change sign between steps.
    """
    apply = lambda p: tree_axpy(ridge, p, matvec(p)) if ridge else matvec(p)
    u, r = _scaled_warm_start(apply, b, x0)
    b_norm2 = squared_norm(b)
    dtype = b_norm2.dtype
    tiny = jnp.finfo(dtype).tiny
    threshold = (tol ** 2) * b_norm2
    rr = squared_norm(r)

    def body(_, carry):
        u, r, p, rr, done, count = carry
        active = ~done & (rr > threshold) & (rr > tiny)
        ap = apply(p)
        pap = tree_vdot(p, ap)
        active = active & (pap > 0)  # negative curvature: truncate (keep u)
        alpha = jnp.where(active, rr / jnp.where(active, pap, 1.0), 0.0)
        u = tree_axpy(alpha, p, u)
        r_new = tree_axpy(-alpha, ap, r)
        rr_new = squared_norm(r_new)
        beta = jnp.where(active, rr_new / jnp.where(active, rr, 1.0), 0.0)
        p = tree_map(lambda rn, pk, pold: jnp.where(active, rn + beta * pk, pold), r_new, p, p)
        r = tree_map(lambda rn, ro: jnp.where(active, rn, ro), r_new, r)
        rr = jnp.where(active, rr_new, rr)
        return u, r, p, rr, ~active, count + active.astype(jnp.int32)

    carry = (u, r, r, rr, jnp.asarray(False), jnp.asarray(0, jnp.int32))
    u, r, _, rr, _, count = lax.fori_loop(0, iterations, body, carry)
    residual = jnp.sqrt(rr / jnp.maximum(b_norm2, tiny))
    return u, CGInfo(iterations=count, residual=residual)


def minimal_residual(matvec: Callable, b, x0, *, iterations: int, ridge: float = 0.0,
                     tol: float = 0.0, early_stop: bool = False) -> tuple[object, CGInfo]:
    """Solve (A + ρI) u = b for a symmetric, possibly INDEFINITE A by ``iterations`` steps of
    MINRES (Paige & Saunders 1975) from the scaled warm start of ``_scaled_warm_start``.

    MINRES picks u_k ∈ u₀ + K_k(A + ρI, r₀) minimising ‖b − (A + ρI)u_k‖ (Lanczos on r₀ plus a
    QR update of the tridiagonal by Givens rotations), so the residual never grows: from a warm
    start it can only improve on it, where CG on an indefinite matrix may blow it up. This is the
    amortized adjoint's solver for networks with hidden layers, whose carried θ can sit where
    H = ∇²_θL has small negative eigenvalues. Fixed budget with masks, as ``conjugate_gradient``:
    an element freezes once ‖r‖ ≤ tol·‖b‖ or on a Lanczos breakdown (an invariant subspace,
    where u is exact). One product per iteration, plus one for r₀ unless ``x0`` is None.
    ``CGInfo.residual`` is the recursive estimate φ̄_k = ‖r_k‖/‖b‖. ``early_stop=True`` runs a
    ``while_loop`` instead, which ends once every element is frozen (at most ``iterations``):
    for occasional accurate solves (the bilevel refresh), as ``conjugate_gradient_to_tolerance``.
    """
    apply = lambda p: tree_axpy(ridge, p, matvec(p)) if ridge else matvec(p)
    u, r = _scaled_warm_start(apply, b, x0)
    b_norm2 = squared_norm(b)
    dtype = b_norm2.dtype
    tiny = jnp.finfo(dtype).tiny
    threshold = tol * jnp.sqrt(b_norm2)
    beta1 = jnp.sqrt(squared_norm(r))
    zeros = tree_map(jnp.zeros_like, b)
    zero, one = jnp.zeros((), dtype), jnp.ones((), dtype)
    safe = lambda d: jnp.where(jnp.abs(d) > tiny, d, one)

    def body(_, carry):
        u, v_old, v, beta, w_old, w, cs, sn, dbar, eps, phibar, done, count = carry
        active = ~done & (phibar > threshold) & (beta > tiny)
        # Lanczos: β_{k+1} v_{k+1} = (A + ρI) v_k − α_k v_k − β_k v_{k−1}.
        av = apply(v)
        alpha = tree_vdot(v, av)
        y = tree_map(lambda a, vk, vo: a - alpha * vk - beta * vo, av, v, v_old)
        beta_new = jnp.sqrt(squared_norm(y))
        # Apply the previous rotation, then make the new one: [c s; s −c] on (δ̄, α) and (0, β_{k+1}).
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps_new = sn * beta_new
        dbar_new = -cs * beta_new
        gamma = jnp.sqrt(gbar ** 2 + beta_new ** 2)
        cs_new, sn_new = gbar / safe(gamma), beta_new / safe(gamma)
        phi = cs_new * phibar
        w_new = tree_map(lambda vk, wo, wk: (vk - eps * wo - delta * wk) / safe(gamma), v, w_old, w)
        keep = lambda new, old: jnp.where(active, new, old)
        u = tree_map(lambda a, wn: keep(a + phi * wn, a), u, w_new)
        v_next = tree_map(lambda yk: yk / safe(beta_new), y)
        out = (tree_map(keep, v, v_old), tree_map(keep, v_next, v), keep(beta_new, beta),
               tree_map(keep, w, w_old), tree_map(keep, w_new, w), keep(cs_new, cs), keep(sn_new, sn),
               keep(dbar_new, dbar), keep(eps_new, eps), keep(sn_new * phibar, phibar))
        return (u, *out, ~active, count + active.astype(jnp.int32))

    v1 = tree_map(lambda a: a / safe(beta1), r)
    carry = (u, zeros, v1, beta1, zeros, zeros, -one, zero, zero, zero, beta1, jnp.asarray(False),
             jnp.asarray(0, jnp.int32))
    if early_stop:
        live = lambda c: ~c[11] & (c[10] > threshold) & (c[3] > tiny)
        _, final = lax.while_loop(lambda kc: (kc[0] < iterations) & live(kc[1]),
                                  lambda kc: (kc[0] + 1, body(kc[0], kc[1])), (jnp.asarray(0, jnp.int32), carry))
    else:
        final = lax.fori_loop(0, iterations, body, carry)
    u, *rest = final
    phibar, count = rest[-3], rest[-1]
    return u, CGInfo(iterations=count, residual=phibar / jnp.maximum(jnp.sqrt(b_norm2), tiny))


def lowers_precision(product_dtype, dtype) -> bool:
    """Whether products in ``product_dtype`` (None: none asked for) run below ``dtype``, θ's own
    floating dtype (None: θ has no floating leaves): the one test of mixed precision, used by
    the products here and by ``BilevelConfig.cost_per_step``."""
    return (product_dtype is not None and dtype is not None
            and jnp.finfo(product_dtype).bits < jnp.finfo(dtype).bits)


def reduced_hvp(objective: Callable, params, *args, product_dtype) -> Callable:
    """v ↦ ∇²_θL(θ; args) v computed in ``product_dtype`` (float32 in a float64 run), returned
    in θ's dtype: one ``jax.linearize`` of the gradient at (θ, args) cast down.

    For inexact Newton and adjoint solves whose residual is formed in full precision
    (mixed-precision iterative refinement: the correction may come from a lower-precision
    operator, the fixed point is set by the full-precision right-hand side). A product's
    relative error is about κ·2⁻²⁴ instead of κ·2⁻⁵³; a fixed-budget CG is inexact by
    ~10⁻² anyway. Integer leaves of ``args`` (labels) are left as they are.
    """
    high = tree_dtype(params)
    low_args = cast_tree(args, product_dtype)
    _, linear = jax.linearize(lambda p: jax.grad(objective)(p, *low_args), cast_tree(params, product_dtype))
    return lambda v: cast_tree(linear(cast_tree(v, product_dtype)), high)


def gradient_and_hvp(objective: Callable, params, *args, product_dtype=None):
    """(∇_θL(θ; args), v ↦ ∇²_θL(θ; args) v) from one ``jax.linearize`` of the gradient.

    The returned matvec reuses the linearisation: each call costs one forward-mode product
    through the gradient's computation (about one gradient's work), not a new trace. With
    ``product_dtype`` below θ's precision the gradient stays in θ's dtype and the products
    come from ``reduced_hvp`` (one more, cheaper, linearisation).
    """
    grad_fn = lambda p: jax.grad(objective)(p, *args)
    if lowers_precision(product_dtype, tree_dtype(params)):
        return grad_fn(params), reduced_hvp(objective, params, *args, product_dtype=product_dtype)
    return jax.linearize(grad_fn, params)


def newton_step(objective: Callable, params, *args, iterations: int, ridge: float = 0.0, tol: float = 0.0):
    """One damped Newton–CG step on θ ↦ L(θ; args):  θ⁺ = θ + d,  (H + ρI) d ≈ −∇_θL(θ).

    Returns (θ⁺, ‖∇_θL(θ)‖ before the step, CGInfo). The step is not line-searched: near a
    strict minimum (the inner problem warm-started at the previous outer step's θ, or a victim
    from L-BFGS) the full Newton step converges quadratically; callers guard it (see
    ``recon_jax.bilevel`` and ``recon_jax.training``).
    """
    grad, hvp = gradient_and_hvp(objective, params, *args)
    minus_grad = tree_map(jnp.negative, grad)
    step, info = conjugate_gradient(hvp, minus_grad, None, iterations=iterations, ridge=ridge, tol=tol)
    return tree_map(jnp.add, params, step), jnp.sqrt(squared_norm(grad)), info


def conjugate_gradient_to_tolerance(matvec: Callable, b, x0, *, maxiter: int, ridge: float = 0.0,
                                    tol: float = 0.0) -> tuple[object, CGInfo]:
    """The same CG iteration as ``conjugate_gradient``, but stopping early: a ``while_loop``
    that ends when every element has met ‖r‖ ≤ tol·‖b‖ (or non-positive curvature), or after
    ``maxiter`` iterations. Under ``vmap`` it runs until the slowest element is done (the others
    are masked), so it is meant for occasional accurate solves (the bilevel refresh), not for
    every step. ``x0=None`` starts from 0.
    """
    apply = lambda p: tree_axpy(ridge, p, matvec(p)) if ridge else matvec(p)
    if x0 is None:
        u, r = tree_map(jnp.zeros_like, b), b
    else:
        u, r = x0, tree_map(jnp.subtract, b, apply(x0))
    b_norm2 = squared_norm(b)
    tiny = jnp.finfo(b_norm2.dtype).tiny
    threshold = (tol ** 2) * b_norm2
    rr = squared_norm(r)

    def cond(carry):
        _, _, _, rr, done, count, k = carry
        return (k < maxiter) & ~done & (rr > threshold) & (rr > tiny)

    def body(carry):
        u, r, p, rr, done, count, k = carry
        ap = apply(p)
        pap = tree_vdot(p, ap)
        active = pap > 0
        alpha = jnp.where(active, rr / jnp.where(active, pap, 1.0), 0.0)
        u = tree_axpy(alpha, p, u)
        r_new = tree_axpy(-alpha, ap, r)
        rr_new = squared_norm(r_new)
        beta = rr_new / jnp.where(rr > 0, rr, 1.0)
        p = tree_map(lambda rn, pk: rn + beta * pk, r_new, p)
        return u, r_new, p, rr_new, ~active, count + active.astype(jnp.int32), k + 1

    carry = (u, r, r, rr, jnp.asarray(False), jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32))
    u, r, _, rr, _, count, _ = lax.while_loop(cond, body, carry)
    return u, CGInfo(iterations=count, residual=jnp.sqrt(rr / jnp.maximum(b_norm2, tiny)))


# Trust-region Newton–CG from far away: victim certification (``recon_jax.training``).


@struct.dataclass
class SteihaugInfo:
    """What one ``steihaug_cg`` solve did (scalars)."""

    iterations: jax.Array  # Hessian–vector products used (int32)
    residual: jax.Array  # ‖H d + g‖ / ‖g‖ at the returned step d (the recursive residual)
    model_decrease: jax.Array  # m(0) − m(d) = −(gᵀd + ½ dᵀHd), ≥ 0
    step_norm: jax.Array  # ‖d‖
    boundary: jax.Array  # bool: d ends on the trust-region boundary ‖d‖ = Δ
    negative_curvature: jax.Array  # bool: CG met pᵀHp ≤ 0
    breakdown: jax.Array  # bool: pᵀHp was not finite (the product overflowed or met a NaN)


def steihaug_cg(matvec: Callable, grad, radius, *, tol, maxiter: int,
                grad_norm2=None) -> tuple[object, SteihaugInfo]:
    """Trust-region Newton step by truncated CG (Steihaug 1983; Nocedal & Wright 2006, Alg. 7.2).

    Approximately minimises the quadratic model m(d) = gᵀd + ½ dᵀHd over ‖d‖ ≤ Δ, with
    H = ``matvec`` (symmetric, possibly indefinite), g = ``grad`` (pytrees shaped like θ) and
    Δ = ``radius`` (a scalar):

        z₀ = 0,  r₀ = g,  p₀ = −g                                   (r_j = H z_j + g)
        κ_j = p_jᵀ H p_j
        if κ_j ≤ 0:                return z_j + τ p_j with τ > 0, ‖z_j + τ p_j‖ = Δ   (negative curvature)
        α_j = r_jᵀr_j / κ_j
        if ‖z_j + α_j p_j‖ ≥ Δ:    return z_j + τ p_j, as above                        (boundary)
        z_{j+1} = z_j + α_j p_j,   r_{j+1} = r_j + α_j H p_j
        if ‖r_{j+1}‖ ≤ tol·‖g‖:    return z_{j+1}                                       (inexact Newton step)
        β_j = r_{j+1}ᵀr_{j+1} / r_jᵀr_j,   p_{j+1} = −r_{j+1} + β_j p_j

    and z after ``maxiter`` products otherwise. ‖z_j + s p_j‖² is evaluated from the scalars
    ‖z_j‖², z_jᵀp_j and ‖p_j‖², kept by the CG recurrences (r_{j+1} ⟂ p_j, r_{j+1} ⟂ z_{j+1}):

        ‖p_{j+1}‖² = ‖r_{j+1}‖² + β_j² ‖p_j‖²,   z_{j+1}ᵀp_{j+1} = β_j (z_jᵀp_j + α_j ‖p_j‖²)

    (Conn, Gould & Toint 2000, "Trust-region methods", ch. 7), and so is the model along the
    path, from r_jᵀp_j = −r_jᵀr_j:

        m(z_j + s p_j) = m(z_j) − s r_jᵀr_j + ½ s² κ_j

    so an iteration costs one product, two inner products and three vector updates. ``tol``
    (a scalar, may be traced) is the relative residual, e.g. ``forcing_term``; ``grad_norm2``
    = ‖g‖² if the caller has it. Unlike ``conjugate_gradient`` this is a ``while_loop`` that
    stops as soon as it is done: one unbatched solve pays only for the products it uses. A
    non-finite κ stops it at the current z. Returns (d, SteihaugInfo).
    """
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(grad))
    g_norm2 = jnp.asarray(squared_norm(grad) if grad_norm2 is None else grad_norm2, dtype)
    radius2 = jnp.asarray(radius, dtype) ** 2
    threshold = jnp.asarray(tol, dtype) ** 2 * g_norm2
    tiny = jnp.finfo(dtype).tiny

    def cond(carry):
        *_, rr, _, _, _, _, j, status = carry
        return (status == 0) & (j < maxiter) & (rr > threshold)

    def body(carry):
        z, r, p, rr, zz, zp, pp, model, j, _ = carry
        hp = matvec(p)
        kappa = tree_vdot(p, hp)
        positive = kappa > 0  # False for κ ≤ 0 and for NaN
        finite = jnp.isfinite(kappa)
        alpha = rr / jnp.where(positive, kappa, 1.0)
        outside = ~positive | (zz + 2 * alpha * zp + alpha ** 2 * pp >= radius2)
        # τ ≥ 0 with ‖z + τp‖ = Δ: the positive root of ‖p‖² τ² + 2 zᵀp τ + (‖z‖² − Δ²) = 0.
        tau = (jnp.sqrt(jnp.maximum(zp ** 2 + pp * (radius2 - zz), 0.0)) - zp) / jnp.maximum(pp, tiny)
        step = jnp.where(finite, jnp.where(outside, tau, alpha), 0.0)
        z = tree_axpy(step, p, z)
        r = tree_axpy(step, hp, r)
        rr_new = squared_norm(r)
        beta = rr_new / jnp.where(rr > 0, rr, 1.0)
        p = tree_map(lambda rn, pk: beta * pk - rn, r, p)
        model = model - step * rr + 0.5 * step ** 2 * jnp.where(finite, kappa, 0.0)
        zz = zz + 2 * step * zp + step ** 2 * pp
        zp = beta * (zp + step * pp)
        pp = rr_new + beta ** 2 * pp
        status = jnp.where(~finite, 3, jnp.where(~positive, 2, jnp.where(outside, 1, 0))).astype(jnp.int32)
        return z, r, p, rr_new, zz, zp, pp, model, j + 1, status

    zero = jnp.zeros((), dtype)
    carry = (tree_map(jnp.zeros_like, grad), grad, tree_map(jnp.negative, grad), g_norm2, zero, zero, g_norm2, zero,
             jnp.asarray(0, jnp.int32), jnp.asarray(0, jnp.int32))
    z, _, _, rr, zz, _, _, model, j, status = lax.while_loop(cond, body, carry)
    return z, SteihaugInfo(iterations=j, residual=jnp.sqrt(rr / jnp.maximum(g_norm2, tiny)),
                           model_decrease=-model, step_norm=jnp.sqrt(jnp.maximum(zz, 0.0)),
                           boundary=(status == 1) | (status == 2), negative_curvature=status == 2,
                           breakdown=status == 3)


def forcing_term(grad_norm, target, *, eta_max: float = 0.5):
    """Relative CG tolerance of an inexact Newton step (a scalar):

        η_k = max( min(η_max, √‖g_k‖),  min(η_max, 0.1 · target / ‖g_k‖) )

    The first term is Nocedal & Wright (2006), eq. (7.3) (after Dembo, Eisenstat & Steihaug
    1982; Eisenstat & Walker 1996): solving H d = −g only to ‖H d + g‖ ≤ η_k‖g_k‖ keeps the
    steps far from the minimum cheap (η = 0.5: a few CG iterations) and still converges
    superlinearly, ‖g_{k+1}‖ = O(‖g_k‖^{3/2}), as η_k → 0. The second is a floor against
    over-solving the last step: a linear residual below a tenth of the ``target`` gradient
    norm cannot be needed, since the next gradient is the residual plus the model's O(‖d‖²)
    error. ``grad_norm`` = ‖g_k‖ > 0 and ``target`` are scalars.
    """
    grad_norm = jnp.asarray(grad_norm)
    eta = jnp.minimum(eta_max, jnp.sqrt(grad_norm))
    floor = jnp.minimum(eta_max, 0.1 * target / jnp.maximum(grad_norm, jnp.finfo(grad_norm.dtype).tiny))
    return jnp.maximum(eta, floor)


def value_gradient_and_hvp(objective: Callable, params, *args, product_dtype=None):
    """(L(θ; args), ∇_θL(θ; args), v ↦ ∇²_θL(θ; args) v) from one ``jax.linearize``.

    As ``gradient_and_hvp``, with L(θ) carried out of the same linearisation as an auxiliary
    output (a scalar), so a caller that needs the loss pays no extra forward pass. With
    ``product_dtype`` below θ's precision, L and ∇L come from one full-precision
    ``value_and_grad`` and the products from ``reduced_hvp``.
    """
    if lowers_precision(product_dtype, tree_dtype(params)):
        value, grad = jax.value_and_grad(objective)(params, *args)
        return value, grad, reduced_hvp(objective, params, *args, product_dtype=product_dtype)

    def grad_with_value(p):
        value, grad = jax.value_and_grad(objective)(p, *args)
        return grad, value

    grad, hvp, value = jax.linearize(grad_with_value, params, has_aux=True)
    return value, grad, hvp


@struct.dataclass
class TrustRegionInfo:
    """What one ``trust_region_newton_step`` did (scalars)."""

    value: jax.Array  # L(θ) at the step's starting point
    grad_norm: jax.Array  # ‖∇L(θ)‖ there
    converged: jax.Array  # bool: ‖∇L(θ)‖ ≤ the target already; no step was taken
    accepted: jax.Array  # bool: θ moved (ρ > 1e-4)
    ratio: jax.Array  # ρ = actual / predicted decrease
    cg: SteihaugInfo


def reduction_ratio(value, new_value, predicted, *, noise):
    """ρ = (L(θ) − L(θ + d)) / (m(0) − m(d)), the trust-region agreement ratio (N&W 2006, eq. 4.4).

    All arguments are scalars. Near a minimum both decreases fall below the rounding error of
    computing L (float64: a Newton step at ‖g‖ ≈ 1e-8 with curvature ≈ 1 changes L by ≈ 1e-16),
    and their ratio is noise. When the predicted decrease is at most ``noise`` (an absolute
    bound on that rounding error) the step is judged by the loss alone: ρ = 1 if
    L(θ + d) ≤ L(θ) + noise, else ρ = −1 (the relaxation Hager & Zhang 2005 use against the
    same cancellation in their approximate Wolfe line search). A non-finite L(θ + d) gives ρ = −∞.
    """
    actual = value - new_value
    resolved = predicted > noise
    rho = jnp.where(resolved, actual / jnp.where(resolved, predicted, 1.0), jnp.where(actual >= -noise, 1.0, -1.0))
    return jnp.where(jnp.isfinite(new_value), rho, -jnp.inf)


def trust_region_newton_step(objective: Callable, params, radius, *args, target, cg_maxiter: int,
                             eta_max: float = 0.5, hessian_dtype=None, rel_noise: float | None = None):
    """One trust-region Newton–CG iteration on θ ↦ L(θ; args) (Nocedal & Wright 2006, Alg. 4.1 with Alg. 7.2).

        L, g, H  = L(θ), ∇L(θ), ∇²L(θ)                   one ``jax.linearize`` (``value_gradient_and_hvp``)
        d        ≈ argmin_{‖d‖ ≤ Δ} gᵀd + ½ dᵀHd          ``steihaug_cg``, relative tolerance ``forcing_term``
        ρ        = (L(θ) − L(θ + d)) / (m(0) − m(d))      ``reduction_ratio``
        θ       ← θ + d                                   if ρ > 1e-4
        Δ       ← ¼‖d‖ if ρ < ¼;   2Δ if ρ > ¾ and ‖d‖ = Δ;   Δ otherwise

    Truncating CG at negative curvature or at the boundary (Steihaug 1983) makes the step
    well defined where H is indefinite, as it is for a random-init MLP far from its minimum;
    near a strict minimum the steps are interior, ρ → 1, and the iteration is an inexact
    Newton method with superlinear convergence. If ‖g‖ ≤ ``target`` nothing moves
    (``info.converged``). Each iteration costs one linearisation, ``info.cg.iterations``
    products and one loss evaluation. ``radius`` = Δ > 0 (a scalar).

    ``hessian_dtype`` (e.g. float32 for a float64 θ): evaluate H, and run CG, at θ and
    ``args`` cast to that dtype, while L, g and ρ stay in θ's dtype. The iteration is then an
    inexact Newton method with an approximate Hessian: the fixed point is still ∇L(θ) = 0 in
    full precision, and near it each step shrinks ‖g‖ by about the Hessian's relative error
    times its condition number (Dembo, Eisenstat & Steihaug 1982; Kelley 2022, "Newton's
    method in mixed precision"), for half the cost per product on a CPU.

    ``rel_noise`` scales |L(θ)| into the rounding bound of ``reduction_ratio`` (default 100
    machine epsilons of θ's dtype).

    Returns (θ', Δ', TrustRegionInfo); θ' is a pytree like θ.
    """
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    if hessian_dtype is None or jnp.dtype(hessian_dtype) == dtype:
        value, grad, hvp = value_gradient_and_hvp(objective, params, *args)
        cg_grad, cg_radius = grad, radius
    else:
        low = lambda tree: tree_map(lambda a: a.astype(hessian_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                    tree)
        value, grad = jax.value_and_grad(objective)(params, *args)
        _, _, hvp = value_gradient_and_hvp(objective, low(params), *low(args))
        cg_grad, cg_radius = low(grad), jnp.asarray(radius, hessian_dtype)
    grad_norm2 = squared_norm(grad)
    grad_norm = jnp.sqrt(grad_norm2)
    converged = grad_norm <= target
    eta = jnp.where(converged, jnp.inf, forcing_term(grad_norm, target, eta_max=eta_max))  # ∞: no CG iteration
    step, cg = steihaug_cg(hvp, cg_grad, cg_radius, tol=eta, maxiter=cg_maxiter, grad_norm2=grad_norm2)
    step = tree_map(lambda d, p: d.astype(p.dtype), step, params)
    trial = tree_map(jnp.add, params, step)
    new_value = objective(trial, *args)
    noise = (100 * jnp.finfo(dtype).eps if rel_noise is None else rel_noise) * jnp.abs(value)
    rho = reduction_ratio(value, new_value, cg.model_decrease.astype(dtype), noise=noise)
    accepted = (rho > 1e-4) & ~converged
    grown = jnp.where((rho > 0.75) & cg.boundary, 2 * radius, radius)
    radius = jnp.where(converged, radius, jnp.where(rho < 0.25, 0.25 * cg.step_norm.astype(dtype), grown))
    params = tree_map(lambda new, old: jnp.where(accepted, new, old), trial, params)
    return params, radius, TrustRegionInfo(value=value, grad_norm=grad_norm, converged=converged, accepted=accepted,
                                           ratio=rho, cg=cg)


LINE_SEARCH_STEPS = (1.0, 0.5, 0.25, 0.125)
ARMIJO = 1e-4  # sufficient-decrease constant c of the line searches here and in recon_jax.lbfgs
ROUNDOFF = 64  # a predicted decrease below ROUNDOFF·eps·|L| is round-off: the Armijo test compares noise


def guarded_newton_step(objective: Callable, params, *args, iterations: int, ridge: float = 0.0, tol: float = 0.0,
                        steps: tuple[float, ...] = LINE_SEARCH_STEPS, armijo: float = ARMIJO, product_dtype=None):
    """A Newton–CG step with a fixed, parallel Armijo line search (for a non-convex L):

        d from (H + ρI) d ≈ −g by ``iterations`` CG iterations (truncated at negative curvature),
        θ⁺ = θ + α d,  α = the largest of ``steps`` with L(θ + α d) ≤ L(θ) + c α gᵀd  (c = ``armijo``),
        and θ⁺ = θ if none qualifies (or d is not a descent direction).

    The trial values L(θ + α d) are evaluated together (one vmapped forward pass over the
    len(steps) candidates), so there is no data-dependent loop: under ``vmap`` each element
    picks its own α. L(θ) comes out of the same linearisation as g and H. ``product_dtype``:
    the Hessian products' precision (``value_gradient_and_hvp``); g, L and the trial values
    stay in θ's. Returns (θ⁺, ‖g‖, CGInfo, α).
    """
    value, grad, hvp = value_gradient_and_hvp(objective, params, *args, product_dtype=product_dtype)
    new_params, info, alpha = _armijo_newton_update(objective, params, args, value, grad, hvp, iterations=iterations,
                                                    ridge=ridge, tol=tol, steps=steps, armijo=armijo)
    return new_params, jnp.sqrt(squared_norm(grad)), info, alpha


def _armijo_newton_update(objective: Callable, params, args, value, grad, hvp, *, iterations: int, ridge, tol,
                          steps: tuple[float, ...] = LINE_SEARCH_STEPS, armijo: float = ARMIJO):
    """The body of ``guarded_newton_step`` from L(θ), g and H at θ: (θ⁺, CGInfo, α)."""
    direction, info = conjugate_gradient(hvp, tree_map(jnp.negative, grad), None, iterations=iterations,
                                         ridge=ridge, tol=tol)
    slope = tree_vdot(grad, direction)
    alphas = jnp.asarray(steps, value.dtype)
    trial = jax.vmap(lambda a: objective(tree_axpy(a, direction, params), *args))(alphas)
    # A step whose predicted decrease is below the round-off of L (θ already converged) is taken
    # whole: the test would only compare noise, and its outcome would depend on the batch.
    negligible = -slope <= ROUNDOFF * jnp.finfo(value.dtype).eps * jnp.abs(value)
    accept = ((trial <= value + armijo * alphas * slope) & jnp.isfinite(trial) & (slope < 0)) | (
        negligible & jnp.isfinite(trial))
    # The first accepted α in the (decreasing) list, or 0.
    alpha = jnp.where(jnp.any(accept), alphas[jnp.argmax(accept)], jnp.zeros((), value.dtype))
    return tree_axpy(alpha, direction, params), info, alpha


@struct.dataclass
class MinimizeInfo:
    """What one ``minimize`` did (scalars; (K,) when vmapped)."""

    steps: jax.Array  # Newton steps taken (int32), each one linearisation and ``cg_iterations`` products
    gradients: jax.Array  # evaluations of ∇L (int32): one per linearisation (two with reduced-precision
    #                       products), the steps' and the one that found ‖g‖ ≤ tol, plus one at the
    #                       returned θ where the loop stopped unconverged
    grad_norm: jax.Array  # ‖∇L(θ)‖ at the returned θ
    stalled: jax.Array  # bool: stopped at ‖∇L‖ > tol because no step of the line search was accepted


def minimize(objective: Callable, params, *args, tol, max_steps: int, cg_iterations: int, ridge: float = 0.0,
             eta_max: float = 0.5, product_dtype=None) -> tuple[object, MinimizeInfo]:
    """θ ≈ argmin_θ L(θ; args) to ‖∇L(θ)‖ ≤ ``tol`` by line-searched inexact Newton–CG whose
    every step has a FIXED budget (a batch-friendly replacement for L-BFGS in accurate solves):

        repeat (at most ``max_steps`` times, while ‖g_k‖ > tol):
            g_k, H_k = ∇L(θ_k), ∇²L(θ_k)                               one linearisation
            (H_k + ρI) d ≈ −g_k   by ``cg_iterations`` CG iterations,   masked once ‖H_k d + g_k‖ ≤ η_k‖g_k‖
            θ_{k+1} = θ_k + α d,  α ∈ {1, ½, ¼, ⅛} the first with Armijo decrease (parallel test)
        η_k = ``forcing_term``(‖g_k‖, tol) (Nocedal & Wright 2006, eq. 7.3; Dembo, Eisenstat &
        Steihaug 1982): superlinear convergence near the minimum.

    For a strongly convex L (an affine victim with weight decay) the Armijo-guarded Newton
    iteration converges globally, and quadratically near θ(x) as η_k → 0. For a non-convex L it
    is truncated at negative curvature and may stop early (``stalled``), which is why
    ``recon_jax.bilevel`` uses it for convex inner problems only.

    Why not L-BFGS: under ``vmap`` jaxopt's L-BFGS is a ``while_loop`` over its zoom line search,
    another ``while_loop``, and XLA selects over the whole solver state at every iteration of
    either; here the only data-dependent loop is the outer one, its body has fixed length, and
    K initialisations' products become matrix–matrix products. Measured on 64 gaussian:0.1
    initialisations of 20 MNIST images (affine, float64, from θ* to ‖g‖ ≤ 1e-10): L-BFGS 31
    iterations, vmapped 1.50 s against 0.62 s for 64 sequential solves; this, with 5 CG
    iterations per step, 10 steps, 0.30 s vmapped against 0.25 s sequential
    (``benchmarks/bilevel.py`` (b) times it inside whole runs).

    ``product_dtype``: the Hessian products' precision (iterative refinement: the gradients,
    the line search and the stopping test stay in θ's dtype, so the fixed point is the
    full-precision one). A non-finite step is never accepted. Costs per step: one gradient (two
    with reduced-precision products), ``cg_iterations`` products, len(LINE_SEARCH_STEPS)
    forward passes; one more gradient at the end for the returned ‖∇L‖ where the loop stopped
    unconverged (``MinimizeInfo.gradients`` counts them all). Returns (θ, MinimizeInfo).
    """
    dtype = tree_dtype(params)
    tol = jnp.asarray(tol, dtype)

    def body(carry):
        params, steps, _, _, _ = carry
        value, grad, hvp = value_gradient_and_hvp(objective, params, *args, product_dtype=product_dtype)
        grad_norm = jnp.sqrt(squared_norm(grad))
        converged = grad_norm <= tol

        def move(_):
            new, _, alpha = _armijo_newton_update(objective, params, args, value, grad, hvp, iterations=cg_iterations,
                                                  ridge=ridge, tol=forcing_term(grad_norm, tol, eta_max=eta_max))
            return new, alpha == 0

        # Unbatched, a converged θ skips the CG; under vmap both branches run and are selected.
        params, stalled = lax.cond(converged, lambda _: (params, jnp.asarray(False)), move, None)
        return params, steps + (~converged).astype(jnp.int32), converged, stalled, grad_norm

    def cond(carry):
        _, steps, converged, stalled, _ = carry
        return ~converged & ~stalled & (steps < max_steps)

    carry = (params, jnp.asarray(0, jnp.int32), jnp.asarray(False), jnp.asarray(False), jnp.asarray(jnp.inf, dtype))
    params, steps, converged, stalled, grad_norm = lax.while_loop(cond, body, carry)
    # A converged loop measured ‖∇L‖ at the θ it returns (its last body did not move); otherwise
    # the last measurement is one step old, and one more gradient gives the norm at θ.
    grad_norm = lax.cond(converged, lambda _: grad_norm,
                         lambda _: jnp.sqrt(squared_norm(jax.grad(objective)(params, *args))), None)
    per_linearisation = 2 if lowers_precision(product_dtype, dtype) else 1
    gradients = (steps + converged.astype(jnp.int32)) * per_linearisation + (~converged).astype(jnp.int32)
    return params, MinimizeInfo(steps=steps, gradients=gradients, grad_norm=grad_norm,
                                stalled=stalled & (grad_norm > tol))
