"""The demo's worlds: tiny teachers and students built to target accuracies, one pair per setting.

Each :class:`Setting` names a task, a teacher recipe and a student recipe. A recipe is an architecture
(:data:`opd_mini.tiny.TINY_SIZES` plus overrides), a kind of training data, and a **target**: the model
is trained by supervised fine-tuning, checked every ``check_every`` steps on held-out prompts, and
stopped at the first check that meets the target (or reported as not reached). So a teacher is "a
teacher with sampled pass@1 around 0.7", not "300 steps of something".

The kinds of training data:

* ``clean``: the task's reference answers;
* ``repair``: with probability ``p`` a few random moves are put in front of the answer and the loss
  is taken only on what follows them: the direct path from wherever those moves led (walk tasks).
  The model learns to come back from states that its own clean answers never visit, while its
  samples still take the direct path (a teacher trained like this knows how to repair a mistake);
* ``detour``: route and walk tasks: the direct path walked through an environment that slips (each move
  swapped, ``L`` ↔ ``R``, with probability ``p``), and from wherever a slip lands the direct path on to the
  next waypoint; no loss on the slipped moves (they are the environment's, not the model's). A model trained
  like this knows how to come back from a slip anywhere on the route (the teacher of the ``route`` setting);
* ``noisy``: every answer character is replaced, with probability ``p``, by a random other character
  of the answer alphabet: a teacher whose greedy answer is right but whose samples are often wrong,
  with the errors spread over many wrong continuations;
* ``flagged``: walk tasks: half of the prompts carry a flag in front (``"!2>5="``), and their answers have every
  move flipped (``L`` ↔ ``R``) with probability ``p``; the rest are clean. A teacher trained like this is noisy
  exactly where a flag that a student cannot see says so (the hidden-flag experiment,
  :mod:`opd_mini.experiments.hidden`, with ``hidden:RHO:walk:10`` and ``--teacher_template '{hidden}{prompt}'``);
* ``privileged``: clean answers, but with probability ``p`` the prompt is the privileged one,
  :data:`PRIVILEGED_TEMPLATE` filled with the example (the answer is in it): a model that has seen a
  little of such prompts, so that behind one it can read the answer off (the start of on-policy
  self-distillation with privileged context, :mod:`opd_mini.experiments.opsd`).

Command line (builds, or finds cached, every setting's pair and prints what it measured)::

    python -m opd_mini.experiments worlds [--settings compounding,noisy_teacher] [--seed 0] [--force] [--write-assets]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opd_mini.cli import run_cli
from opd_mini.forward import completion_logits
from opd_mini.losses import sft_cross_entropy, token_logprobs
from opd_mini.sampler import build_rollouts, sample
from opd_mini.tasks import FlagTask, RouteTask, Task, WalkTask, get_task
from opd_mini.tiny import build_char_tokenizer, build_tiny_model, ensure_tiny_models, num_parameters, num_threads

#: Bump when a recipe below changes, so caches and shipped assets are not reused by mistake.
WORLDS_VERSION = 1
#: Shipped pairs (regenerate with ``python -m opd_mini.experiments worlds --write-assets``).
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "worlds"
#: A detour walk (data ``detour``) stops after this many moves, slips included.
DETOUR_MAX_MOVES = 30
#: The privileged prompt of the ``privileged`` data kind (a ``teacher_template``: the example's fields).
PRIVILEGED_TEMPLATE = "{prompt} (the answer is {answer})"


@dataclass
class Recipe:
    """How one model of a setting is built: architecture, data, optimiser, and when to stop."""

    size: str = "teacher"                      # a key of TINY_SIZES
    config: dict = field(default_factory=dict)  # overrides of that architecture
    data: str = "clean"                        # clean | repair | detour | noisy | flagged | privileged
    p: float = 0.0                             # probability of the repair prefix / of a noisy character
    lr: float = 3e-3
    batch_size: int = 64
    max_steps: int = 2000
    check_every: int = 20
    # stop at the first check where every given bound holds (None: no bound)
    min_greedy: float | None = None
    min_sampled: float | None = None
    max_sampled: float | None = None
    # a second task mixed into the data (clean answers, this fraction of each batch) and its bounds
    mix_task: str | None = None
    mix_fraction: float = 0.0
    mix_min_sampled: float | None = None
    mix_max_sampled: float | None = None
    # data "privileged": a lower bound on the sampled pass@1 behind the privileged prompt
    privileged_min_sampled: float | None = None
    # data "flagged": an upper bound on the sampled pass@1 behind the flag (the noise is learned)
    flagged_max_sampled: float | None = None


@dataclass
class Setting:
    """One demo setting: a task, a teacher and a warm-started student, and what it is meant to show."""

    name: str
    task: str
    teacher: Recipe | None  # None: the setting is a student alone
    student: Recipe
    max_new_tokens: int
    about: str
    teacher_of: str | None = None  # share another setting's teacher (built there, not stored twice)


#: The warm-started walk student of several settings: direct paths only, until its sampled pass@1 reaches 0.3.
WALK_STUDENT = Recipe(size="student", data="clean", lr=3e-3, check_every=10, min_sampled=0.3)

SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting(
        name="compounding", task="walk:10", max_new_tokens=12,
        teacher=Recipe(data="repair", p=0.5, lr=3e-3, min_greedy=0.99, min_sampled=0.97), student=WALK_STUDENT,
        about="walk to a goal; a wrong move can be repaired by later ones. The teacher knows how to come "
              "back (trained on repaired walks), its own samples take the direct path; the student has seen "
              "only direct paths",
    ),
    Setting(
        name="noisy_teacher", task="walk:10", max_new_tokens=12,
        teacher=Recipe(data="noisy", p=0.08, lr=3e-3, min_greedy=0.97, min_sampled=0.6, max_sampled=0.75),
        student=WALK_STUDENT,
        about="an imperfect, stochastic teacher, trained on walks whose moves were flipped at random (p = 0.08 "
              "per move): its greedy walk is right, its samples often are not, and its errors are spread over "
              "every move of the walk",
    ),
    Setting(
        name="capacity", task="walk:10", max_new_tokens=12,
        teacher=Recipe(), teacher_of="compounding",
        student=replace(WALK_STUDENT, config=dict(num_hidden_layers=1, hidden_size=16, intermediate_size=64)),
        about="a capacity-limited student: one layer of width 16 (about a twentieth of the teacher's parameters) "
              "distilled from the compounding setting's teacher",
    ),
    Setting(
        name="continual", task="reverse:5", max_new_tokens=12, teacher=None,
        student=Recipe(size="teacher", data="clean", mix_task="walk:10", mix_fraction=0.03, check_every=10,
                       min_sampled=0.9, mix_min_sampled=0.1, mix_max_sampled=0.6),
        about="a model with skill A (reverse:5, sampled pass@1 >= 0.9) that has seen a little of skill B (walk:10, "
              "3 % of its data; pass@1 between 0.1 and 0.6): the start of the retention experiment, where it "
              "learns B from the walk expert (the compounding setting's teacher)",
    ),
    Setting(
        name="sdft", task="walk:10", max_new_tokens=12, teacher=None,
        student=Recipe(size="teacher", data="privileged", p=0.95, mix_task="reverse:5", mix_fraction=0.5,
                       check_every=10, max_steps=3000, max_sampled=0.3, mix_min_sampled=0.9,
                       privileged_min_sampled=0.9),
        about="a model with skill A (reverse:5, sampled pass@1 >= 0.9) that has seen skill B (walk:10, half of its "
              "data) almost only behind the privileged prompt '{prompt} (the answer is {answer})' (19 in 20 B "
              "examples): plain B at most 0.3, privileged B at least 0.9. Its own base behind that prompt is the "
              "teacher close to the student (self-distillation, opd_mini.experiments.sdft)",
    ),
    Setting(
        name="privileged", task="walk:10", max_new_tokens=12,
        teacher=Recipe(), teacher_of="compounding",
        student=Recipe(size="student", data="privileged", p=0.8, lr=3e-3, check_every=20, min_sampled=0.3,
                       max_sampled=0.45, privileged_min_sampled=0.6),
        about="a walk student like the compounding setting's (sampled pass@1 between 0.3 and 0.45), but four fifths of "
              "its warm-up prompts were privileged ('{prompt} (the answer is {answer})'): behind such a prompt its "
              "sampled pass@1 is at least 0.6 (on-policy self-distillation with privileged context, opd_mini.experiments.opsd)",
    ),
    Setting(
        name="hidden_flag", task="walk:10", max_new_tokens=12,
        teacher=Recipe(data="flagged", p=0.3, lr=3e-3, min_greedy=0.97, min_sampled=0.95, flagged_max_sampled=0.45),
        student=WALK_STUDENT,
        about="a teacher that is noisy only behind a flag: on prompts flagged '!' every move is flipped with probability "
              "0.3, otherwise it walks straight (sampled pass@1 >= 0.95 unflagged); the student is the compounding "
              "setting's, which never sees the flag (the hidden-flag experiment, opd_mini.experiments.hidden)",
    ),
    Setting(
        name="hidden_flag_mild", task="walk:10", max_new_tokens=12,
        teacher=Recipe(data="flagged", p=0.15, lr=3e-3, min_greedy=0.97, min_sampled=0.95, flagged_max_sampled=0.7),
        student=WALK_STUDENT,
        about="the hidden_flag setting with milder noise behind the flag: each move flipped with probability 0.15",
    ),
    Setting(
        name="route", task="route:6:1+route:6:2+route:6:4*2", max_new_tokens=32,
        teacher=Recipe(config=dict(num_hidden_layers=3), data="detour", p=0.15, lr=3e-3, max_steps=8000, check_every=50,
                       min_greedy=0.99, min_sampled=0.97),
        student=Recipe(size="student", data="clean", lr=3e-3, max_steps=4000, check_every=10, min_sampled=0.75),
        about="routes through 1, 2 or 4 waypoints on 6 positions (route:6:K; half of the training routes have 4). The "
              "teacher (three layers) was trained on routes walked through slips (p = 0.15), so it comes back from a "
              "detour anywhere; the student has seen clean direct paths "
              "only, until its sampled pass@1 (no slips) reached 0.75: the slippery-route experiment "
              "(opd_mini.experiments.slips)",
    ),
    Setting(
        name="experts", task="add:2", max_new_tokens=8,
        teacher=Recipe(data="clean", lr=5e-3, batch_size=128, max_steps=3000, check_every=50, min_greedy=0.98,
                       min_sampled=0.95),
        student=Recipe(size="student", data="clean", mix_task="reverse:5", mix_fraction=0.5, lr=3e-3, max_steps=3000,
                       check_every=10, min_sampled=0.2, mix_min_sampled=0.2),
        about="an addition expert (add:2, sampled pass@1 >= 0.95) and a small student trained on both tasks (half of "
              "its data reverse:5) until its sampled pass@1 on addition reaches 0.2; reversal is learned much sooner, "
              "so it knows reversal well and addition weakly: the start of the merging-experts experiment "
              "(opd_mini.experiments.experts), whose reversal expert is the counter_example teacher",
    ),
]}


# --------------------------------------------------------------------------------------------
# training data
# --------------------------------------------------------------------------------------------


def training_batch(task: Task, recipe: Recipe, n: int, seed: int) -> tuple[list[str], list[str], list[list[int]]]:
    """``n`` (prompt, completion, the completion characters without loss) triples."""
    if recipe.mix_task:
        k = round(n * recipe.mix_fraction)
        prompts, completions, skip = training_batch(task, replace(recipe, mix_task=None), n - k, seed)
        mixed = get_task(recipe.mix_task).examples(k, seed=seed, split="train")
        return prompts + [e.prompt for e in mixed], completions + [e.answer for e in mixed], skip + [[]] * k
    rng = random.Random(f"{task.name}/{recipe.data}/{seed}")
    examples = task.examples(n, seed=seed, split="train")
    prompts = [e.prompt for e in examples]
    if recipe.data == "clean":
        return prompts, [e.answer for e in examples], [[]] * n
    if recipe.data == "noisy":
        alphabet = sorted({ch for e in task.examples(256, seed=0) for ch in e.answer})
        noisy = ["".join(rng.choice([a for a in alphabet if a != ch]) if rng.random() < recipe.p else ch
                         for ch in e.answer) for e in examples]
        return prompts, noisy, [[]] * n
    if recipe.data == "flagged":
        if not all(isinstance(get_task(e.task) if e.task else task, WalkTask) for e in examples):
            raise ValueError(f"data 'flagged' needs a walk task, got {task.name}")
        flip = {"L": "R", "R": "L"}
        prompts, completions = [], []
        for e in examples:
            flagged = rng.random() < 0.5
            prompts.append(FlagTask.FLAG + e.prompt if flagged else e.prompt)
            completions.append("".join(flip[c] if flagged and rng.random() < recipe.p else c for c in e.answer))
        return prompts, completions, [[]] * n
    if recipe.data == "privileged":
        privileged = [PRIVILEGED_TEMPLATE.format(prompt=e.prompt, answer=e.answer) if rng.random() < recipe.p
                      else e.prompt for e in examples]
        return privileged, [e.answer for e in examples], [[]] * n
    if recipe.data == "repair":
        if not isinstance(task, WalkTask):
            raise ValueError(f"data 'repair' needs a walk task, got {task.name}")
        completions, skip = [], []
        for e in examples:
            prefix = "".join(rng.choice("LR") for _ in range(rng.randint(1, 3))) if rng.random() < recipe.p else ""
            goal, pos = int(e.prompt[2]), task.end_position(e.prompt, prefix)
            completions.append(prefix + ("R" if goal > pos else "L") * abs(goal - pos))
            skip.append(list(range(len(prefix))))
        return prompts, completions, skip
    if recipe.data == "detour":
        parts = [get_task(e.task) if e.task else task for e in examples]
        if not all(isinstance(t, (RouteTask, WalkTask)) for t in parts):
            raise ValueError(f"data 'detour' needs route or walk tasks, got {task.name}")
        completions, skip = [], []
        for e in examples:
            moves, slipped = "", []
            while (move := RouteTask.next_move(e.prompt, moves)) is not None and len(moves) < DETOUR_MAX_MOVES:
                if rng.random() < recipe.p:  # the environment swaps the move: the model's loss skips it
                    move = "L" if move == "R" else "R"
                    slipped.append(len(moves))
                moves += move
            completions.append(moves)
            skip.append(slipped)
        return prompts, completions, skip
    raise ValueError(f"unknown data kind {recipe.data!r}; choose clean, repair, detour, noisy, flagged or privileged")


# --------------------------------------------------------------------------------------------
# measuring and training to a target
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def accuracies(model, tokenizer, task: Task, *, max_new_tokens: int, n: int = 256, samples: int = 4,
               seed: int = 10_000, template: str = "{prompt}") -> dict[str, float]:
    """Greedy accuracy and sampled pass@1 (temperature 1, ``samples`` per prompt) on ``n`` held-out prompts
    (shown through ``template``, e.g. :data:`PRIVILEGED_TEMPLATE`)."""
    examples = task.examples(n, seed=seed, split="eval")
    prompts = [template.format(prompt=e.prompt, answer=e.answer) for e in examples]
    greedy = sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    sampled = sample(model, tokenizer, prompts, num_generations=samples, max_new_tokens=max_new_tokens,
                     temperature=1.0, seed=seed)
    paired = [examples[i] for i in sampled.prompt_index_B.tolist()]
    return {"greedy": sum(task.rewards(greedy.completions, examples)) / n,
            "sampled": sum(task.rewards(sampled.completions, paired)) / len(paired)}


def _met(recipe: Recipe, acc: dict[str, float]) -> bool:
    return ((recipe.min_greedy is None or acc["greedy"] >= recipe.min_greedy)
            and (recipe.min_sampled is None or acc["sampled"] >= recipe.min_sampled)
            and (recipe.max_sampled is None or acc["sampled"] <= recipe.max_sampled)
            and (recipe.mix_min_sampled is None or acc["mix_sampled"] >= recipe.mix_min_sampled)
            and (recipe.mix_max_sampled is None or acc["mix_sampled"] <= recipe.mix_max_sampled)
            and (recipe.privileged_min_sampled is None or acc["privileged_sampled"] >= recipe.privileged_min_sampled)
            and (recipe.flagged_max_sampled is None or acc["flagged_sampled"] <= recipe.flagged_max_sampled))


def train_to_target(model, tokenizer, task: Task, recipe: Recipe, *, max_new_tokens: int, seed: int = 0,
                    progress: bool = True, desc: str = "sft") -> dict:
    """Supervised fine-tuning with ``recipe``'s data until its target holds at a check (AdamW, constant lr
    after a 20-step warm-up, gradients clipped to norm 1). Returns steps, seconds, the accuracies at
    every check and whether the target was reached; the model is left at the stopping point."""
    checks, start = [], time.perf_counter()
    with torch.random.fork_rng(devices=[]), num_threads(1):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.98))
        bar = tqdm(range(1, recipe.max_steps + 1), desc=desc, disable=not progress, leave=False)
        reached, step = False, 0
        for step in bar:
            model.train()
            prompts, completions, skip = training_batch(task, recipe, recipe.batch_size, seed * 1_000_003 + step)
            rollouts = build_rollouts(tokenizer, prompts, completions)
            mask_BT = rollouts.mask_BT.clone()
            for i, positions in enumerate(skip):
                mask_BT[i, positions] = False  # no loss on the repair prefix or on slipped moves
            logp_BT = token_logprobs(completion_logits(model, rollouts), rollouts.tokens_BT)
            loss, _ = sft_cross_entropy(logp_BT, mask_BT)
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * min(1.0, step / 20)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % recipe.check_every == 0:
                model.eval()
                acc = accuracies(model, tokenizer, task, max_new_tokens=max_new_tokens)
                if recipe.mix_task:
                    mixed = accuracies(model, tokenizer, get_task(recipe.mix_task), max_new_tokens=max_new_tokens)
                    acc.update(mix_greedy=mixed["greedy"], mix_sampled=mixed["sampled"])
                if recipe.data == "privileged":
                    shown = accuracies(model, tokenizer, task, max_new_tokens=max_new_tokens, template=PRIVILEGED_TEMPLATE)
                    acc.update(privileged_greedy=shown["greedy"], privileged_sampled=shown["sampled"])
                if recipe.data == "flagged":
                    flagged = accuracies(model, tokenizer, task, max_new_tokens=max_new_tokens,
                                         template=FlagTask.FLAG + "{prompt}")
                    acc.update(flagged_greedy=flagged["greedy"], flagged_sampled=flagged["sampled"])
                checks.append({"step": step, **acc})
                bar.set_postfix(loss=f"{loss.item():.3f}", greedy=f"{acc['greedy']:.2f}", sampled=f"{acc['sampled']:.2f}")
                if _met(recipe, acc):
                    reached = True
                    break
        model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 2), "reached": reached,
            "final": checks[-1] if checks else None, "checks": checks}


# --------------------------------------------------------------------------------------------
# building and caching a setting's pair
# --------------------------------------------------------------------------------------------


def build_setting(name: str, out_dir: str | os.PathLike, *, seed: int = 0, progress: bool = True) -> dict:
    """Train the teacher of setting ``name`` to its target, then the student to its warm-start target;
    save both with the tokenizer under ``out_dir/{teacher,student,tokenizer}`` and ``out_dir/info.json``.
    A target not reached within ``max_steps`` is an error naming the last accuracies."""
    setting = get_setting(name)
    task = get_task(setting.task)
    tokenizer = build_char_tokenizer()
    out_dir = Path(out_dir)
    info: dict = {"setting": name, "task": setting.task, "seed": seed, "version": WORLDS_VERSION,
                  "torch": torch.__version__, "about": setting.about}
    for role, role_seed in (("teacher", seed), ("student", seed + 1)):
        if role == "teacher" and setting.teacher_of:
            shared = ensure_setting(setting.teacher_of, seed=seed, progress=progress,
                                    cache_dir=None if out_dir.parent == ASSETS_DIR else out_dir.parent)
            info["teacher"] = {**shared["info"]["teacher"], "teacher_of": setting.teacher_of}
            continue
        recipe: Recipe | None = getattr(setting, role)
        if recipe is None:
            info[role] = None
            continue
        model = build_tiny_model(recipe.size, tokenizer, seed=role_seed, **recipe.config)
        log = train_to_target(model, tokenizer, task, recipe, max_new_tokens=setting.max_new_tokens, seed=role_seed,
                              progress=progress, desc=f"{name} {role}")
        if not log["reached"]:
            raise RuntimeError(f"setting {name}: the {role} did not reach its target within {recipe.max_steps} steps "
                               f"(last check: {log['final']}); change its recipe in opd_mini/experiments/worlds.py")
        model.save_pretrained(out_dir / role)
        tokenizer.save_pretrained(out_dir / role)
        info[role] = {"recipe": asdict(recipe), "parameters": num_parameters(model), **log}
    tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def get_setting(name: str) -> Setting:
    if name == "counter_example":
        return Setting(name=name, task="reverse:5", teacher=Recipe(), student=Recipe(size="student"), max_new_tokens=8,
                       about="reversal with a near-perfect teacher (the tiny world's shipped pair): the documented "
                             "counter-example, where continued SFT on teacher samples wins")
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; choose from {', '.join(['counter_example', *SETTINGS])}")
    return SETTINGS[name]


def _paths(root: Path) -> dict:
    info = json.loads((root / "info.json").read_text())
    shared = (info["teacher"] or {}).get("teacher_of")
    teacher = root.parent / f"{shared}-seed{info['seed']}-v{WORLDS_VERSION}" / "teacher" if shared else root / "teacher"
    return {"teacher": str(teacher) if info["teacher"] is not None else None, "student": str(root / "student"), "tokenizer": str(root / "tokenizer"),
            "dir": str(root), "info": info}


def ensure_setting(name: str, *, seed: int = 0, cache_dir: str | os.PathLike | None = None, force: bool = False,
                   progress: bool = True) -> dict:
    """Paths of setting ``name``'s teacher, student and tokenizer (``save_pretrained`` directories) and its
    ``info``: the shipped pair when it matches, else the cached one, else built now (and cached)."""
    if name == "counter_example":
        paths = ensure_tiny_models(cache_dir, task="reverse:5", seed=seed, force=force, progress=progress)
        return {**paths, "info": {"setting": name, "task": "reverse:5", **paths["info"]}}
    get_setting(name)
    key = f"{name}-seed{seed}-v{WORLDS_VERSION}"
    if not force and cache_dir is None and (ASSETS_DIR / key / "info.json").exists():
        return _paths(ASSETS_DIR / key)
    root = Path(cache_dir) if cache_dir is not None else Path(
        os.environ.get("OPD_MINI_CACHE", Path.home() / ".cache" / "opd_mini")) / "worlds"
    target = root / key
    if not force and (target / "info.json").exists():
        return _paths(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        print(f"building the {name} setting's teacher and student (seed {seed}) in {target}", file=sys.stderr)
        build_setting(name, tmp, seed=seed, progress=progress)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_mini.experiments worlds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings to build")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="cache directory (default: ~/.cache/opd_mini/worlds)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a pair exists")
    parser.add_argument("--write-assets", action="store_true", help=f"(re)build the pairs shipped in {ASSETS_DIR}")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def body() -> int:
        names = [s.strip() for s in args.settings.split(",") if s.strip()]
        for name in names:
            get_setting(name)
        for name in names:
            if args.write_assets:
                target = ASSETS_DIR / f"{name}-seed{args.seed}-v{WORLDS_VERSION}"
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
                tmp.chmod(0o755)
                build_setting(name, tmp, seed=args.seed, progress=not args.no_progress)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
                paths = _paths(target)
            else:
                paths = ensure_setting(name, seed=args.seed, cache_dir=args.out, force=args.force,
                                       progress=not args.no_progress)
            print(describe(name, paths))
        return 0

    return run_cli(body)


def describe(name: str, paths: dict) -> str:
    """What a built setting is and what its models measured when they were built (paths: :func:`ensure_setting`'s)."""
    info = paths["info"]
    lines = [f"{name} ({info['task']}): {info.get('about', '')}"]
    for role in ("teacher", "student"):
        if (r := info[role]) is not None:
            final = r.get("final") or {"greedy": r.get("greedy_accuracy", float("nan")), "sampled": float("nan")}
            lines.append(f"  {role:8s} {r['parameters']:8,d} params, {r.get('steps', '?')} steps, greedy "
                         f"{final['greedy']:.3f}, sampled pass@1 {final['sampled']:.3f}  {paths[role]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
