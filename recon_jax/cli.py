"""``recon-jax`` command line: a thin layer that parses flags and calls the library.

    recon-jax train        train a victim to a certified stationary point   (recon_jax.victim)
    recon-jax reconstruct  reconstruct its training images from θ* (bilevel or kkt) (recon_jax.reconstruct)
    recon-jax sweep        random hyperparameter search, best runs pooled     (recon_jax.reconstruct)
    recon-jax evaluate     judge a run against training and held-out images   (recon_jax.evaluation)
    recon-jax study        a resumable grid of runs, judged and reported      (recon_jax.study)
    recon-jax identifiability  membership AUC against N·D/P of a finished study (recon_jax.identifiability)
    recon-jax datasets     show where dataset names are looked up             (recon_jax.data)

Errors in the input are reported as one line, ``recon-jax: error: ...``, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from recon_jax.errors import ReconJaxError

log = logging.getLogger("recon_jax")


def _add_train(sub) -> None:
    from recon_jax.data.selection import MEAN_MODES
    from recon_jax.models import ACTIVATIONS, ARCHITECTURES
    from recon_jax.objectives import LOSSES
    from recon_jax.precision import DTYPES
    from recon_jax.training import DEFAULT_SEGMENT, SOLVERS, TrainConfig

    p = sub.add_parser("train", help="train a victim network to a certified stationary point",
                       description="Train a victim full-batch (trust-region Newton-CG by default) until "
                                   "||grad L|| <= tol, and write DIR/victim.msgpack, DIR/victim.json and DIR/data.npz.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="digits",
                   help="digits (embedded, offline), mnist, fashion_mnist, cifar10, idx:PATH, cifar:PATH, "
                        "npz:PATH or tfds:NAME (default: digits); see `recon-jax datasets`")
    d.add_argument("--split", default=None, help="source split: train or test (default: train if present)")
    d.add_argument("--data-dir", default=None, help="a prepared TFDS data_dir")
    d.add_argument("--n-per-class", type=int, default=10, help="training images per class (default 10)")
    d.add_argument("--classes", default=None, help="comma-separated source classes to use (default: all)")
    d.add_argument("--binary-positive", default=None,
                   help="make the task binary: these classes are +1, the rest -1 (e.g. 1,3,5,7,9)")
    d.add_argument("--n-heldout", type=int, default=None, help="held-out pool size (default: training set size)")
    d.add_argument("--mean", choices=MEAN_MODES, default="pixel",
                   help="subtract the training mean per pixel (default), per channel, or not at all")
    m = p.add_argument_group("architecture")
    m.add_argument("--model", choices=("affine", *ARCHITECTURES), default="mlp")
    m.add_argument("--hidden", default=None,
                   help="hidden widths, e.g. 1000 or 1000,1000 (mlp: default 1000; cnn: dense layers after the "
                        "conv blocks, default none)")
    m.add_argument("--channels", default=None,
                   help="cnn only: output channels of the 3x3 conv + 2x2 average-pool blocks, e.g. 16,32 "
                        "(default 16,32)")
    m.add_argument("--activation", default="gelu", help=f"{', '.join(ACTIVATIONS)} (default gelu)")
    m.add_argument("--softplus-beta", type=float, default=1.0, help="softplus sharpness beta")
    m.add_argument("--bias", default="all", help="all, none, or one 0/1 flag per layer, e.g. 1,0,0")
    m.add_argument("--first-layer-init-scale", type=float, default=None,
                   help="std of the first kernel's N(0, s^2) init (reference: 1e-4)")
    o = p.add_argument_group("objective and solver")
    o.add_argument("--loss", choices=LOSSES, default="ce")
    o.add_argument("--weight-decay", type=float, default=1e-3)
    o.add_argument("--solver", choices=SOLVERS, default=TrainConfig.solver,
                   help=f"newton: trust-region Newton-CG; lbfgs, gd: jaxopt (default {TrainConfig.solver})")
    o.add_argument("--lr", type=float, default=None, help="gd step size (default: line search)")
    o.add_argument("--acceleration", action="store_true", help="gd: Nesterov acceleration")
    o.add_argument("--maxiter", type=int, default=TrainConfig.maxiter,
                   help=f"iterations (newton: trust-region steps) at most (default {TrainConfig.maxiter})")
    o.add_argument("--cg-maxiter", type=int, default=TrainConfig.cg_maxiter,
                   help=f"newton: Hessian-vector products per step at most (default {TrainConfig.cg_maxiter})")
    o.add_argument("--hessian-dtype", choices=DTYPES, default=None,
                   help="newton: precision of the Hessian-vector products and CG (default float32; the gradient, "
                        "loss and certificate stay in --dtype)")
    o.add_argument("--segment", type=int, default=None,
                   help="iterations per compiled segment, between progress reports (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_SEGMENT.items()) + ")")
    o.add_argument("--tol", type=float, default=None,
                   help="solver tolerance on ||grad L|| (default by dtype: 1e-10 float64, 1e-6 float32)")
    o.add_argument("--certify-tol", type=float, default=None,
                   help="stationary iff ||grad L|| <= this (default by dtype: 1e-8 float64, 1e-5 float32)")
    o.add_argument("--dtype", choices=DTYPES, default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="victim folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a different victim already in --out")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from recon_jax.precision import enable_float64
    from recon_jax.training import TrainConfig
    from recon_jax.victim import VictimSpec, parse_bias, parse_int_list, train_and_save

    if args.dtype == "float64":
        enable_float64()
    hidden_text = args.hidden if args.hidden is not None else ("1000" if args.model == "mlp" else None)
    hidden = () if args.model == "affine" else (parse_int_list(hidden_text) or ())
    if args.model == "mlp" and not hidden:
        raise ReconJaxError("--model mlp needs --hidden, e.g. --hidden 1000; use --model affine for no hidden layer")
    if args.channels is not None and args.model != "cnn":
        raise ReconJaxError(f"--channels is for --model cnn, not --model {args.model}")
    channels = (parse_int_list(args.channels or "16,32") or ()) if args.model == "cnn" else ()
    spec = VictimSpec(
        dataset=args.dataset, split=args.split, data_dir=args.data_dir, n_per_class=args.n_per_class,
        classes=parse_int_list(args.classes), binary_positive=parse_int_list(args.binary_positive),
        n_heldout=args.n_heldout, mean=args.mean, hidden=hidden, activation=args.activation,
        softplus_beta=args.softplus_beta, use_bias=parse_bias(args.bias, len(hidden) + 1),
        first_layer_init_scale=args.first_layer_init_scale,
        arch="mlp" if args.model == "affine" else args.model, channels=channels,
        train=TrainConfig(loss=args.loss, weight_decay=args.weight_decay, solver=args.solver,
                          maxiter=args.maxiter, tol=args.tol, certify_tol=args.certify_tol, dtype=args.dtype,
                          learning_rate=args.lr, acceleration=args.acceleration, cg_maxiter=args.cg_maxiter,
                          hessian_dtype=args.hessian_dtype, segment=args.segment),
        seed=args.seed)
    report = train_and_save(spec, args.out, overwrite=args.overwrite,
                            progress=lambda it, err: log.info("iteration %6d  ||grad L|| %.3e", it, err))
    summary = report if isinstance(report, dict) else report.to_dict()
    keys = ("stationary", "grad_norm", "grad_norm_rel", "loss", "train_accuracy", "heldout_accuracy",
            "n_params", "iterations", "grad_evals", "hvp_evals", "seconds", "note")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=2))
    print(f"wrote {args.out}")
    return 0


def _add_attack_args(p, *, sweep: bool) -> None:
    """Flags shared by `reconstruct` and `sweep`."""
    from recon_jax import bilevel, kkt
    from recon_jax.attack import OPTIMIZERS
    from recon_jax.bilevel import ENGINES, SCHEDULES
    from recon_jax.precision import DTYPES
    from recon_jax.reconstruct import PROGRAMS
    from recon_jax.solvers import BACKENDS

    p.add_argument("--victim", required=True, help="victim folder written by `recon-jax train`")
    p.add_argument("--method", choices=tuple(PROGRAMS), default="bilevel")
    p.add_argument("--init", default="gaussian:0.1",
                   help="gaussian:SIGMA, gt-noise:SIGMA, heldout, mean[:SIGMA] or interp:A (default gaussian:0.1"
                        + ("; in a sweep a gaussian init uses each run's sampled SIGMA)" if sweep else ")"))
    if sweep:
        p.add_argument("--runs", type=int, required=True, help="random hyperparameter configurations R")
        p.add_argument("--seeds", type=int, default=1, help="initial draws per configuration (default 1)")
        p.add_argument("--pool", type=int, default=4, help="pool the candidates of the best P runs (default 4)")
        p.add_argument("--search-range", action="append", default=[], metavar="NAME=LO,HI",
                       help="override one random-search range (repeatable): lr, init_scale (log-uniform), "
                            "alpha, lambda_min (kkt, uniform); e.g. lr=0.3,1. Default: the reference's ranges "
                            "(kkt: lr 1e-5..1, init_scale 1e-6..0.1, alpha 10..500, lambda_min 0.01..0.5)")
    else:
        p.add_argument("--n-inits", type=int, default=16, help="number of initialisations K (default 16)")
        p.add_argument("--pool", type=int, default=0, help="pool the candidates of the best P runs")
    p.add_argument("--steps", type=int, default=None, help="outer steps (default: bilevel 1000, kkt 5000)")
    p.add_argument("--lr", default=None, help="learning rate (kkt: on x), or a comma list to sweep "
                                              "(default: bilevel 0.01, kkt 0.01)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default: bilevel adam, kkt sgd")
    p.add_argument("--momentum", type=float, default=0.9, help="sgd momentum")
    b = p.add_argument_group("bilevel")
    b.add_argument("--outer-loss", choices=bilevel.OUTER_LOSSES, default="l2",
                   help="l2: ||theta - theta*||^2 / ||theta*||^2 (default); cosine: 1 - cos(theta, theta*)")
    b.add_argument("--box", choices=bilevel.BOX_MODES, default="none",
                   help="box prior on mean-subtracted pixels (bounds --box-bounds)")
    b.add_argument("--box-bounds", default="-1,1", help="lo,hi (default -1,1)")
    b.add_argument("--box-weight", default=None, help="box penalty weight (or a comma list; bilevel default 0, "
                                                      "kkt default 1, a single value)")
    b.add_argument("--tv-weight", default="0", help="weight of total variation (or a comma list)")
    b.add_argument("--backend", choices=tuple(BACKENDS), default="jaxopt", help="inner solver backend")
    b.add_argument("--inner-tol", type=float, default=None,
                   help="inner ||grad L|| tolerance (default by dtype: 1e-10 float64, 1e-6 float32)")
    b.add_argument("--inner-maxiter", type=int, default=500)
    b.add_argument("--cg-ridge", type=float, default=1e-10)
    b.add_argument("--cg-maxiter", type=int, default=200)
    b.add_argument("--cg-tol", type=float, default=None,
                   help="relative CG tolerance (default by dtype: 1e-10 float64, 1e-6 float32)")
    b.add_argument("--warm-start", choices=bilevel.WARM_STARTS, default="previous",
                   help="implicit engine: start each inner solve from the previous step's solution (default) or theta*")
    b.add_argument("--engine", choices=ENGINES, default="auto",
                   help="amortized: theta and the adjoint carried across steps, fixed Newton-CG and "
                        "adjoint-CG budgets, exact refresh every --refresh-every steps; implicit: L-BFGS to "
                        "--inner-tol and jaxopt implicit differentiation at every step (the reference); auto "
                        "(default): amortized")
    b.add_argument("--newton-steps", type=int, default=1, help="amortized: Newton steps per outer step (default 1)")
    defaults = bilevel.BilevelConfig()
    b.add_argument("--newton-cg", type=int, default=defaults.newton_cg,
                   help=f"amortized: CG iterations per Newton step (default {defaults.newton_cg})")
    b.add_argument("--adjoint-cg", type=int, default=defaults.adjoint_cg,
                   help=f"amortized: adjoint CG iterations per step (default {defaults.adjoint_cg})")
    b.add_argument("--adjoint-hessian", choices=bilevel.ADJOINT_HESSIANS, default="updated",
                   help="amortized: adjoint at the Newton-updated theta (default), or solved with the Newton step "
                        "as one block CG on one shared linearisation (cheaper, less exact; uses --newton-cg)")
    b.add_argument("--adjoint-solver", choices=bilevel.ADJOINT_SOLVERS, default=defaults.adjoint_solver,
                   help="amortized: the adjoint's solver, per step and at the refresh: cg, minres (symmetric "
                        "indefinite H), or auto (default: cg for affine victims, minres with hidden layers)")
    b.add_argument("--refresh-solver", choices=bilevel.REFRESH_SOLVERS, default=defaults.refresh_solver,
                   help="amortized: the accurate inner solve at a refresh and at the end: newton (fixed-budget "
                        "Newton-CG steps), lbfgs (L-BFGS with a fixed-length line search, at most --inner-maxiter "
                        "iterations), both batch-friendly; jaxopt (jaxopt's L-BFGS, nested loops); or auto "
                        "(default: newton for affine victims, lbfgs with hidden layers)")
    b.add_argument("--refresh-cg", type=int, default=defaults.refresh_cg,
                   help=f"amortized, newton refresh: CG iterations per Newton step (default {defaults.refresh_cg})")
    b.add_argument("--product-precision", choices=bilevel.PRODUCT_PRECISIONS, default=defaults.product_precision,
                   help=f"amortized: precision of the Hessian products and the cross-term VJP of a float64 run "
                        f"(gradients, CG recurrences and the update stay float64; default {defaults.product_precision})")
    b.add_argument("--refresh-every", type=int, default=100,
                   help="amortized: exact inner and adjoint solve every N steps (and at step 0; 0: step 0 only)")
    b.add_argument("--schedule", choices=SCHEDULES, default="plateau",
                   help="learning-rate schedule: plateau (default: warm-up, then halve after 20 steps without "
                        "improvement on the best objective since the warm-up), cosine (warm-up, cosine decay to 1%%) or constant")
    b.add_argument("--warmup-steps", type=int, default=20, help="linear learning-rate warm-up steps (default 20)")
    k = p.add_argument_group("kkt")
    k.add_argument("--task", choices=kkt.TASKS, default=None,
                   help="default from the victim: logistic->binary, mse->regression, ce->multiclass without weight "
                        "decay and regression with it (the form that holds exactly at its stationary point)")
    k.add_argument("--stationarity", choices=kkt.STATIONARITY, default="global",
                   help="global: sum over tensors of ||theta*_t - G_t||^2 (the reference); per_tensor: relative")
    k.add_argument("--lr-lambda", type=float, default=1e-4, help="learning rate on lambda (reference 1e-4)")
    k.add_argument("--alpha", default="300", help="modified-ReLU sharpness (relu victims), or a comma list")
    k.add_argument("--lambda-min", default="0.05", help="lambda lower bound, or a comma list")
    k.add_argument("--lambda-weight", type=float, default=5.0, help="weight of the lambda >= lambda_min hinge")
    k.add_argument("--kkt-box", choices=kkt.BOXES, default="centered",
                   help="box of the prior: centered = [-1,1] on mean-subtracted pixels (the reference); pixel = "
                        "candidate + training mean in [0,1] (needs the victim's released preprocessing.npz)")
    k.add_argument("--n-candidates", type=int, default=None, help="m candidates (default 2N)")
    p.add_argument("--chunk-size", type=int, default=None, help="runs per compiled batch (default: from free memory)")
    p.add_argument("--devices", type=int, default=None,
                   help="shard each batch over this many local devices (default: all)")
    p.add_argument("--segment", type=int, default=100, help="steps between resumable checkpoints")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (theta* is cast to it). Default: bilevel the victim's; kkt float32, "
                        "which benchmarks/precision.py measured safe for it (--dtype float64 to keep float64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.set_defaults(func=_run_attack, sweep=sweep)


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct training images from a victim's released weights",
                       description="Run K initialisations (x a hyperparameter grid) of the bilevel or KKT attack "
                                   "as one vmapped, chunked, resumable program; write reconstructions.npz, "
                                   "history.npz and run.json.")
    _add_attack_args(p, sweep=False)


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="random hyperparameter search as one vmapped program, best runs pooled",
                       description="Draw R configurations as in the reference (kkt: lr log-U[1e-5,1], init scale "
                                   "log-U[1e-6,0.1], alpha U[10,500], lambda_min U[0.01,0.5]; bilevel: lr "
                                   "log-U[1e-3,1e-1], init scale log-U[1e-3,0.3]) x seeds, run them in one "
                                   "program, rank by final loss and pool the best runs' candidates.")
    _add_attack_args(p, sweep=True)


def _run_attack(args) -> int:
    from recon_jax import bilevel, kkt, reconstruct
    from recon_jax.artifacts import read_json
    from recon_jax.attack import descriptor
    from recon_jax.problems import default_kkt_task
    from recon_jax.precision import enable_float64
    from recon_jax.solvers import InnerConfig

    victim_meta = Path(args.victim) / "victim.json"
    meta = read_json(victim_meta) if victim_meta.is_file() else None
    victim_dtype = meta["train_config"]["dtype"] if meta else "float64"
    dtype = args.dtype or descriptor(args.method).default_dtype or victim_dtype  # as reconstruct() resolves it
    if dtype == "float64":
        enable_float64()
    try:
        lo, hi = (float(t) for t in args.box_bounds.split(","))
    except ValueError as err:
        raise ReconJaxError(f"--box-bounds takes lo,hi, got {args.box_bounds!r}") from err
    bilevel_method = args.method == "bilevel"
    steps = args.steps if args.steps is not None else (1000 if bilevel_method else 5000)
    optimizer = args.optimizer or ("adam" if bilevel_method else "sgd")
    box_weight = _floats(args.box_weight or ("0" if bilevel_method else "1"), "--box-weight")
    # Tolerances not given stay None: the library resolves them from the run's dtype
    # (recon_jax.precision.default_tolerances), as for any library caller.
    inner = InnerConfig(backend=args.backend, tol=args.inner_tol, maxiter=args.inner_maxiter,
                        cg_ridge=args.cg_ridge, cg_maxiter=args.cg_maxiter, cg_tol=args.cg_tol)
    bilevel_config = bilevel.BilevelConfig(steps=steps, outer_loss=args.outer_loss, optimizer=optimizer,
                                           momentum=args.momentum, box=args.box, box_bounds=(lo, hi),
                                           warm_start=args.warm_start, inner=inner, engine=args.engine,
                                           newton_steps=args.newton_steps, newton_cg=args.newton_cg,
                                           adjoint_cg=args.adjoint_cg, adjoint_hessian=args.adjoint_hessian,
                                           adjoint_solver=args.adjoint_solver,
                                           refresh_solver=args.refresh_solver, refresh_cg=args.refresh_cg,
                                           product_precision=args.product_precision,
                                           refresh_every=args.refresh_every,
                                           schedule=args.schedule, warmup_steps=args.warmup_steps)
    kkt_config = None
    if not bilevel_method:
        if isinstance(box_weight, tuple):
            raise ReconJaxError("--box-weight takes a single value with --method kkt")
        task = args.task or (default_kkt_task(meta["train_config"]["loss"], meta["train_config"]["weight_decay"])
                             if meta else "binary")
        kkt_config = kkt.KKTConfig(steps=steps, task=task, stationarity=args.stationarity, optimizer=optimizer,
                                   momentum=args.momentum, box_weight=box_weight, lambda_weight=args.lambda_weight,
                                   box=args.kkt_box)
    spec = reconstruct.ReconstructionSpec(
        method=args.method, init=args.init, n_inits=args.seeds if args.sweep else args.n_inits, seed=args.seed,
        learning_rate=_floats(args.lr or "0.01", "--lr"),
        box_weight=box_weight if bilevel_method else 0.0, tv_weight=_floats(args.tv_weight, "--tv-weight"),
        lr_lambda=args.lr_lambda, alpha=_floats(args.alpha, "--alpha"),
        lambda_min=_floats(args.lambda_min, "--lambda-min"), n_candidates=args.n_candidates,
        random_search=args.runs if args.sweep else None,
        search_ranges=_search_ranges(args.search_range) if args.sweep else None, pool=args.pool, chunk_size=args.chunk_size,
        segment=args.segment, dtype=args.dtype, bilevel=bilevel_config, kkt=kkt_config, devices=args.devices)
    summary = reconstruct.reconstruct(
        args.victim, args.out, spec, overwrite=args.overwrite,
        progress=lambda done, total: log.info("step %d / %d", done, total))
    losses = np.asarray(summary["final_outer_loss"], dtype=float)
    print(json.dumps({summary["final_loss_name"]: {"min": float(np.nanmin(losses)),
                                                    "median": float(np.nanmedian(losses)),
                                                    "max": float(np.nanmax(losses))},
                      "runs": summary["n_runs"], "best_runs": summary["ranking"][:5],
                      "diverged": int(np.sum(summary["diverged"])), "seconds": summary["seconds"]}, indent=2))
    print(f"wrote {args.out}")
    return 0


def _search_ranges(items: list[str]) -> dict | None:
    """["lr=0.3,1", "alpha=50,500"] -> {"lr": (0.3, 1.0), "alpha": (50.0, 500.0)}; None if empty."""
    ranges = {}
    for item in items:
        name, sep, bounds = item.partition("=")
        try:
            lo, hi = (float(t) for t in bounds.split(","))
        except ValueError as err:
            raise ReconJaxError(f"--search-range takes NAME=LO,HI (e.g. lr=0.3,1), got {item!r}") from err
        if not sep or not name:
            raise ReconJaxError(f"--search-range takes NAME=LO,HI (e.g. lr=0.3,1), got {item!r}")
        ranges[name.strip()] = (lo, hi)
    return ranges or None


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="judge a run against the training set and the held-out pool",
                       description="The evaluation protocol of Haim et al. 2022 / Buzaglo et al. 2023 (NCC nearest "
                                   "neighbours on x1/2 bicubic images, or plain L2 for MNIST; SSIM 3x3, PSNR, MSE, "
                                   "Hungarian matching, good counts) against the training set AND the held-out "
                                   "pool, plus membership AUC; writes evaluation.json and evaluation.npz.")
    p.add_argument("--run", required=True, help="run folder written by `recon-jax reconstruct` or `sweep`")
    p.add_argument("--victim", default=None, help="victim folder (default: the one the run used)")
    p.add_argument("--pooled", action="store_true", help="evaluate pooled.npz instead of all runs' candidates")
    p.add_argument("--pool-by-score", type=int, default=0, metavar="P",
                   help="rank runs by the reference's extraction score (mean DSSIM of the 10 best-matched training "
                        "images: an oracle, it reads the training set), write the best P runs' candidates to "
                        "pooled_by_score.npz and judge that pool too")
    p.add_argument("--plain-l2", action="store_true", help="nearest neighbours by plain L2 (e.g. MNIST)")
    p.add_argument("--good-threshold", type=float, default=0.4)
    p.add_argument("--no-best-ssim", action="store_true", help="skip the all-pairs SSIM (slow on CPU)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from recon_jax.evaluation import evaluate_run

    summary = evaluate_run(args.run, victim_dir=args.victim, pooled=args.pooled, plain_l2=args.plain_l2,
                           good_threshold=args.good_threshold, best_ssim=not args.no_best_ssim,
                           pool_by_score=args.pool_by_score)
    print(json.dumps(summary, indent=2))
    return 0


def _floats(text: str, flag: str) -> float | tuple[float, ...]:
    """"0.01" -> 0.01; "0.01,0.1" -> (0.01, 0.1): a list sweeps the value in one vmapped program."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError as err:
        raise ReconJaxError(f"{flag} takes a number or a comma-separated list, got {text!r}") from err
    return values[0] if len(values) == 1 else values


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run an initialisation study: victims x methods x inits x seeds",
                       description="Run a grid of reconstruction cells (victims x methods x initialisations x "
                                   "seeds), each a vmapped, chunked program, judged against the training set and "
                                   "the held-out pool; write results.json, summary.csv, figures/*.png and "
                                   "report.md. Rerunning with the same --out skips finished cells. With no "
                                   "--config, runs the default study on the embedded digits (offline, minutes).")
    p.add_argument("--config", default=None, help="study file (.toml or .json), e.g. experiments/c1_init_distance.toml "
                                                  "(default: the built-in default study)")
    p.add_argument("--dataset", default=None, help="override the config's dataset, e.g. cifar10 (the study name "
                                                   "gets -DATASET appended)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set methods.bilevel.steps=100 "
                        "--set n_inits=2 (TOML values; repeatable)")
    p.add_argument("--victims", default=None, metavar="NAME[,NAME]",
                   help="run only these [victims.NAME] tables of the config, e.g. affine,control "
                        "(the same cells as in the whole grid; --extend adds the rest later)")
    p.add_argument("--methods", default=None, metavar="NAME[,NAME]",
                   help="run only these [methods.NAME] tables of the config, e.g. bilevel")
    p.add_argument("--out", default=None, help="study folder (default: runs/NAME)")
    p.add_argument("--no-figures", action="store_true", help="skip figures and report.md")
    p.add_argument("--extend", action="store_true",
                   help="accept a changed config in an existing --out: finished cells whose settings are "
                        "unchanged are reused, the rest run")
    p.add_argument("--print-config", action="store_true", help="print the validated config as JSON and exit")
    p.add_argument("--devices", type=int, default=None,
                   help="shard each cell's batch over this many local devices (default: all)")
    h = p.add_argument_group("multi-host (jax.distributed; --out must be on a filesystem every process sees)")
    h.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (or $RECON_JAX_COORDINATOR)")
    h.add_argument("--num-processes", type=int, default=None, help="process count (or $RECON_JAX_NUM_PROCESSES)")
    h.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1 (or $RECON_JAX_PROCESS_ID)")
    h.add_argument("--distributed", choices=("off", "auto"), default="off",
                   help="auto: let jax.distributed detect the cluster (SLURM, Open MPI, TPU pods, ...)")
    p.set_defaults(func=_run_study)


