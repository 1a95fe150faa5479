"""CG and LiSSA at equal agreement: ours against pyDVL's, each swept over its accuracy setting,
timed fairly (benchmarks/fair.py), and the time each needs to reach a given agreement with the
dense reference.

digits-mlp, ``--test-points`` test x all 1,437 training points, damping 0.01, reference our
``exact`` (dense Hessian solve, Pearson 1 with pyDVL's direct solver). Every setting is timed
for fit + scores at 1 and 2 threads in ``--rounds`` alternating rounds; each side's time at a
setting is its median at its faster thread count.

- CG: the relative-residual tolerance, ours ``tol`` and pyDVL's ``rtol`` over ``--cg-tols``.
  pyDVL gets its best setting: one loader batch of all training points, since its Hessian
  operator averages batch means with equal weights (a defect that, with batches of 512, puts a
  floor of about 5e-2 under its relative error).
- LiSSA: the recursion's depth over ``--lissa-depths``, the same recursion on both sides
  (damping 0.01, our fitted scale, one minibatch of 512 per step; pyDVL cycles through its
  loader's batches of 512, ours draws seeded minibatches).

Prints a table per method (setting, seconds, Pearson and relative error against ``exact``), the
time each side needs to reach each agreement of ``--targets`` (relative error; the fastest
setting that reaches it), and writes ``equal-agreement.png``/``.pdf``/``.csv`` to ``--out``.
Needs the peers environment:

    .peers-venv/bin/python -m benchmarks.equal_agreement [--rounds 2] [--out figures]
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path

import torch

from benchmarks.fair import Timings, agreement, alternate, machine
from fidelity.estimators import ESTIMATORS
from fidelity.problems import load_problem
from fidelity.retrain import train

DAMPING = 0.01
MINIBATCH = 512
FLOATS = ("setting", "seconds", "pearson", "relative_error")


def main() -> None:
    from fidelity.estimators.external.pydvl import PydvlEstimator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--test-points", type=int, default=50)
    parser.add_argument("--cg-tols", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-6])
    parser.add_argument("--lissa-depths", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4])
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--replot", type=Path, help="draw the figure of a written CSV only")
    args = parser.parse_args()
    if args.replot:
        with args.replot.open() as handle:
            rows = [
                {**row, **{key: float(row[key]) for key in FLOATS}}
                for row in csv.DictReader(handle)
            ]
        write(rows, args.out)
        return
    trained = train(load_problem("digits-mlp"))
    problem = trained.problem
    train_set, test = problem.train, problem.test.subset(torch.arange(args.test_points))
    reference = ESTIMATORS.get("exact")(damping=DAMPING).fit(trained).scores(test, train_set)
    scale = ESTIMATORS.get("lissa")(damping=DAMPING).fit(trained).diagnostics["scale"]
    print(
        f"digits-mlp: {args.test_points} test x {problem.n_train} train, damping {DAMPING}, "
        f"{args.rounds} alternating rounds at 1 and 2 threads; {machine()}"
    )

    def run(estimator):
        def call():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return estimator.fit(trained).scores(test, train_set)

        return call

    cg, lissa = ESTIMATORS.get("cg"), ESTIMATORS.get("lissa")
    contenders = {}
    for tol in args.cg_tols:
        contenders[("cg", "fidelity", tol)] = run(cg(damping=DAMPING, tol=tol))
        contenders[("cg", "pyDVL", tol)] = run(
            PydvlEstimator(solver="cg", damping=DAMPING, tol=tol, batch_size=problem.n_train)
        )
    for depth in args.lissa_depths:
        contenders[("lissa", "fidelity", depth)] = run(
            lissa(damping=DAMPING, scale=scale, depth=depth, minibatch_size=MINIBATCH)
        )
        contenders[("lissa", "pyDVL", depth)] = run(
            PydvlEstimator(
                solver="lissa", damping=DAMPING, scale=scale, depth=depth, batch_size=MINIBATCH
            )
        )
    # alternate over the sides at each setting, so both sides of a row see the same load
    timings = Timings()
    for method, _, setting in dict.fromkeys((m, None, s) for m, _, s in contenders):
        pair = {
            f"{method} {side} {setting:g}": contenders[(method, side, setting)]
            for side in ("fidelity", "pyDVL")
        }
        alternate(pair, args.rounds, timings=timings)
    timings.print()
    print(f"after: {machine()}")

    rows = []
    for method, side, setting in contenders:
        name = f"{method} {side} {setting:g}"
        threads, seconds = timings.best(name)
        r, error = agreement(timings.outputs[name], reference)
        rows.append(
            {
                "method": method,
                "side": side,
                "setting": setting,
                "threads": threads,
                "seconds": seconds,
                "pearson": r,
                "relative_error": error,
            }
        )
    for method, knob in (("cg", "tol"), ("lissa", "depth")):
        print(f"\n{method} ({knob}): median seconds at the best thread count, agreement with exact")
        print(
            f"  {'side':<9} {knob:>7} {'threads':>7} {'seconds':>8} {'pearson':>10} {'rel.err':>9}"
        )
        for row in (row for row in rows if row["method"] == method):
            print(
                f"  {row['side']:<9} {row['setting']:>7g} {row['threads']:>7} "
                f"{row['seconds']:>8.2f} {row['pearson']:>10.6f} {row['relative_error']:>9.2e}"
            )
        print("  time to reach a relative error (fastest setting that reaches it):")
        for target in args.targets:
            cells = []
            for side in ("fidelity", "pyDVL"):
                reached = [
                    row
                    for row in rows
                    if row["method"] == method
                    and row["side"] == side
                    and row["relative_error"] <= target
                ]
                best = min(reached, key=lambda row: row["seconds"], default=None)
                cells.append(
                    "not reached"
                    if best is None
                    else f"{best['seconds']:.2f} s ({knob} {best['setting']:g})"
                )
            print(f"    <= {target:g}: fidelity {cells[0]}, pyDVL {cells[1]}")
    write(rows, args.out)


def write(rows: list[dict], out: Path) -> None:
    import matplotlib

    from fidelity.reports.format import PRINT_READY, log_axis

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with (out / "equal-agreement.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with plt.rc_context(PRINT_READY):
        figure, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
        for axis, method, knob in zip(axes, ("cg", "lissa"), ("tol", "depth"), strict=True):
            for side, marker in (("fidelity", "o"), ("pyDVL", "s")):
                mine = sorted(
                    (row for row in rows if row["method"] == method and row["side"] == side),
                    key=lambda row: row["seconds"],
                )
                seconds = [row["seconds"] for row in mine]
                errors = [max(row["relative_error"], 1e-16) for row in mine]
                axis.plot(seconds, errors, marker=marker, label=side)
                for row, x, y in zip(mine, seconds, errors, strict=True):
                    axis.annotate(
                        f"{row['setting']:g}",
                        (x, y),
                        fontsize=6,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
            spent = [row["seconds"] for row in rows if row["method"] == method]
            nice = [0.1, 0.2, 0.3, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100, 200]
            at = [v for v in nice if min(spent) / 1.5 <= v <= max(spent) * 1.5]
            log_axis(axis, "x", at=at or None)
            errors_all = [
                max(row["relative_error"], 1e-16) for row in rows if row["method"] == method
            ]
            if max(errors_all) / min(errors_all) < 100:  # within two decades: label 1-2-5 steps
                steps = [m * 10.0**e for e in range(-16, 1) for m in (1, 2, 5)]
                log_axis(
                    axis,
                    "y",
                    at=[v for v in steps if min(errors_all) / 1.5 <= v <= max(errors_all) * 1.5],
                )
            else:
                log_axis(axis, "y", ticks=6)
            axis.set_xlabel("seconds (fit + scores, median)")
            axis.set_ylabel("relative error against exact")
            axis.set_title(f"{method.upper()} (labels: {knob})")
            axis.legend(fontsize=7)
        for suffix in ("png", "pdf"):
            figure.savefig(out / f"equal-agreement.{suffix}", dpi=200)
    print(f"wrote {out / 'equal-agreement.png'}")


if __name__ == "__main__":
    main()
