"""The ``datatrace`` command: ``methods``, ``settings``, ``questions``, ``groundtruth`` and ``bench``.

    datatrace --version                     # also: python -m datatrace ...
    datatrace methods                       # method ids, one line each
    datatrace settings
    datatrace groundtruth --setting digits-mlp --m 50 --seeds 2 --workers 2
    datatrace groundtruth --verify          # retrain 3 subsets, compare with the stored values
    datatrace groundtruth --setting digits-mlp-short --protocol fixed-seed-drop:0.01 --m 100
    datatrace bench --setting digits-mlp --methods grad-cos,trak:proj_dim=1024 --json out/bench.json
    datatrace bench --methods trak,grad-cos --ensembles independent:4,dropout:4,lora:4
    datatrace bench --question scale:job=million --threads 1 --json out/scale_million.json

``--protocol`` chooses the ground truth (:mod:`datatrace.bench.protocols`): ``lds-half``
(the default: ``--m`` random subsets of fraction ``--alpha``, ``--seeds`` retrainings each)
or ``fixed-seed-drop:FRACTION`` (the seed-0 run replayed ``--m`` times, each without a random
FRACTION of its training examples); the bench's table header and JSON name it.

``bench`` reports, for every method, LDS on the test queries with a 95% bootstrap interval,
mislabel AUROC (settings that memorise flipped labels), LOO Pearson (convex settings) and its
cost (fit and attribute seconds, peak memory in its own process, bytes stored), beside a
random-score baseline, the noise ceiling and the training-loss ranking (DESIGN.md §9); see
:mod:`datatrace.bench.benchmark`. Hyperparameters come from a small documented grid and are
chosen on the validation queries, unless options are given (``method:key=value:key=value``).
``--ensembles`` runs every method once more per ensemble (``kind:K[:key=value...]``; see
:mod:`datatrace.bench.ensembles`), with the cost of the whole ensemble: training seconds of
every training it needs, serving seconds (fit + attribute) and member weight bytes.
``--question NAME[:key=value...]`` runs one of the registered speed, scale, store, group and
precision questions instead (:mod:`datatrace.bench.questions`; ``datatrace questions`` lists
them with their options): it prints its table, and ``--json`` gets what it measured.

Output: the results (tables, listings) are the product and go to stdout; errors go to stderr
as ``datatrace: error: ...``; progress bars to stderr (``--quiet`` or ``DATATRACE_PROGRESS=0``
turns them off); ``--verbose`` shows the library's log (the ``datatrace`` logger) on stderr.

``groundtruth`` also runs under ``torchrun`` (DESIGN.md §6); the command then initialises the
process group itself (gloo on CPU, nccl where CUDA is available; ``--dist-backend`` chooses),
each rank retrains a contiguous slice of the missing subsets, and only rank 0 prints::

    torchrun --standalone --nproc-per-node 4 -m datatrace.cli groundtruth --subsets 50 --workers 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from datatrace import __version__
from datatrace.bench.benchmark import DEFAULT_GRIDS, DEFAULT_METHODS, DEFAULT_TASKS
from datatrace.bench.report import print_table
from datatrace.cli_specs import describe_methods, parse_methods, parse_question
from datatrace.errors import ConfigError, DatatraceError

__all__ = [
    "DEFAULT_GRIDS",
    "DEFAULT_METHODS",
    "describe_methods",
    "main",
    "parse_methods",
    "print_table",
]

# Ranks that finish their slice wait for the slowest one in the final barrier: allow long waits
# (a rank that dies makes torchrun stop the job anyway).
GROUP_TIMEOUT = timedelta(hours=24)


def _cmd_methods(_: argparse.Namespace) -> int:
    print("\n".join(describe_methods()))
    return 0


def _cmd_settings(_: argparse.Namespace) -> int:
    from datatrace.bench.settings import get_setting, list_settings

    for name in list_settings():
        setting = get_setting(name)
        doc = (type(setting).__doc__ or "").strip().splitlines()[0]
        print(f"{name:20s} {setting.n_train:6d} train  {doc}")
    return 0


def _cmd_questions(_: argparse.Namespace) -> int:
    from datatrace.bench.questions import describe_questions

    print("\n".join(describe_questions()))
    return 0


def _setting(args: argparse.Namespace) -> Any:
    from datatrace.bench.settings import get_setting

    return get_setting(args.setting, **({"size": args.size} if args.size else {}))


def _protocol(args: argparse.Namespace) -> Any:
    from datatrace.bench.protocols import parse_protocol

    return parse_protocol(args.protocol, m=args.m, alpha=args.alpha, seeds=args.seeds)


def _ground_truth(args: argparse.Namespace, setting: Any, spec: Any) -> Any:
    from datatrace.bench.protocols import ground_truth

    return ground_truth(
        setting, spec, cache_dir=args.cache, workers=args.workers, progress=not args.quiet
    )


def _cmd_groundtruth(args: argparse.Namespace) -> int:
    import torch

    if isinstance(args.threads, bool) or args.threads < 1:
        raise ConfigError(f"--threads must be an integer >= 1; got {args.threads}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # in-process retrainings (worker processes use 1)
    try:
        return _groundtruth(args)
    finally:
        torch.set_num_threads(previous)


def _groundtruth(args: argparse.Namespace) -> int:
    from datatrace.bench.protocols import DropSpec, protocol_name
    from datatrace.distributed import rank

    spec = _protocol(args)
    setting = _setting(args)
    speak = rank() == 0  # under torchrun every rank returns the result; rank 0 reports it
    if args.verify:
        from datatrace.bench.shipped import verify_ground_truth

        if isinstance(spec, DropSpec):
            raise ConfigError(
                f"--verify checks lds-half ground truth (shipped or cached); {spec.protocol} is "
                "a deterministic replay, rebuilt exactly by running without --verify in a new "
                "--cache directory."
            )
        result = verify_ground_truth(
            setting, spec, cache_dir=args.cache, n_subsets=args.verify_subsets
        )
        verdict = "match" if result.ok else "MISMATCH"
        if speak:
            print(
                f"{setting.name}: retrained {len(result.checked)} subsets: {verdict} (max |diff| "
                f"{result.max_abs_diff:.3g}, max |diff|/(1+|stored|) {result.max_rel_diff:.3g}, "
                f"tolerance {result.rtol:g})"
            )
        return 0 if result.ok else 1
    gt = _ground_truth(args, setting, spec)
    if speak and isinstance(spec, DropSpec):
        change = gt.changes.abs().mean().item()
        print(
            f"{setting.name}: {gt.subsets.shape[0]} drop sets of "
            f"{spec.n_dropped(setting.n_train)} examples (seed-0 run replayed), "
            f"{gt.targets.shape[1]} queries; mean |target change| {change:.3g} "
            f"[protocol {protocol_name(spec)}]"
        )
    elif speak:
        seeds = gt.per_seed.shape[1]
        ceiling = f"{gt.noise_ceiling().mean:.3f}" if seeds >= 2 else "— (needs --seeds 2 or more)"
        print(
            f"{setting.name}: {gt.subsets.shape[0]} subsets x {seeds} seeds, "
            f"{gt.targets.shape[1]} queries; noise ceiling {ceiling} [protocol lds-half]"
        )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from datatrace.bench.benchmark import BenchConfig, parse_tasks, run_benchmark
    from datatrace.bench.cache import LOOSpec
    from datatrace.bench.ensembles import parse_ensembles
    from datatrace.bench.mislabel import MislabelSpec

    if args.question is not None:
        return _question(args)
    methods = parse_methods(args.methods)
    ensembles = parse_ensembles(args.ensembles)
    tasks = parse_tasks(args.tasks)
    ks = _int_list(args.removal_ks, "--removal-ks")
    spec = _protocol(args)
    mislabel, loo = MislabelSpec(p=args.mislabel_p), LOOSpec(n_points=args.loo_points)
    if args.json is not None:
        _check_writable_file(args.json, "--json")
    if args.out is not None:
        _check_writable(args.out)
    setting = _setting(args)
    config = BenchConfig(
        setting=setting,
        methods=methods,
        ensembles=ensembles,
        spec=spec,
        tasks=tasks,
        mislabel=mislabel,
        loo=loo,
        removal_ks=ks,
        removal_queries=args.removal_queries,
        cache_dir=args.cache,
        workers=args.workers,
        isolate=not args.in_process,
        threads=1 if args.threads is None else args.threads,
        progress=not args.quiet,
    )
    outcome = run_benchmark(config)
    payload = outcome.payload
    print_table(payload)
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if args.out is not None:
        written = _plots(setting, outcome, args.out)
        if written:
            print(f"plots written to {args.out}: {', '.join(written)}")
    return 0


def _question(args: argparse.Namespace) -> int:
    import torch

    from datatrace.bench.questions import QUESTIONS

    name, config = parse_question(args.question)
    if args.json is not None:
        _check_writable_file(args.json, "--json")
    threads = QUESTIONS[name].threads if args.threads is None else args.threads
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"--threads must be an integer >= 1; got {threads}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        result = QUESTIONS[name].run(config)
    finally:
        torch.set_num_threads(previous)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


def _plots(setting: Any, outcome: Any, out: Path) -> list[str]:
    from datatrace.bench.plots import plot_lds_distribution, plot_pareto, plot_proponents

    done = [r for r in outcome.payload["rows"] if "error" not in r]
    if not done:
        return []
    name = setting.name
    plot_pareto(done, out / "pareto.png", f"{name}: efficacy vs cost")
    plot_lds_distribution(outcome.per_query, out / "lds_per_query.png", f"{name}: per-query LDS")
    written = ["pareto.png", "lds_per_query.png"]
    if any(r["ensemble"] for r in done):
        title = f"{name}: efficacy vs training cost"
        plot_pareto(done, out / "pareto_training.png", title, cost="train")
        written.append("pareto_training.png")
    if setting.image_shape is not None:
        best = max(done, key=lambda r: r["lds"])["label"]
        plot_proponents(
            setting,
            outcome.values[best][setting.n_val :],
            out / "proponents.png",
            f"{name}: top proponents and opponents ({best})",
        )
        written.append("proponents.png")
    return written


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise ConfigError(
            f"{flag} must be comma-separated ints such as 10,20,40; got {text!r}."
        ) from exc
    if not values or any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise ConfigError(f"{flag} must be strictly increasing ints >= 1; got {text!r}.")
    return values


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".datatrace-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to {str(path)!r} ({exc.strerror}); choose a writable directory."
        ) from exc


def _check_writable_file(path: Path, flag: str) -> None:
    """Refuse, before the run, a results file that could not be written after it."""
    if path.is_dir():
        raise ConfigError(
            f"{flag} {str(path)!r} is a directory; give a file name such as {str(path / 'bench.json')!r}."
        )
    _check_writable(path.parent)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {str(path)!r} is not writable; choose another file.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datatrace", description="Training data attribution benchmark."
    )
    parser.add_argument("--version", action="version", version=f"datatrace {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show the library's log messages on stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list method ids, one line each").set_defaults(fn=_cmd_methods)
    sub.add_parser("settings", help="list registered settings").set_defaults(fn=_cmd_settings)
    sub.add_parser(
        "questions", help="list the questions of `datatrace bench --question`, with options"
    ).set_defaults(fn=_cmd_questions)
    for name, fn, help_text in (
        ("groundtruth", _cmd_groundtruth, "build (or reuse) the LDS ground truth of a setting"),
        ("bench", _cmd_bench, "LDS and cost of every method on a setting"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(fn=fn)
        p.add_argument(
            "--setting", default="digits-mlp", help="registered setting (see `datatrace settings`)"
        )
        p.add_argument(
            "--size", choices=["full", "small"], default=None, help="setting size preset"
        )
        p.add_argument(
            "--protocol",
            default="lds-half",
            help="ground truth: lds-half (random half-subsets, retraining seeds vary; default) "
            "or fixed-seed-drop:FRACTION (the seed-0 run replayed without a random FRACTION of "
            "its examples, e.g. fixed-seed-drop:0.01; settings with a replay recipe only)",
        )
        p.add_argument(
            "--m",
            "--subsets",
            dest="m",
            type=int,
            default=50,
            help="LDS subsets, or drop sets under fixed-seed-drop (default 50); spell it "
            "--subsets after torchrun, whose own parser takes --m for one of its options",
        )
        p.add_argument(
            "--alpha", type=float, default=None, help="lds-half subset fraction (default 0.5)"
        )
        p.add_argument(
            "--seeds", type=int, default=None, help="lds-half retrainings per subset (default 2)"
        )
        p.add_argument(
            "--workers",
            type=int,
            default=2,
            help="retraining processes (default 2; per rank under torchrun)",
        )
        p.add_argument("--cache", type=Path, default=None, help="ground-truth cache directory")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument(
            "--threads",
            type=int,
            default=1 if name == "groundtruth" else None,
            help="torch threads of the run and of each method's or retraining's process "
            "(default 1: on a shared machine more threads per process spin-wait on each other; "
            "with --question, the question's default, else torch's)",
        )
        if name == "groundtruth":
            p.add_argument(
                "--verify",
                action="store_true",
                help="retrain a few subsets and check they match the stored ground truth",
            )
            p.add_argument(
                "--verify-subsets", type=int, default=3, help="subsets --verify retrains"
            )
            p.add_argument(
                "--dist-backend",
                choices=["auto", "gloo", "nccl"],
                default="auto",
                help="torch.distributed backend under torchrun (default auto: nccl where CUDA "
                "is available, else gloo)",
            )
        if name == "bench":
            p.add_argument(
                "--methods",
                default=DEFAULT_METHODS,
                help="comma-separated ids, options as id:key=value (default: "
                f"{DEFAULT_METHODS}; each on its DEFAULT_GRIDS grid)",
            )
            p.add_argument(
                "--ensembles",
                default="",
                help="also run every method with each ensemble, comma-separated kind:K "
                "(independent:K = K models trained with seeds 0..K-1; dropout:K = K masks of "
                "the seed-0 model's dropout layers, or :rate=0.1:layers=NAME+NAME to inject "
                "dropout after those modules where the model has none; lora:K = the seed-0 "
                "model plus K adapters, options :rank=4:epochs=5:lr=0.01); e.g. "
                "independent:4,dropout:4,lora:4",
            )
            p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
            p.add_argument(
                "--question",
                default=None,
                help="run this registered question instead of the LDS table, as "
                "NAME[:key=value...] (e.g. scale:job=million, speed-grads:repeats=5; list "
                "options comma-separated); `datatrace questions` lists them. Other options "
                "than --threads and --json do not apply to it",
            )
            p.add_argument("--out", type=Path, default=None, help="output directory")
            p.add_argument(
                "--tasks",
                default=DEFAULT_TASKS,
                help=f"comma-separated tasks among lds, mislabel, loo, removal (default "
                f"{DEFAULT_TASKS}; mislabel runs where the model memorises its flips, loo on "
                "convex settings)",
            )
            p.add_argument(
                "--mislabel-p", type=float, default=0.1, help="flipped-label rate (default 0.1)"
            )
            p.add_argument(
                "--loo-points", type=int, default=100, help="leave-one-out sample (default 100)"
            )
            p.add_argument(
                "--removal-ks", default="10,20,40", help="removal budgets (default 10,20,40)"
            )
            p.add_argument(
                "--removal-queries", type=int, default=5, help="queries of the removal task"
            )
            p.add_argument(
                "--in-process",
                action="store_true",
                help="run methods in this process (faster; no peak memory column)",
            )
    return parser


def _launched_world() -> tuple[int, int]:
    """``(rank, world size)`` that ``torchrun`` set in the environment; ``(0, 1)`` without it."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    except ValueError as exc:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
            "integers; launch with torchrun, or unset them to run in one process."
        ) from exc
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(
            f"RANK={rank} and WORLD_SIZE={world} need 0 <= RANK < WORLD_SIZE; launch with "
            "torchrun, or unset them to run in one process."
        )
    return rank, world