def _run_study(args) -> int:
    from recon_jax import distributed, study, studyconfig
    from recon_jax.precision import enable_float64

    distributed.resolve(args.coordinator, args.num_processes, args.process_id)  # fail fast, before any work
    raw = studyconfig.read_raw(args.config) if args.config else studyconfig.DEFAULT_STUDY
    raw = studyconfig.apply_overrides(raw, args.set)
    raw = studyconfig.select_tables(studyconfig.select_tables(raw, "victims", args.victims), "methods", args.methods)
    if studyconfig.needs_float64(raw):
        enable_float64()
    name = raw.get("name", Path(args.config).stem if args.config else "study")
    config = studyconfig.config_from_dict(raw, name=name, dataset=args.dataset)
    if args.print_config:
        print(json.dumps(config.to_json(), indent=2))
        return 0
    out = Path(args.out or Path("runs") / config.name)
    ctx = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                 auto=args.distributed == "auto")
    prefix = f"[process {ctx.process_index}/{ctx.process_count}] " if ctx.process_count > 1 else ""
    results = study.run_study(config, out, process_index=ctx.process_index, process_count=ctx.process_count,
                              barrier=ctx.barrier, echo=lambda line: print(prefix + line, file=sys.stderr, flush=True),
                              report=not args.no_figures, extend=args.extend, devices=args.devices)
    if ctx.is_main:
        print(f"{len(results)} cells; wrote {out / 'summary.csv'}" + ("" if args.no_figures else
                                                                       f" and {out / 'report.md'}"))
    return 0


