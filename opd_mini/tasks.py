"""Verifiable prompt sources: a task yields (prompt, answer) examples and scores completions.

Tasks are registered like losses: :data:`TASK_REGISTRY` maps a kind to a factory, and a spec
``KIND:ARG`` builds one (``reverse:5`` → ``ReverseTask("5")``). Your own task is one decorated class
(or function) in your own file, loaded with ``--task_plugins my_tasks.py``::

    @tasks.register("upper")
    class Upper(tasks.Task):  # upper-case N letters: "abc>" -> "ABC"
        def __init__(self, arg: str):
            self.n = int(arg or 3)
        def _example(self, rng):
            s = "".join(rng.choice("abcdefgh") for _ in range(self.n))
            return tasks.Example(prompt=f"{s}>", answer=s.upper())

Specs understood by :func:`get_task` out of the box::

    reverse:N          reverse an N-digit string           "0412>"      -> "2140"
    add:N              add two N-digit numbers             "123+456="   -> "579"
    walk:N             walk from one of N positions to another "2>5="   -> "RRR" (any walk that ends there)
    route:N:K          walk through K waypoints in order     "2>5>3="  -> "RRRLL" (route:N:1 = walk:N)
    hidden:RHO:SPEC    SPEC's examples, each flagged with probability RHO by a hidden "!" that only a teacher reads
                       (--teacher_template '{hidden}{prompt}'); visible:RHO:SPEC puts the flag in the prompt
    jsonl:PATH         one {"prompt": ..., "answer": ...} object per line
    hf:NAME[:SPLIT]    a Hugging Face dataset (needs `pip install datasets` and a network)
    A+B, A*3+B         a mixture: every draw of n examples takes from each task its share of n (by weight,
                       equal by default); each example remembers its task (``Example.task``), which scores it

Held-out evaluation: a file task (``jsonl:``, ``hf:``) is split once, deterministically, into a training
part and a held-out part (``eval_fraction`` of it, 10 % by default), and ``examples(n, seed, split=...)``
draws from ``"train"``, ``"eval"`` or ``"all"``. A generated task (``reverse:N``, ``add:N``) draws fresh
random prompts for every split; when it has few distinct prompts (``reverse:2`` has 100), evaluation
prompts will also have been trained on, which the training summary measures and reports.

The built-in prompts end with a separator character (``>`` or ``=``) so that a character-level model
sees where the answer starts; the answer is followed by the tokenizer's EOS token in training data.
The reward is exact match: 1.0 when the completion, cut at the first EOS and stripped of surrounding
whitespace, equals the answer, else 0.0.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from opd_mini.task_base import SPLITS, STOP_STRINGS, Example, Task, check_split, exact_match  # noqa: F401
from opd_mini.walks import FlagTask, RouteTask, WalkTask  # noqa: F401


class ReverseTask(Task):
    """Reverse a string of ``num_digits`` random digits: ``"0412>"`` -> ``"2140"``."""

    def __init__(self, num_digits: int):
        if num_digits < 1:
            raise ValueError(f"reverse:N needs N >= 1, got {num_digits}")
        self.num_digits = num_digits
        self.name = f"reverse:{num_digits}"

    def _example(self, rng: random.Random) -> Example:
        digits = "".join(rng.choice("0123456789") for _ in range(self.num_digits))
        return Example(prompt=f"{digits}>", answer=digits[::-1])


class AddTask(Task):
    """Add two ``num_digits``-digit numbers (no leading zeros): ``"123+456="`` -> ``"579"``."""

    def __init__(self, num_digits: int):
        if num_digits < 1:
            raise ValueError(f"add:N needs N >= 1, got {num_digits}")
        self.num_digits = num_digits
        self.name = f"add:{num_digits}"

    def _example(self, rng: random.Random) -> Example:
        low = 0 if self.num_digits == 1 else 10 ** (self.num_digits - 1)
        a, b = rng.randint(low, 10**self.num_digits - 1), rng.randint(low, 10**self.num_digits - 1)
        return Example(prompt=f"{a}+{b}=", answer=str(a + b))


def _flag_task(arg: str, visible: bool) -> FlagTask:
    kind = "visible" if visible else "hidden"
    rho, _, spec = arg.partition(":")
    try:
        value = float(rho)
    except ValueError:
        value = None
    if value is None or not spec:
        raise ValueError(f"task {kind}:{arg}: expected {kind}:RHO:SPEC, e.g. {kind}:0.5:walk:10")
    return FlagTask(value, get_task(spec), visible=visible)


class ListTask(Task):
    """A fixed list of examples (from a JSONL file or a dataset), split once into training and held-out parts.

    The held-out part is ``eval_fraction`` of the list (at least one example), chosen by a shuffle seeded
    with the task's name, so every run and every process sees the same split. ``examples(n, seed, split)``
    shuffles the chosen part with ``seed`` and returns the first ``n``; when ``n`` exceeds it, further
    reshuffled passes are appended (examples repeat). ``n=len(task)`` with ``split="all"`` returns every
    example once.
    """

    def __init__(self, name: str, items: list[Example], eval_fraction: float = 0.1):
        if not items:
            raise ValueError(f"task {name!r} has no examples")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
        self.name = name
        self.items = items
        self.eval_fraction = eval_fraction
        order = list(range(len(items)))
        random.Random(f"{name}/held-out").shuffle(order)
        n_eval = max(1, round(eval_fraction * len(items))) if eval_fraction > 0 and len(items) >= 2 else 0
        self.splits = {"all": list(range(len(items))), "eval": sorted(order[:n_eval]),
                       "train": sorted(order[n_eval:])}

    def __len__(self) -> int:
        return len(self.items)

    def split_size(self, split: str) -> int:
        check_split(split)
        return len(self.splits[split])

    def describe_split(self, split: str) -> str:
        if split == "eval":
            return (f"{len(self.splits['eval'])} of the {len(self)} examples of {self.name} held out "
                    f"({self.eval_fraction:.0%}), never trained on")
        return f"{len(self.splits[split])} examples of {self.name} ({split})"

    def examples(self, n: int, seed: int, split: str = "all") -> list[Example]:
        check_split(split)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        pool = self.splits[split]
        if n and not pool:
            raise ValueError(f"task {self.name!r} has {len(self)} example(s), too few for a {split!r} split: give "
                             "a larger file, or a separate evaluation file with --eval_task jsonl:PATH")
        rng = random.Random(f"{self.name}/{seed}")
        out: list[Example] = []
        while len(out) < n:
            order = list(pool)
            rng.shuffle(order)
            out.extend(self.items[i] for i in order[: n - len(out)])
        return out


class MixTask(Task):
    """A mixture of tasks (spec ``A+B`` or ``A*3+B``): ``examples(n, ...)`` takes from each part its share
    of ``n`` by weight (largest remainders; parts in spec order), each example tagged with its part's spec
    in ``Example.task``, and each completion is scored by its example's own task."""

    def __init__(self, name: str, parts: list[tuple[Task, float]]):
        if len(parts) < 2:
            raise ValueError(f"task {name!r}: a mixture needs at least two tasks joined by '+'")
        names = [t.name for t, _ in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"task {name!r} names a task twice; give each once (weights: A*3+B)")
        self.name, self.parts = name, parts
        self.by_name = {t.name: t for t, _ in parts}
        moves = {t.slip_moves for t, _ in parts}
        self.slip_moves = moves.pop() if len(moves) == 1 else None  # slips only where every part has the same moves

    def counts(self, n: int) -> list[int]:
        """How many of ``n`` examples each part gives: n·w/Σw rounded by largest remainders."""
        total = sum(w for _, w in self.parts)
        exact = [n * w / total for _, w in self.parts]
        counts = [int(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])[: n - sum(counts)]:
            counts[i] += 1
        return counts

    def examples(self, n: int, seed: int, split: str = "all") -> list[Example]:
        check_split(split)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return [dataclasses.replace(e, task=task.name)
                for (task, _), k in zip(self.parts, self.counts(n)) for e in task.examples(k, seed=seed, split=split)]

    def split_size(self, split: str) -> int | None:
        sizes = [t.split_size(split) for t, _ in self.parts]
        return None if any(s is None for s in sizes) else sum(sizes)

    def describe_split(self, split: str) -> str:
        return "; ".join(t.describe_split(split) for t, _ in self.parts)

    def reward(self, completion: str, example: Example) -> float:
        if example.task not in self.by_name:
            raise ValueError(f"example {example.prompt!r} has task {example.task!r}, not a part of {self.name!r}")
        return self.by_name[example.task].reward(completion, example)


