"""Each experiment's settings, in ``recipes/experiments/NAME.yaml``: read, checked against the shipped recipe (an
unknown or missing field is named with its file and line), merged with ``--set KEY=VALUE`` and bound as the module's
constants for one run (``run`` → ``RUN``), handed to its worker processes through :data:`RECIPE_ENV`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

#: The repository this package sits in.
REPO = Path(__file__).resolve().parents[2]
#: Where the experiments' recipes live, relative to the repository.
RECIPES_DIR = "recipes/experiments"
#: A recipe's keys that document it rather than set anything.
RECIPE_META = ("experiment", "reproduces")
#: A run given --recipe or --set hands its merged recipe to its worker processes through this variable.
RECIPE_ENV = "OPD_MINI_RECIPE"


def recipe_path(name: str) -> Path:
    return REPO / RECIPES_DIR / f"{name}.yaml"


def recipe(name: str) -> dict:
    """Experiment ``name``'s settings: its recipe file, or, in the worker processes of a run given --recipe or
    --set, that run's merged recipe. Each key but :data:`RECIPE_META` is a module constant: ``run`` → ``RUN``."""
    given = os.environ.get(RECIPE_ENV)
    if given:
        data = json.loads(given)
        if data.get("experiment") == name:
            return data
    from opd_mini.config import read_mapping

    return read_mapping(recipe_path(name), "recipe")[0]


def _where(path, lines: dict, keys: tuple) -> str:
    return f"{path}, line {lines[keys]}" if keys in lines else str(path)


def check_recipe(name: str, data: dict, shipped: dict, path, lines: dict) -> None:
    """A recipe has the shipped recipe's keys: ``run`` and every table of methods hold only the loop's fields (a
    table may name new methods), each scale exactly the shipped scale's keys; the first unknown or missing one is
    named, with the file and its line."""
    from opd_mini.config import FIELD_NAMES

    def unknown(keys: tuple, valid) -> ValueError:
        return ValueError(f"recipe {_where(path, lines, keys)}: unknown field {'.'.join(keys)!r}; valid there: "
                          f"{', '.join(valid)}")

    if data.get("experiment", name) != name:
        raise ValueError(f"recipe {_where(path, lines, ('experiment',))} is experiment {data['experiment']!r}'s, not "
                         f"{name!r}'s")
    for key in data:
        if key not in shipped and key not in RECIPE_META:
            raise unknown((key,), [k for k in shipped if k not in RECIPE_META])
    for key in shipped:
        if key not in data and key not in RECIPE_META:
            raise ValueError(f"recipe {path} lacks {key!r}: copy it from {recipe_path(name).relative_to(REPO)}")
    for key, value in data.items():
        if key in RECIPE_META:
            continue
        if not isinstance(value, type(shipped[key])):
            raise ValueError(f"recipe {_where(path, lines, (key,))}: {key!r} must be a {type(shipped[key]).__name__}")
        if key == "run" or key.endswith("_run"):  # the loop's fields
            bad = next((k for k in value if k not in FIELD_NAMES), None)
            if bad is not None:
                raise unknown((key, bad), ["the loop's fields (python -m opd_mini.train --help)"])
        elif key == "scales":
            for scale, settings in value.items():
                if scale not in shipped[key]:
                    raise unknown((key, scale), shipped[key])
                if not isinstance(settings, dict):
                    raise ValueError(f"recipe {_where(path, lines, (key, scale))}: scales.{scale} must be a mapping")
                for k in settings:
                    if k not in shipped[key][scale]:
                        raise unknown((key, scale, k), shipped[key][scale])
                missing = [k for k in shipped[key][scale] if k not in settings]
                if missing:
                    raise ValueError(f"recipe {_where(path, lines, (key, scale))}: scales.{scale} lacks "
                                     f"{', '.join(missing)}")
        elif isinstance(value, dict) and all(isinstance(v, dict) for v in shipped[key].values()):
            for entry, fields in value.items():  # a table of methods: each the loop's settings that make it
                if not isinstance(fields, dict):
                    raise ValueError(f"recipe {_where(path, lines, (key, entry))}: {key}.{entry} must be a mapping "
                                     "of the loop's fields")
                bad = next((k for k in fields if k not in FIELD_NAMES), None)
                if bad is not None:
                    raise unknown((key, entry, bad), ["the loop's fields (python -m opd_mini.train --help)"])


def _scalar(text: str):
    """A --set value: an int, a float (1e-3 too, which YAML 1.1 reads as a string), else YAML (true, [1, 2], a)."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def merged_recipe(name: str, file: str | None, sets: list[str]) -> dict:
    """The recipe a run uses: ``file`` (default: the shipped one), checked against the shipped one, then each
    ``--set a.b.c=VALUE`` (an existing key, or a new entry of a table of methods)."""
    from opd_mini.config import read_mapping

    shipped = read_mapping(recipe_path(name), "recipe")[0]
    data, lines = read_mapping(file, "recipe") if file else (json.loads(json.dumps(shipped)), {})
    check_recipe(name, data, shipped, file or recipe_path(name), lines)
    for item in sets:
        keys, eq, value = item.partition("=")
        path = tuple(k for k in keys.strip().split(".") if k)
        if not eq or not path:
            raise ValueError(f"--set {item!r} is not KEY=VALUE; write e.g. --set run.lr=0.001 or --set scales.full.steps=50")
        node = data
        for depth, k in enumerate(path[:-1]):
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {'.'.join(path[:depth])!r} is not a mapping")
            if k not in node:
                if depth != 1 or path[0] in ("run", "scales"):
                    raise ValueError(f"--set {item!r}: the recipe has no {'.'.join(path[:depth + 1])!r}")
                node[k] = {}  # a new entry of a table of methods
            node = node[k]
        if not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {'.'.join(path[:-1])!r} is not a mapping")
        node[path[-1]] = _scalar(value.strip())
        try:
            check_recipe(name, data, shipped, "--set", {})
        except ValueError as e:
            raise ValueError(f"--set {item!r}: {str(e).split(': ', 1)[1]}") from None
    return {"experiment": name, **{k: v for k, v in data.items() if k != "experiment"}}


def apply_recipe(module: ModuleType, data: dict) -> dict:
    """Bind ``data``'s settings as ``module``'s constants (``run`` → ``RUN`` …) and hand them to its worker processes;
    returns what to restore (:func:`restore_recipe`)."""
    saved = {"env": os.environ.get(RECIPE_ENV),
             "constants": {k.upper(): getattr(module, k.upper()) for k in data if k not in RECIPE_META}}
    for key, value in data.items():
        if key not in RECIPE_META:
            setattr(module, key.upper(), value)
    os.environ[RECIPE_ENV] = json.dumps(data)
    return saved


def restore_recipe(module: ModuleType, saved: dict) -> None:
    for key, value in saved["constants"].items():
        setattr(module, key, value)
    if saved["env"] is None:
        os.environ.pop(RECIPE_ENV, None)
    else:
        os.environ[RECIPE_ENV] = saved["env"]