def _add_identifiability(sub) -> None:
    p = sub.add_parser("identifiability", help="membership AUC against unknowns per parameter of a finished study",
                       description="For every victim x method x init of a finished study: the membership AUC with a "
                                   "percentile bootstrap interval over initialisations and seeds, against N*D/P; per "
                                   "method x architecture curve, the ratio at which the AUC falls through 0.75. "
                                   "Writes identifiability.csv, transitions.csv, identifiability.md and figures/.")
    p.add_argument("--study", required=True, action="append",
                   help="a finished study folder (runs/NAME, with results.json); repeat it to pool the points of "
                        "several studies of one dataset into one map (then --out is required)")
    p.add_argument("--out", default=None, help="output folder (default: STUDY/identifiability for one study)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples B (default 1000)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--threshold", type=float, default=0.75, help="AUC at which the transition is read (default 0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--swap", action="store_true",
                   help="add the swap test: membership AUC from the attack's own objective when a candidate image "
                        "replaces a reconstruction of its class (recon_jax.swap; one objective evaluation per "
                        "candidate and slot of its class, cached per cell)")
    p.add_argument("--swap-batch", type=int, default=None,
                   help="swapped sets per vmapped evaluation (default 32; lower it to bound memory)")
    p.set_defaults(func=_run_identifiability)


