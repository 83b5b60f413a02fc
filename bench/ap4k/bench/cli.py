"""`ap4k bench`: the end-to-end benchmark (see run.py for what it measures).

`ap4k bench autoscale` replays carrier scaling in simulated time (see autoscale.py).
"""

from __future__ import annotations

import argparse
import sys


def stage_list(text: str) -> tuple[str, ...]:
    """`--only raw,enqueue`: known stage names, in the order given; refuses any other."""
    from ap4k.bench.run import STAGES

    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        what = f"unknown stage(s) {', '.join(map(repr, unknown))}" if unknown else "no stage"
        raise argparse.ArgumentTypeError(f"{what}; the stages are {', '.join(STAGES)}")
    return names


def count_list(text: str) -> list[int]:
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected carrier counts such as 1 or 1,2,4")
    return counts


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of at least 1")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="run the end-to-end benchmark on 127.0.0.1",
        description="`ap4k bench`: the end-to-end benchmark on 127.0.0.1, every figure beside "
        "its bound measured in the same run, with the ratio and a met/missed mark against the "
        "targets. `ap4k bench autoscale`: carrier scaling (ap4k's policy beside KEDA + HPA) "
        "replayed on load traces in simulated time (no server needed; deterministic for a seed).",
    )
    bench.add_argument("what", nargs="?", choices=["autoscale"], help="autoscale: see above")
    bench.add_argument("--seed", type=int, default=1, help="autoscale: the traces' random seed")
    bench.add_argument(
        "--hours", type=float, default=2.0, help="autoscale: simulated hours per trace"
    )
    bench.add_argument("--json", action="store_true", help="print the whole report as JSON")
    bench.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    bench.add_argument("--dispatchers", type=positive, default=32)
    bench.add_argument("--workers", type=positive, default=1, help="`ap4k serve --workers`")
    bench.add_argument(
        "--carrier-workers", type=positive, default=1, help="`ap4k carrier --workers`"
    )
    bench.add_argument(
        "--backlog", type=positive, default=1_000_000, help="messages of backlog (backlog stage)"
    )
    bench.add_argument(
        "--carriers",
        type=count_list,
        default=[1],
        help="carrier counts to measure in the carriers stage, e.g. 1,2 (default 1)",
    )
    bench.add_argument(
        "--only",
        type=stage_list,
        default=None,
        help="comma list of stages: raw,enqueue,delivery,latency,backlog,carriers,outbox,flow,"
        "soak (default: all but outbox, flow and soak)",
    )
    bench.add_argument(
        "--soak-seconds", type=positive, default=600, help="soak: how long (default 600)"
    )
    bench.add_argument(
        "--soak-rate", type=positive, default=500, help="soak: messages per second (default 500)"
    )
    bench.add_argument("--outbox", action="store_true", help="add the outbox stage")
    bench.add_argument(
        "--profile",
        action="store_true",
        help="py-spy records the server through each stage (kept in the work directory)",
    )
    bench.add_argument("--keep", action="store_true", help="keep the work directory")
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.what == "autoscale":
        from ap4k.bench import autoscale

        print(autoscale.main(seed=args.seed, hours=args.hours))
        return 0
    import asyncio
    import json
    import signal
    from dataclasses import asdict

    from ap4k.bench.run import DEFAULT_STAGES, Bench, BenchOptions, Report, render
    from ap4k.core.logs import run_async

    options = BenchOptions(
        quick=args.quick,
        dispatchers=args.dispatchers,
        workers=args.workers,
        carrier_workers=args.carrier_workers,
        backlog=args.backlog,
        carriers=args.carriers,
        soak_rate=args.soak_rate,
        soak_seconds=float(args.soak_seconds),
        keep=args.keep or args.profile,
        profile=args.profile,
    ).scaled()
    bench = Bench(options)
    reports: list[Report] = []

    async def main() -> None:
        # SIGTERM ends the run as Ctrl-C does: the stage is cancelled and everything stopped.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        stages = args.only or DEFAULT_STAGES
        if args.outbox and "outbox" not in stages:
            stages = (*stages, "outbox")
        reports.append(await bench.run(stages))

    try:
        run_async(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        bench.report.interrupted = True
        print("ap4k bench: interrupted; the processes it started are stopped", file=sys.stderr)
        if bench.report.figures:
            print(render(bench.report), file=sys.stderr)
        return 130
    report = reports[0]
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(render(report))
    return 0
