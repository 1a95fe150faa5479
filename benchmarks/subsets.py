"""Subset retrains per second: one vmapped group against one model at a time.

    python -m benchmarks.subsets [--problem digits-mlp] [--subsets 20] [--alpha 0.5]
                                 [--threads 2] [--rounds 2]
    python -m benchmarks.subsets --response --subsets 100 --seeds 5

Both sides train the same masks with the same recipe, without a cache, in alternating rounds,
torch pinned to ``--threads``; prints each round, the medians, the spread, the machine's load,
and the largest difference between the two sides' parameters (they must agree). ``--response``
instead times the whole `subsets` response once (``--seeds`` seeds, each with its full model
trained first, no cache).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fidelity.problems import load_problem
from fidelity.retrain import Execution, SubsetsResponse, train
from fidelity.retrain.subsets import draw_masks, retrain_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--response", action="store_true", help="time the whole response")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    trained = train(load_problem(args.problem))
    if args.response:
        response = SubsetsResponse(alphas=[args.alpha], subsets=args.subsets, seeds=args.seeds)
        start = time.perf_counter()
        result = response.compute(trained, trained.problem.test.subset(torch.arange(20)))
        seconds = time.perf_counter() - start
        print(
            f"{args.problem}: subsets response, {args.subsets} subsets x {result.info['seeds']} "
            f"seeds (alpha {args.alpha:g}, full models of the shifted seeds included), torch "
            f"threads {args.threads}: {seconds:.1f} s, load {os.getloadavg()[0]:.2f}"
        )
        return
    masks = torch.as_tensor(
        draw_masks(trained.problem.n_train, (args.alpha,), args.subsets, seed=0),
        dtype=trained.problem.dtype,
    )
    retrain_masks(trained, masks[:2], Execution(), group_size=2)  # warm-up, untimed
    timings: dict[str, list[float]] = {"grouped": [], "one at a time": []}
    results = {}
    for round_ in range(args.rounds):
        for name, group_size in (("grouped", args.subsets), ("one at a time", 1)):
            start = time.perf_counter()
            refits = retrain_masks(trained, masks, Execution(), group_size=group_size)
            seconds = time.perf_counter() - start
            timings[name].append(seconds)
            results[name] = torch.stack([refits.thetas[i] for i in range(args.subsets)])
            print(
                f"round {round_ + 1} {name:>13}: {seconds:7.2f} s, "
                f"{args.subsets / seconds:6.2f} subset retrains/s, load {os.getloadavg()[0]:.2f}"
            )
    grouped, single = (statistics.median(timings[k]) for k in ("grouped", "one at a time"))
    spread = {k: max(v) - min(v) for k, v in timings.items()}
    difference = float((results["grouped"] - results["one at a time"]).abs().max())
    print(
        f"{args.problem}: {args.subsets} subsets (alpha {args.alpha:g}), torch threads "
        f"{args.threads}: grouped median {grouped:.2f} s (spread {spread['grouped']:.2f}), "
        f"one at a time {single:.2f} s (spread {spread['one at a time']:.2f}), "
        f"{single / grouped:.1f}x; max |parameter difference| {difference:.2e}"
    )


if __name__ == "__main__":
    main()
