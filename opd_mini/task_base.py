"""The base of every task: an :class:`Example`, the exact-match reward and :class:`Task`, the interface a task
implements. The built-in tasks, the registry and task specs live in :mod:`opd_mini.tasks`, which re-exports these."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

#: End-of-sequence markers a completion is cut at before comparing (decoded text normally has none:
#: the sampler decodes up to the first EOS and skips special tokens).
STOP_STRINGS = ("<eos>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


@dataclass
class Example:
    """One verifiable example: the prompt shown to the model and the expected answer text."""

    prompt: str
    answer: str
    task: str = ""  # the spec of the task it came from, set by a mixture (empty for a single task)
    hidden: str = ""  # context only a teacher reads (teacher_template's {hidden}; hidden:RHO:SPEC sets it)
    where: str = dataclasses.field(default="", compare=False, repr=False)  # its file and line, for messages


def exact_match(completion: str, answer: str) -> float:
    """1.0 when ``completion`` (cut at the first EOS marker, stripped) equals ``answer`` (stripped), else 0.0."""
    for stop in STOP_STRINGS:
        completion = completion.split(stop, 1)[0]
    return float(completion.strip() == answer.strip())


class Task:
    """A source of examples with an exact-match reward.

    Subclasses implement :meth:`_example` (one random example from an RNG) or override :meth:`examples`.
    ``slip_moves``: two answer characters that an environment slip swaps (``--slip_prob``: the emitted move
    is replaced by the other one); None for a task without such moves, where slips are refused.
    """

    name: str = "task"
    slip_moves: tuple[str, str] | None = None
    hidden_context: bool = False  # its examples carry a ``hidden`` field (hidden:RHO:SPEC)
    visible_context: bool = False  # its prompts show what a hidden task would hide (visible:RHO:SPEC)

    def examples(self, n: int, seed: int, split: str = "all") -> list[Example]:
        """``n`` examples, deterministic in ``seed`` (different seeds give different draws). A generated
        task has no fixed split: every ``split`` draws fresh random prompts."""
        check_split(split)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}/{seed}")
        return [self._example(rng) for _ in range(n)]

    def split_size(self, split: str) -> int | None:
        """Number of distinct examples in ``split``; None for a generated task (unbounded)."""
        return None

    def describe_split(self, split: str) -> str:
        """One line saying where the examples of ``split`` come from (for summaries)."""
        return f"fresh random prompts of {self.name}"

    def _example(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def reward(self, completion: str, example: Example) -> float:
        """Exact-match reward of one completion (see :func:`exact_match`)."""
        return exact_match(completion, example.answer)

    def rewards(self, completions: list[str], examples: list[Example]) -> list[float]:
        """Rewards of paired completions and examples (same length)."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions but {len(examples)} examples")
        return [self.reward(c, e) for c, e in zip(completions, examples)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


#: The splits a task draws from: its training part, its held-out part, or both.
SPLITS = ("train", "eval", "all")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
