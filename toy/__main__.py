"""Entry point of the toy reproductions: ``python -m toy [EXPERIMENT] [--out DIR] [options]``.

Each experiment is a module listed in :data:`EXPERIMENTS`, imported only when it runs. The contract
of an experiment module: ``add_arguments(parser)`` adds its options to an ``argparse`` parser, and
``main(args) -> dict`` runs it, writes ``args.out/<name>.json`` and its figures, prints a table, and
returns the results (including a ``"figures"`` list of the PNG paths it wrote, when it wrote any).

``python -m toy`` with no experiment runs every available experiment with its defaults into
``--out`` (default ``runs/toy``). An experiment whose module does not exist yet is reported as not
available and skipped; any other error propagates.

Examples::

    python -m toy bias-variance --out runs/toy
    python -m toy bias-variance --fast --out /tmp/bv
    python -m toy                      # everything, into runs/toy
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from types import ModuleType

#: experiment name -> module implementing ``add_arguments(parser)`` and ``main(args) -> dict``
EXPERIMENTS: dict[str, str] = {
    "bias-variance": "toy.bias_variance",
    "forgetting": "toy.forgetting",
}

DEFAULT_OUT = "runs/toy"


def load_experiment(name: str) -> ModuleType | None:
    """Import an experiment's module; None when that module itself does not exist (yet).

    Only a missing module *of the experiment* counts as "not available": an ImportError raised from
    inside the module (a broken import in its own code) propagates.
    """
    module_name = EXPERIMENTS[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: an optional experiment name and ``--out``. Experiment options are parsed
    by the experiment's own parser (:func:`experiment_parser`), so only the chosen module is imported."""
    parser = argparse.ArgumentParser(
        prog="python -m toy", description="Exact toy-world reproductions of on-policy distillation results.",
        epilog="experiments: " + ", ".join(EXPERIMENTS) + ". `python -m toy EXPERIMENT -h` lists its options.")
    parser.add_argument("experiment", nargs="?", choices=list(EXPERIMENTS), help="experiment to run (default: all)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    return parser


def experiment_parser(name: str, module: ModuleType) -> argparse.ArgumentParser:
    doc = (module.__doc__ or "").strip().splitlines()
    parser = argparse.ArgumentParser(prog=f"python -m toy {name}", description=doc[0] if doc else None)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    module.add_arguments(parser)
    return parser


def defaults_for(module: ModuleType, out: str) -> argparse.Namespace:
    """The module's default arguments, with ``out`` set."""
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    args = p.parse_args([])
    args.out = out
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    help_only = any(a in ("-h", "--help") for a in argv)
    args, rest = build_parser().parse_known_args([a for a in argv if a not in ("-h", "--help")])
    if args.experiment is None:
        if help_only or rest:
            build_parser().parse_args(argv)  # prints help, or the error for unknown options, and exits
    else:
        module = load_experiment(args.experiment)
        if module is None:
            print(f"experiment {args.experiment!r} is not available: module {EXPERIMENTS[args.experiment]} does not exist")
            sys.exit(2)
        sub_argv = list(argv)
        sub_argv.remove(args.experiment)  # its first occurrence: the positional experiment name
        return {args.experiment: module.main(experiment_parser(args.experiment, module).parse_args(sub_argv))}

    results, missing = {}, []
    start = time.perf_counter()
    for name in EXPERIMENTS:
        module = load_experiment(name)
        if module is None:
            print(f"[toy] {name}: not available (module {EXPERIMENTS[name]} does not exist), skipped")
            missing.append(name)
            continue
        print(f"[toy] running {name} -> {args.out}")
        results[name] = module.main(defaults_for(module, args.out))
    print(f"\n[toy] done in {time.perf_counter() - start:.1f} s; results in {args.out}/")
    figures = [fig for res in results.values() if isinstance(res, dict) for fig in res.get("figures", [])]
    if os.path.isdir(args.out):  # also any figure an experiment wrote without listing it
        figures += [os.path.join(args.out, f) for f in sorted(os.listdir(args.out))
                    if f.endswith(".png") and os.path.join(args.out, f) not in figures]
    for fig in figures:
        print(f"[toy] figure: {fig}")
    if missing:
        print(f"[toy] not available: {', '.join(missing)}")
    return results


if __name__ == "__main__":
    main()
