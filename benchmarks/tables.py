"""Regenerate BENCHMARKS.md's tables from the committed measurements in ``benchmarks/results/``.

Each table sits between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` and is what the script that measured it
prints (its ``report``) from ``benchmarks/results/NAME.json``; a test keeps them equal.

    python benchmarks/tables.py            # rewrite the blocks
    python benchmarks/tables.py --check    # exit 1 if a block differs from its JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PAGE = HERE.parent / "BENCHMARKS.md"

#: block name -> (the module whose ``report`` prints it, the JSON file under results/)
BLOCKS = {
    "profile_decode": ("profile_decode", "profile_decode.json"),
    "compile_divergence": ("compile_divergence", "compile_divergence.json"),
    "vs_trl": ("vs_trl", "vs_trl.json"),
    "vs_trl_plain": ("vs_trl", "vs_trl_plain.json"),
    "vs_trl_compiled": ("vs_trl", "vs_trl_compiled.json"),
}


def expected() -> dict[str, str]:
    """Every block whose JSON exists, as its script's ``report`` prints it."""
    import importlib

    out = {}
    for name, (module, file) in BLOCKS.items():
        path = HERE / "results" / file
        if path.exists():
            out[name] = importlib.import_module(module).report(json.loads(path.read_text()))
    return out


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"


def read_block(text: str, name: str) -> str | None:
    """The text between the block's two marker lines (without the newline before the end marker)."""
    start, end = _markers(name)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].removesuffix("\n")


def write_block(text: str, name: str, block: str) -> str:
    start, end = _markers(name)
    if start not in text or end not in text:
        raise SystemExit(f"error: BENCHMARKS.md has no {start.strip()} ... {end} block for {name}")
    head, rest = text.split(start, 1)
    return head + start + block + "\n" + end + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when a block is stale")
    args = p.parse_args(argv)
    text = PAGE.read_text()
    blocks = expected()
    stale = [name for name, block in blocks.items() if read_block(text, name) != block]
    if args.check:
        for name in stale:
            print(f"BENCHMARKS.md: the {name} block differs from benchmarks/results/{BLOCKS[name][1]}", file=sys.stderr)
        return 1 if stale else 0
    for name in stale:
        text = write_block(text, name, blocks[name])
    PAGE.write_text(text)
    print(f"{len(stale)} block(s) rewritten: {', '.join(stale) or '-'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
