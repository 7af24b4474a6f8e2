"""``python -m opd_mini.experiments NAME [options]``: run one experiment; without a name, list them."""

from __future__ import annotations

import importlib
import sys

from opd_mini.experiments import EXPERIMENTS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "list"):
        width = max(map(len, EXPERIMENTS))
        print("python -m opd_mini.experiments NAME [--quick] [--seeds 0,1,2] [--out DIR] [-h]\n\nexperiments:")
        for name, (_, about) in EXPERIMENTS.items():
            print(f"  {name:<{width}}  {about}")
        return 0
    name = argv[0]
    if name not in EXPERIMENTS:
        sys.stderr.write(f"error: unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}\n")
        return 2
    module = importlib.import_module(EXPERIMENTS[name][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