def check_vocabulary(task: Task, tokenizer) -> None:
    """A file task's prompts and answers must be written in characters the tokenizer knows: a character it reads
    as its unknown token (é, an emoji or CJK for the tiny world's character tokenizer) would make the example
    unlearnable without a word. A ValueError names the file, the line and the character."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    parts = [t for t, _ in task.parts] if isinstance(task, MixTask) else [task]
    for part in parts:
        for example in getattr(part, "items", []):
            for field_name in ("prompt", "answer"):
                text = getattr(example, field_name)
                if unk not in tokenizer(text, add_special_tokens=False)["input_ids"]:
                    continue
                bad = next((c for c in text if unk in tokenizer(c, add_special_tokens=False)["input_ids"]), "?")
                where = example.where or f"task {part.name}, example {example.prompt[:30]!r}"
                raise ValueError(f"{where}: the {field_name} holds the character {bad!r} (U+{ord(bad):04X}), which the "
                                 f"tokenizer reads as its unknown token {tokenizer.unk_token!r}: the model could never "
                                 "read or write it; use characters of its vocabulary, or a model with a larger one")


def task_of(example: Example, task: Task) -> str:
    """The spec of the task an example belongs to: its mixture part, else ``task`` itself."""
    return example.task or task.name


def load_jsonl(path: str | Path, eval_fraction: float = 0.1) -> ListTask:
    """Read a JSONL file of ``{"prompt": str, "answer": str}`` objects (blank lines skipped).

    Any malformed line raises ValueError naming the file and the 1-based line number.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"jsonl task file not found: {path}")
    items: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with \"prompt\" and \"answer\", "
                                 f"got {type(record).__name__}")
            for key in ("prompt", "answer"):
                if key not in record:
                    raise ValueError(f"{where}: missing key {key!r} (each line needs \"prompt\" and \"answer\")")
                if not isinstance(record[key], str):
                    raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
            if not record["prompt"].strip():
                raise ValueError(f"{where}: empty prompt")
            items.append(Example(prompt=record["prompt"], answer=record["answer"], where=where))
    if not items:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return ListTask(f"jsonl:{path}", items, eval_fraction)