def _run_identifiability(args) -> int:
    from recon_jax.identifiability import write_identifiability
    from recon_jax.precision import enable_float64

    from recon_jax import studyconfig
    from recon_jax.artifacts import read_json

    config_files = [Path(study) / "config.json" for study in args.study]
    if args.swap and any(f.is_file() and studyconfig.needs_float64(read_json(f)) for f in config_files):
        enable_float64()  # the swap test loads the study's victims, in their dtype, as `recon-jax study` did
    result = write_identifiability(args.study, args.out, n_resamples=args.resamples, level=args.level, seed=args.seed,
                                   threshold=args.threshold, draw=not args.no_figures, swap=args.swap,
                                   swap_batch=args.swap_batch)
    for row in result["transitions"]:
        interval = f"[{row['transition_low']:.3g}, {row['transition_high']:.3g}]"
        print(f"{row['method']} {row['arch']} {row['init']} wd {row['weight_decay']:g}: transition N*D/P = "
              f"{row['transition']:.3g} {interval}" + (f" ({row['note']})" if row["note"] else ""))
    print(f"{len(result['points'])} points; wrote {result['out'] / 'identifiability.csv'}, "
          f"{result['out'] / 'transitions.csv'}" + (f" and {len(result['figures'])} figures" if result["figures"] else ""))
    return 0


def _add_datasets(sub) -> None:
    p = sub.add_parser("datasets", help="show the dataset lookup order and what is found here")
    p.add_argument("--data-dir", default=None, help="a prepared TFDS data_dir to include")
    p.set_defaults(func=_run_datasets)


def _run_datasets(args) -> int:
    from recon_jax import data

    print(data.describe_lookup(data_dir=args.data_dir))
    return 0


def enable_compilation_cache() -> None:
    """Keep XLA's compiled programs between runs (``$RECON_JAX_JAX_CACHE``, default
    ``~/.cache/recon_jax/jax``; set it to an empty string to disable): a resumed or
    repeated run then skips most compilation, which dominates short CPU runs."""
    import os

    import jax

    path = os.environ.get("RECON_JAX_JAX_CACHE", str(Path.home() / ".cache" / "recon_jax" / "jax"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recon-jax", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_reconstruct(sub)
    _add_sweep(sub)
    _add_evaluate(sub)
    _add_study(sub)
    _add_identifiability(sub)
    _add_datasets(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    enable_compilation_cache()
    try:
        return int(args.func(args) or 0)
    except ReconJaxError as err:
        print(f"recon-jax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