def _init_process_group(backend: str) -> bool:
    """Initialise the default group from torchrun's environment; True if this call did.

    Nothing to do in one process, or where the caller initialised the group already.
    """
    import torch
    import torch.distributed as dist

    if _launched_world()[1] < 2 or dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError(
                "--dist-backend nccl needs CUDA, which this process cannot see; use "
                "--dist-backend gloo on CPU."
            )
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=GROUP_TIMEOUT)  # MASTER_ADDR/PORT from torchrun
    return True


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        me, world = _launched_world()
    except ConfigError as exc:
        print(f"datatrace: error: {exc}", file=sys.stderr)
        return 2
    owned = False
    log, handler = logging.getLogger("datatrace"), logging.StreamHandler(sys.stderr)
    if args.verbose:
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        if world > 1 and args.command == "bench":
            raise ConfigError(
                f"`datatrace bench` runs in one process, but torchrun started {world} "
                "(WORLD_SIZE); build the ground truth under torchrun with `torchrun "
                "--nproc-per-node N -m datatrace.cli groundtruth ...` and then run `datatrace "
                "bench` in one process: it reuses the cached ground truth."
            )
        if args.command == "groundtruth":
            owned = _init_process_group(args.dist_backend)
        return int(args.fn(args))
    except DatatraceError as exc:
        if me == 0:  # under torchrun a failure on any rank is raised on every rank
            print(f"datatrace: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `datatrace methods | head -1`: the reader left; quietly
        # stop writing, and keep Python's exit-time flush from raising on the closed pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # what a Unix tool killed by SIGPIPE returns
    except OSError as exc:  # a file the command reads or writes: one line, not a traceback
        name = f" {exc.filename!r}" if exc.filename else ""
        print(f"datatrace: error:{name} {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        if args.verbose:
            log.removeHandler(handler)
            log.setLevel(logging.NOTSET)
        if owned:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
