"""The `fedjax-lora` command line: `demo`, `methods`, `sources`, `run CONFIG.yaml`,
`grid GRID.yaml`, `sweep CONFIG.yaml`, `report RUN_DIR`, `export RUN_DIR --method M [--client C]
[--format peft|merged] --out DIR`.

Configs and arguments are checked before JAX is imported, so a wrong key answers at once.
`--import MODULE` (or the config's `imports:`) imports your own modules, e.g. one that
`register`s a method or `register_source`s a data source, before the config is read. Commands
that compute first call `fedjax_lora.distributed.initialize_from_env()` (a no-op for one
process); in a multi-process run the other processes write under `OUT/process_<i>`. Compiled
rounds are kept in JAX's persistent compilation cache (`compilation_cache_dir`;
`FEDJAX_LORA_COMPILATION_CACHE=0` turns it off)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedjax_lora import config as config_lib
from fedjax_lora.errors import ConfigError, one_line

DEMO_METHODS = ("local", "fedavg", "pcl-val", "comigs")


def _import_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (e.g. one that registers your method or data source); repeatable",
    )


def _with_imports(
    config: config_lib.ExperimentConfig, args: argparse.Namespace
) -> config_lib.ExperimentConfig:
    """`config` with the `--import` modules added to its `imports`."""
    if not args.imports:
        return config
    imports = list(dict.fromkeys([*config.imports, *args.imports]))
    return config_lib.merge_base(config, {"imports": imports})


def demo_config(args: argparse.Namespace) -> config_lib.ExperimentConfig:
    """The embedded default: a synthetic corpus of 4 client groups (3 clients each, distinct
    sources, 1500 training tokens per client: too little alone, enough within a group) on a tiny
    random GPT-2 base. The default methods put the papers' personalised ones (trust-weighted
    `pcl-val`, `comigs`) next to `local` and `fedavg`."""
    overrides = [
        "data.num_groups=4",
        "data.clients_per_group=3",
        "data.tokens_per_client=1500",
        "data.val_fraction=0.3",
        "data.test_fraction=0.3",
        f"rounds={args.rounds}",
        f"strategy.kind={args.strategy}",
        "methods=[" + ",".join(args.methods) + "]",
        *args.set,
    ]
    return _with_imports(config_lib.load(None, overrides), args)


def _run(config: config_lib.ExperimentConfig, out: str, args: argparse.Namespace) -> None:
    from fedjax_lora.experiment import results_table, train_and_evaluate

    if args.checkpoint_every is not None:
        config = config_lib.merge_base(config, {"checkpoint": {"every": args.checkpoint_every}})
    summary = train_and_evaluate(config, out, progress=not args.no_progress, resume=args.resume)
    print(results_table(summary))
    figures = ", ".join(sorted(p.name for p in Path(out).glob("*.png")))
    print(f"\nwrote {Path(out) / 'metrics.jsonl'}, summary.json, results.md, {figures} and the")
    print(f"final adapters in {Path(out) / 'adapters'} (fedjax-lora export {out} --method M ...)")


def _checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="K",
        help="save the whole simulation every K rounds (and after the last)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        choices=(True, "if-any"),
        metavar="if-any",
        help="continue from the newest readable checkpoint in the output directory (the config "
        "may change only rounds, tracking and checkpoint settings); an error when there is none, "
        "unless --resume=if-any (then a fresh start)",
    )


def _preset_flag(parser: argparse.ArgumentParser) -> None:
    from fedjax_lora.presets import PRESETS

    parser.add_argument(
        "--preset",
        default=None,
        choices=sorted(PRESETS),
        help="a paper's settings, applied under the config file and the --set overrides",
    )


CACHE_SWITCH = "FEDJAX_LORA_COMPILATION_CACHE"


def compilation_cache_dir(environ: dict[str, str] | None = None) -> Path | None:
    """Where the CLI keeps JAX's persistent compilation cache, so a second run (or the next run
    of a grid, a sweep level, a demo) loads its compiled rounds instead of compiling them:
    `$FEDJAX_LORA_COMPILATION_CACHE` when it names a directory, None (off) when it is `0`, else
    `$JAX_COMPILATION_CACHE_DIR` (JAX's own setting, left to JAX), else
    `$XDG_CACHE_HOME/fedjax_lora/jax` (default `~/.cache/fedjax_lora/jax`)."""
    env = os.environ if environ is None else environ
    value = env.get(CACHE_SWITCH, "")
    if value == "0" or env.get("JAX_COMPILATION_CACHE_DIR") and not value:
        return None
    if value:
        return Path(value).expanduser()
    root = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "fedjax_lora" / "jax"


def _distributed_output(out: str) -> str:
    """Turns on the persistent compilation cache (`compilation_cache_dir`) and initialises
    `jax.distributed` when launched as several processes; process 0 writes to `out`, process
    `i > 0` to `out/process_<i>`."""
    import jax

    from fedjax_lora.distributed import describe, initialize_from_env

    if out and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(
            f"--out {out} is an existing file; name a directory for the run's outputs"
        )
    cache = compilation_cache_dir()
    if cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(cache))
    if not initialize_from_env():
        return out
    print(describe(), file=sys.stderr)
    i = jax.process_index()
    return out if i == 0 else str(Path(out) / f"process_{i}")


def _sweep(args: argparse.Namespace) -> None:
    config = _with_imports(config_lib.load(args.config, args.set, preset=args.preset), args)
    config.sweep.check_seeds()
    out = _distributed_output(args.out or str(Path("runs") / f"{Path(args.config).stem}-sweep"))
    from fedjax_lora.sweep import markdown, run_sweep

    doc = run_sweep(config, out)
    print(markdown(doc["table"]))
    print(f"\nwrote {Path(out) / 'sweep.md'} and sweep.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedjax-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="run the embedded default (synthetic data, tiny base)")
    p_demo.add_argument("--methods", nargs="+", default=list(DEMO_METHODS))
    p_demo.add_argument("--rounds", type=int, default=10)
    p_demo.add_argument("--strategy", default="map", help="vmap, map, chunked or sharded")
    p_demo.add_argument("--out", default="runs/demo")
    p_demo.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p_demo.add_argument("--no-progress", action="store_true")
    _checkpoint_flags(p_demo)
    _import_flag(p_demo)

    _import_flag(
        sub.add_parser(
            "methods", help="list every implemented method with its options and defaults"
        )
    )

    _import_flag(
        sub.add_parser("sources", help="list every registered data source and what it reads")
    )

    p_report = sub.add_parser("report", help="write a Markdown or HTML report of a finished run")
    p_report.add_argument("run_dir")
    p_report.add_argument("--format", choices=("md", "html"), default="md")

    p_export = sub.add_parser(
        "export",
        help="a finished run's client adapters to PEFT (CoMiGS: plus experts), or merged weights",
    )
    p_export.add_argument("run_dir")
    p_export.add_argument("--method", required=True, help="a method of the run")
    p_export.add_argument(
        "--client", default=None, help="a client name or index (default: every client)"
    )
    p_export.add_argument("--format", choices=("peft", "merged"), default="peft")
    p_export.add_argument("--out", required=True, help="output directory (one folder per client)")

    p_run = sub.add_parser("run", help="run an experiment config (YAML)")
    p_run.add_argument("config")
    p_run.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides such as training.steps=3 methods=[local]",
    )
    _preset_flag(p_run)
    p_run.add_argument("--out", default=None, help="output directory (default runs/<config>)")
    p_run.add_argument("--no-progress", action="store_true")
    _checkpoint_flags(p_run)
    _import_flag(p_run)

    p_grid = sub.add_parser("grid", help="run a paper table: cells x methods x seeds (YAML)")
    p_grid.add_argument("grid", help="grid file, e.g. experiments/comigs/table1.yaml")
    from fedjax_lora.grid import add_arguments as grid_arguments

    grid_arguments(p_grid)
    _import_flag(p_grid)

    p_sweep = sub.add_parser(
        "sweep", help="seeds x learning rates as one vectorized program (the config's sweep:)"
    )
    p_sweep.add_argument("config")
    p_sweep.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    _preset_flag(p_sweep)
    p_sweep.add_argument(
        "--out", default=None, help="output directory (default runs/<config>-sweep)"
    )
    _import_flag(p_sweep)

    args = parser.parse_args(argv)
    try:  # before any config is read: a module may register a method or data source it names
        config_lib.import_modules(getattr(args, "imports", ()))
    except ValueError as e:
        print(f"fedjax-lora: error: {e}", file=sys.stderr)
        return 2
    if args.command == "methods":
        from fedjax_lora.algorithms import METHODS
        from fedjax_lora.options import describe_methods

        print(describe_methods(METHODS))
        return 0
    if args.command == "sources":
        from fedjax_lora.experiment.sources import describe_sources

        print(describe_sources())
        return 0
    try:
        if args.command == "report":
            from fedjax_lora.report import write_report

            print(f"wrote {write_report(args.run_dir, args.format)}")
            return 0
        if args.command == "export":
            from fedjax_lora.export import export_run

            for path in export_run(
                args.run_dir, args.method, args.out, client=args.client, fmt=args.format
            ):
                print(f"wrote {path}")
            return 0
        if args.command == "grid":
            from fedjax_lora import grid

            if args.imports:
                args.set = [*args.set, "imports=[" + ",".join(args.imports) + "]"]
            spec = grid.load_grid(args.grid)  # every run's config checked before JAX loads
            grid.grid_configs(spec, args.cells, args.seeds, args.methods, args.set)
            args.out = _distributed_output(args.out)
            return grid.main(args.grid, args)
        if args.command == "sweep":
            _sweep(args)
            return 0
        if args.command == "demo":
            config = demo_config(args)
            out = args.out
        else:
            config = _with_imports(config_lib.load(args.config, args.set, preset=args.preset), args)
            out = args.out or str(Path("runs") / Path(args.config).stem)
        _run(config, _distributed_output(out), args)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"fedjax-lora: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "fedjax-lora: interrupted; checkpoints already written are kept (continue with "
            "--resume)",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
