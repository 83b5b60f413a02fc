"""`ap4k bench`: the end-to-end benchmark (see run.py for what it measures)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="run the end-to-end benchmark on 127.0.0.1",
        description="`ap4k bench`: the end-to-end benchmark on 127.0.0.1. "
        "`ap4k bench autoscale`: carrier scaling (ap4k's policy beside KEDA + HPA) replayed on "
        "load traces in simulated time (no server needed; deterministic for a seed).",
    )
    bench.add_argument("what", nargs="?", choices=["autoscale"], help="autoscale: see above")
    bench.add_argument("--seed", type=int, default=1, help="autoscale: the traces' random seed")
    bench.add_argument(
        "--hours", type=float, default=2.0, help="autoscale: simulated hours per trace"
    )
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    bench.add_argument("--dispatchers", type=int, default=32)
    bench.add_argument(
        "--backlog", type=int, default=1_000_000, help="messages of backlog for the backlog figure"
    )
    bench.add_argument(
        "--carriers", default="", help="comma list of carrier counts to measure, e.g. 1,2,4"
    )
    bench.add_argument("--outbox", action="store_true", help="measure the outbox forwarder")
    bench.add_argument(
        "--only", default="", help="comma list of stages: raw,enqueue,delivery,latency,backlog"
    )
    bench.add_argument("--keep", action="store_true", help="keep the work directory")
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.what == "autoscale":
        from ap4k.bench import autoscale

        print(autoscale.main(seed=args.seed, hours=args.hours))
        return 0
    import json
    from dataclasses import asdict

    from ap4k.bench.run import Bench, BenchOptions, Figure, render
    from ap4k.core.logs import run_async

    options = BenchOptions(
        quick=args.quick,
        dispatchers=args.dispatchers,
        backlog=args.backlog,
        carriers=[int(c) for c in args.carriers.split(",") if c.strip()],
        outbox=args.outbox,
        keep=args.keep,
    ).scaled()
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    bench = Bench(options)
    figures: list[Figure] = []

    async def main() -> None:
        figures.extend(await bench.run(only))

    run_async(main())
    if args.json:
        print(json.dumps([asdict(f) for f in figures], indent=2))
    else:
        print(render(figures, options))
    return 0
