"""Tasks with moves: walking on a line (``walk:N``), through waypoints (``route:N:K``), and a flag only a teacher
reads (``hidden:RHO:SPEC`` / ``visible:RHO:SPEC``). Registered in :mod:`opd_mini.tasks`, which re-exports them."""

from __future__ import annotations

import dataclasses
import random

from opd_mini.task_base import STOP_STRINGS, Example, Task


class WalkTask(Task):
    """Walk on a line of ``num_positions`` positions (0 .. N−1, N ≤ 10) from a start to a goal: ``"2>5="``.

    A completion is a string of moves, ``R`` (+1) and ``L`` (−1); it is correct when it ends on the goal,
    however it gets there: ``"RRR"`` (the reference answer, the direct path) and ``"RRLRR"`` both solve
    ``"2>5="``. So a wrong move early on can still be repaired by the moves after it: the task where a
    student's own mistakes take it to states a teacher's direct paths never visit, and where knowing how
    to come back from them pays (the demo's compounding-errors setting).
    """

    slip_moves = ("L", "R")

    def __init__(self, num_positions: int):
        if not 2 <= num_positions <= 10:
            raise ValueError(f"walk:N needs 2 <= N <= 10 positions (single digits), got {num_positions}")
        self.num_positions = num_positions
        self.name = f"walk:{num_positions}"

    def _example(self, rng: random.Random) -> Example:
        start, goal = rng.sample(range(self.num_positions), 2)
        return Example(prompt=f"{start}>{goal}=", answer=("R" if goal > start else "L") * abs(goal - start))

    @staticmethod
    def end_position(prompt: str, moves: str) -> int | None:
        """Where ``moves`` (cut at EOS, stripped) lead from the prompt's start; None if a character is not a move."""
        for stop in STOP_STRINGS:
            moves = moves.split(stop, 1)[0]
        moves = moves.strip()
        if set(moves) - {"L", "R"}:
            return None
        return int(prompt[0]) + moves.count("R") - moves.count("L")

    def reward(self, completion: str, example: Example) -> float:
        return float(self.end_position(example.prompt, completion) == int(example.prompt[2]))


class RouteTask(Task):
    """Walk through ``num_waypoints`` waypoints in order on a line of ``num_positions`` positions: ``"2>5>3="``
    starts at 2 and must visit 5, then end on 3. ``route:N:1`` is ``walk:N``.

    A completion of ``L``/``R`` moves is correct when, followed from the start, it reaches the waypoints in
    order (passing through one counts) and ends on the last. The reference answer is the direct path, leg by
    leg, so the horizon grows with K (about 3.7 moves a leg for N = 10): the task of the slippery-route
    experiment (:mod:`opd_mini.experiments.slips`), where an environment slip (``--slip_prob``) swaps an
    emitted move and the policy must come back from wherever it lands.
    """

    slip_moves = ("L", "R")

    def __init__(self, num_positions: int, num_waypoints: int):
        if not 2 <= num_positions <= 10:
            raise ValueError(f"route:N:K needs 2 <= N <= 10 positions (single digits), got {num_positions}")
        if num_waypoints < 1:
            raise ValueError(f"route:N:K needs K >= 1 waypoints, got {num_waypoints}")
        self.num_positions, self.num_waypoints = num_positions, num_waypoints
        self.name = f"route:{num_positions}:{num_waypoints}"

    def _example(self, rng: random.Random) -> Example:
        stops = [rng.randrange(self.num_positions)]
        for _ in range(self.num_waypoints):
            stops.append(rng.choice([p for p in range(self.num_positions) if p != stops[-1]]))
        answer = "".join(("R" if b > a else "L") * abs(b - a) for a, b in zip(stops, stops[1:]))
        return Example(prompt=">".join(map(str, stops)) + "=", answer=answer)

    @staticmethod
    def stops(prompt: str) -> list[int]:
        """The start and the waypoints of a prompt ``"2>5>3="``: ``[2, 5, 3]``."""
        return [int(c) for c in prompt.rstrip("=").split(">")]

    @staticmethod
    def legs_done(prompt: str, moves: str) -> tuple[int, bool]:
        """(waypoints reached in order, whether the completion is correct) for ``moves`` (cut at EOS, stripped);
        a character that is not a move ends the walk there."""
        for stop in STOP_STRINGS:
            moves = moves.split(stop, 1)[0]
        moves = moves.strip()
        stops = RouteTask.stops(prompt)
        pos, reached, valid = stops[0], 0, True
        for ch in moves:
            if ch not in "LR":
                valid = False
                break
            pos += 1 if ch == "R" else -1
            if reached < len(stops) - 1 and pos == stops[reached + 1]:
                reached += 1
        done = len(stops) - 1
        return reached, valid and reached == done and pos == stops[-1]

    @staticmethod
    def next_move(prompt: str, moves: str) -> str | None:
        """The direct path's next move after ``moves`` (a valid move string): toward the next waypoint not yet
        reached; None once the route is complete and the walk stands on its last stop (then EOS)."""
        stops = RouteTask.stops(prompt)
        pos, reached = stops[0], 0
        for ch in moves:
            pos += 1 if ch == "R" else -1
            if reached < len(stops) - 1 and pos == stops[reached + 1]:
                reached += 1
        target = stops[min(reached + 1, len(stops) - 1)]
        if reached == len(stops) - 1 and pos == target:
            return None
        return "R" if target > pos else "L"

    def reward(self, completion: str, example: Example) -> float:
        return float(self.legs_done(example.prompt, completion)[1])


class FlagTask(Task):
    """``hidden:RHO:SPEC``: the examples of task SPEC, each (independently, seeded) flagged with probability
    ``rho`` by :data:`FLAG` in its ``hidden`` field, which only a teacher reads (``--teacher_template
    '{hidden}{prompt}'``): a teacher whose behaviour depends on context that the student cannot see.
    ``visible:RHO:SPEC`` (``visible=True``) writes the same flag in front of the prompt instead, where the student
    sees it (the control). The flag is drawn per example, not per prompt text, so the student cannot learn it
    from the prompt; each example is scored by SPEC on its own prompt."""

    FLAG = "!"

    def __init__(self, rho: float, inner: Task, visible: bool = False):
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"{'visible' if visible else 'hidden'}:RHO:SPEC needs 0 <= RHO <= 1, got {rho}")
        self.rho, self.inner, self.visible = rho, inner, visible
        self.name = f"{'visible' if visible else 'hidden'}:{rho:g}:{inner.name}"
        self.slip_moves = inner.slip_moves
        self.hidden_context, self.visible_context = not visible, visible

    def examples(self, n: int, seed: int, split: str = "all") -> list[Example]:
        rng = random.Random(f"flag/{self.rho:g}/{self.inner.name}/{seed}/{split}")  # hidden and visible: the same flags
        out = []
        for e in self.inner.examples(n, seed=seed, split=split):
            flag = self.FLAG if rng.random() < self.rho else ""
            out.append(dataclasses.replace(e, prompt=flag + e.prompt) if self.visible else
                       dataclasses.replace(e, hidden=flag))
        return out

    def split_size(self, split: str) -> int | None:
        return self.inner.split_size(split)

    def describe_split(self, split: str) -> str:
        return self.inner.describe_split(split)

    def reward(self, completion: str, example: Example) -> float:
        if self.visible and example.prompt.startswith(self.FLAG):
            example = dataclasses.replace(example, prompt=example.prompt[len(self.FLAG):])
        return self.inner.reward(completion, example)