def load_hf_dataset(name: str, split: str = "train", *, prompt_column: str = "prompt",
                    answer_column: str = "answer", config_name: str | None = None,
                    eval_fraction: float = 0.1) -> ListTask:
    """Load a Hugging Face dataset with the ``datasets`` library (imported here, only when asked for).

    ``prompt_column`` and ``answer_column`` name the columns to use; values are converted with ``str``.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"the task 'hf:{name}' needs the `datasets` library, which is not installed: run "
            "`pip install datasets` (downloading a dataset also needs a network connection), or use a "
            "built-in task (reverse:N, add:N) or a local jsonl:PATH file"
        ) from None
    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as e:  # offline, unknown name or split: the datasets library raises many types
        raise ValueError(f"cannot load the dataset {name!r} (split {split!r}): {type(e).__name__}: "
                         f"{' '.join(str(e).split(chr(10))[0].split())}; offline, use a local jsonl:PATH file") from None
    columns = list(getattr(ds, "column_names", None) or (ds[0].keys() if len(ds) else []))
    for column, what in ((prompt_column, "prompt_column"), (answer_column, "answer_column")):
        if column not in columns:
            raise ValueError(f"dataset {name!r} (split {split!r}) has no column {column!r} (set {what}); "
                             f"its columns are {columns}")
    items = [Example(prompt=str(row[prompt_column]), answer=str(row[answer_column])) for row in ds]
    return ListTask(f"hf:{name}:{split}", items, eval_fraction)


#: Every task kind a spec can name, in registration order: ``--task KIND:ARG``.
TASK_REGISTRY: dict[str, "TaskEntry"] = {}


@dataclass(frozen=True)
class TaskEntry:
    """One registered task kind: its factory (``factory(arg)`` → a :class:`Task`) and how to write its spec."""

    kind: str
    factory: Callable[..., Task]
    usage: str  # e.g. "reverse:N"


def register(kind: str, *, usage: str | None = None, replace: bool = False) -> Callable:
    """Decorator: add a task kind to :data:`TASK_REGISTRY` (the module docstring has an example).

    The decorated class or function is called with the text after ``KIND:`` (``""`` for a bare ``KIND``) and,
    when it takes one, the keyword ``eval_fraction``; it returns a :class:`Task`, whose ``name`` is then the
    spec. A kind already taken by another factory is an error unless ``replace``."""
    if not kind or any(c in kind for c in ":+*"):
        raise ValueError(f"a task kind must be a non-empty name without ':', '+' or '*', got {kind!r}")

    def add(factory: Callable) -> Callable:
        old = TASK_REGISTRY.get(kind)
        same = old is not None and (old.factory.__module__, old.factory.__qualname__) == (
            factory.__module__, factory.__qualname__)
        if old is not None and not (replace or same):
            raise ValueError(f"a task named {kind!r} is already registered ({old.factory.__module__}."
                             f"{old.factory.__qualname__}); pick another name or pass replace=True")
        TASK_REGISTRY[kind] = TaskEntry(kind, factory, usage or f"{kind}:ARG")
        return factory

    return add


def task_specs() -> tuple[str, ...]:
    """How to write each registered task kind, and a mixture (for error messages and ``--help``)."""
    return tuple(e.usage for e in TASK_REGISTRY.values()) + ("A+B (a mixture, A*3+B weighted)",)


register("reverse", usage="reverse:N")(lambda arg: ReverseTask(_int_arg("reverse", arg)))
register("add", usage="add:N")(lambda arg: AddTask(_int_arg("add", arg)))
register("walk", usage="walk:N")(lambda arg: WalkTask(_int_arg("walk", arg)))
register("jsonl", usage="jsonl:PATH")(lambda arg, eval_fraction=0.1: load_jsonl(_nonempty("jsonl", arg),
                                                                               eval_fraction))
register("hf", usage="hf:NAME[:SPLIT]")(
    lambda arg, eval_fraction=0.1: load_hf_dataset(_nonempty("hf", arg).partition(":")[0],
                                                   arg.partition(":")[2] or "train", eval_fraction=eval_fraction))
register("questions", usage="questions")(lambda arg, eval_fraction=0.1: shipped("questions", arg, eval_fraction))
register("sums", usage="sums")(lambda arg, eval_fraction=0.1: shipped("sums", arg, eval_fraction))
register("route", usage="route:N:K")(lambda arg: RouteTask(*_int_args("route", arg, "N:K", 2)))
register("hidden", usage="hidden:RHO:SPEC")(lambda arg: _flag_task(arg, visible=False))
register("visible", usage="visible:RHO:SPEC")(lambda arg: _flag_task(arg, visible=True))

#: Prompt sets for real chat models, shipped in ``opd_mini/assets/real``: 64 everyday questions with one-word
#: answers, and the 100 single-digit sums ("What is 3 + 4? Reply with only the number.").
SHIPPED_TASKS = ("questions", "sums")


def shipped(name: str, arg: str, eval_fraction: float) -> ListTask:
    """A shipped prompt set, named by its kind alone (its held-out split does not depend on where it is installed)."""
    if arg:
        raise ValueError(f"task {name}:{arg}: the shipped task {name!r} takes no argument; write --task {name}")
    return ListTask(name, load_jsonl(Path(__file__).parent / "assets" / "real" / f"{name}.jsonl").items, eval_fraction)


#: Largest mixture weight: weights are relative, and larger ones only overflow the split of a step's prompts.
MAX_MIXTURE_WEIGHT = 1e6


def get_task(spec: str, *, eval_fraction: float = 0.1) -> Task:
    """Build a task from its spec string: a registered ``KIND:ARG``, or a mixture ``A+B`` / ``A*3+B`` of them.
    An unknown kind is a ValueError listing the registered ones."""
    spec = str(spec)
    if "+" in spec and not _is_file_spec(spec):
        parts = []
        for piece in spec.split("+"):
            one, _, weight = piece.strip().rpartition("*") if "*" in piece else (piece.strip(), "", "1")
            try:
                w = float(weight)
            except ValueError:
                w = -1.0
            if not 0 < w <= MAX_MIXTURE_WEIGHT:  # also NaN and inf
                raise ValueError(f"task {spec!r}: the weight in {piece.strip()!r} must be a number in (0, "
                                 f"{MAX_MIXTURE_WEIGHT:g}] (A*3+B)")
            parts.append((get_task(one, eval_fraction=eval_fraction), w))
        return MixTask(spec, parts)
    kind, _, arg = spec.partition(":")
    entry = TASK_REGISTRY.get(kind)
    if entry is None:
        raise ValueError(f"unknown task {spec!r}; valid task specs are: {', '.join(task_specs())} (register your own "
                         "with opd_mini.tasks.register and --task_plugins)")
    takes_fraction = "eval_fraction" in inspect.signature(entry.factory).parameters
    task = entry.factory(arg, eval_fraction=eval_fraction) if takes_fraction else entry.factory(arg)
    if not isinstance(task, Task):
        raise ValueError(f"the task factory of {kind!r} returned {type(task).__name__}, not an opd_mini.tasks.Task")
    if task.name == Task.name:  # a user task that did not name itself: its spec names it
        task.name = spec
    return task


def _is_file_spec(spec: str) -> bool:
    """A ``jsonl:`` spec whose whole text names an existing file (a path may contain '+')."""
    kind, _, arg = spec.partition(":")
    return kind == "jsonl" and Path(arg).is_file()


def _int_arg(kind: str, arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise ValueError(f"task {kind}:{arg!r}: expected {kind}:N with an integer N, e.g. {kind}:3") from None


def _int_args(kind: str, arg: str, usage: str, count: int) -> list[int]:
    try:
        values = [int(a) for a in arg.split(":")]
    except ValueError:
        values = []
    if len(values) != count:
        raise ValueError(f"task {kind}:{arg}: expected {kind}:{usage} with integers, e.g. {kind}:10:2")
    return values


def _nonempty(kind: str, arg: str) -> str:
    if not arg:
        raise ValueError(f"task {kind!r} needs an argument: {kind}:PATH" if kind == "jsonl" else
                         f"task {kind!r} needs an argument: {kind}:NAME[:SPLIT]")
    return arg
