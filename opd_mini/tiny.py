"""The offline tiny world: a character-level tokenizer, tiny Llama models, and a trained teacher/student pair.

Nothing here needs a network. The tokenizer is a real ``PreTrainedTokenizerFast`` (one token per
character), the models are ``LlamaForCausalLM`` built from a config, and everything is saved with
``save_pretrained``, so the rest of opd_mini treats these directories exactly like Hugging Face model
ids: swapping in real models is a change of path, not of code.

:func:`ensure_tiny_models` returns a trained tiny **teacher** (SFT from scratch on a built-in task)
and a smaller **student** briefly SFT-warm-started on the same task, so that it has support under the
teacher (on-policy distillation from a random student does not learn) but plenty of room to improve.
Results are cached by recipe; the default recipe also ships in the package (``opd_mini/assets``).

Command line (regenerates a pair and prints accuracies and times)::

    python -m opd_mini.tiny --out runs/tiny [--task add:3] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd_mini.cli import run_cli
from opd_mini.losses import sft_cross_entropy, token_logprobs
from opd_mini.sampler import build_rollouts, sample
from opd_mini.forward import completion_logits
from opd_mini.tasks import Task, get_task

# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

#: Special tokens, in id order: pad = 0, bos = 1, eos = 2, unk = 3.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
#: Printable ASCII (space .. ~) plus newline and tab: ids 4 .. 100. Anything else maps to <unk>.
CHARS = tuple(chr(i) for i in range(32, 127)) + ("\n", "\t")


def build_char_tokenizer(model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast``: every character is one token (101 tokens in all).

    Built from a ``tokenizers`` WordLevel model over single characters (a pre-tokenizer splits the text
    into characters, a Fuse decoder joins them back without spaces). The vocabulary is fixed, so ids
    are the same everywhere; no BOS/EOS is added when encoding (training data appends EOS itself) and
    there is no chat template. Round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        clean_up_tokenization_spaces=False, model_max_length=model_max_length, padding_side="left",
    )


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

#: Architecture of each tiny size: layers, hidden width, heads, MLP width.
TINY_SIZES: dict[str, dict] = {
    "teacher": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256),
    "student": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128),
    # the benchmark workload: a 2-layer hidden-64 model over a big vocabulary (pass vocab_size=151_936)
    "bench": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256),
}


def tiny_config(size: str = "teacher", vocab_size: int = len(SPECIAL_TOKENS) + len(CHARS), **overrides) -> LlamaConfig:
    """A tiny ``LlamaConfig`` of one of :data:`TINY_SIZES`; ``overrides`` replace any config field.

    Context length 128 positions; untied input/output embeddings; special-token ids those of
    :func:`build_char_tokenizer` (pad 0, bos 1, eos 2).
    """
    if size not in TINY_SIZES:
        raise ValueError(f"unknown tiny size {size!r}; choose one of {sorted(TINY_SIZES)}")
    fields = dict(vocab_size=vocab_size, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  attention_dropout=0.0, initializer_range=0.02, use_cache=True, **TINY_SIZES[size])
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_model(size: str, tokenizer, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A randomly initialised float32 tiny Llama for ``tokenizer`` (vocabulary = ``len(tokenizer)``).

    ``overrides`` replace config fields (see :func:`tiny_config`). Deterministic in ``seed``; the global
    RNG is left untouched.
    """
    fields = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = tiny_config(size, **{**fields, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float()


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def num_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (None: leave as is).

    Tiny models run fastest on one thread: their matrices are too small to split, and on a shared
    machine idle worker threads spin and steal time from the one doing the work.
    """
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# supervised training and evaluation on a task
# --------------------------------------------------------------------------------------------


def sft_train(model, tokenizer, task: Task, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
              warmup: int = 20, min_lr_ratio: float = 0.1, seed: int = 0, progress: bool = True,
              desc: str = "sft", threads: int | None = 1) -> list[float]:
    """Supervised fine-tuning on ``task``'s (prompt, answer + EOS) pairs, fresh examples every step.

    AdamW with a linear warm-up and a cosine decay to ``min_lr_ratio · lr``; the loss is the per-token
    mean cross-entropy on the answer tokens (:func:`opd_mini.losses.sft_cross_entropy`), gradients
    clipped to norm 1. Deterministic in ``seed``; the global RNG is left untouched. Runs with
    ``threads`` torch threads (see :func:`num_threads`). Returns the loss of every step.
    """
    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    losses: list[float] = []
    with torch.random.fork_rng(devices=[]), num_threads(threads):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
        model.train()
        bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
        for step in bar:
            examples = task.examples(batch_size, seed=seed * 1_000_003 + step, split="train")
            rollouts = build_rollouts(tokenizer, [e.prompt for e in examples], [e.answer for e in examples])
            logp_BT = token_logprobs(completion_logits(model, rollouts), rollouts.tokens_BT)  # (B, T)
            loss, _ = sft_cross_entropy(logp_BT, rollouts.mask_BT)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
    return losses


def max_answer_tokens(task: Task, tokenizer, n: int = 256) -> int:
    """Longest answer of ``n`` examples in tokens, plus one for EOS (a safe ``max_new_tokens``)."""
    answers = [e.answer for e in task.examples(n, seed=12345)]
    return 1 + max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)


def greedy_accuracy(model, tokenizer, task: Task, *, n: int = 512, seed: int = 10_000, batch_size: int = 256,
                    max_new_tokens: int | None = None) -> float:
    """Exact-match accuracy of greedy decoding on ``n`` held-out examples of ``task`` drawn with ``seed``."""
    examples = task.examples(n, seed=seed, split="eval")
    max_new_tokens = max_new_tokens or max_answer_tokens(task, tokenizer)
    correct = 0.0
    for start in range(0, n, batch_size):
        batch = examples[start:start + batch_size]
        rollouts = sample(model, tokenizer, [e.prompt for e in batch], max_new_tokens=max_new_tokens, temperature=0.0)
        correct += sum(task.rewards(rollouts.completions, batch))
    return correct / max(1, n)


# --------------------------------------------------------------------------------------------
# the trained teacher / warm-started student pair, cached by recipe
# --------------------------------------------------------------------------------------------

#: The default task of the tiny world: long enough that a small student has room to improve.
DEFAULT_TASK = "reverse:5"
#: Bump when the recipe below changes, so caches and shipped assets are not reused by mistake.
RECIPE_VERSION = 2
#: Shipped checkpoints (regenerate with ``python -m opd_mini.tiny --write-assets``).
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "tiny"


def tiny_recipe(task: str) -> dict:
    """Training recipe of the teacher (from scratch) and the warm-started student for ``task``.

    ``info.json`` of a trained pair records its accuracies and training times. On reverse:5 the teacher
    reaches 100 % greedy exact match after 300 steps; the student is stopped after 240 steps at ~47 %,
    on the steep part of its learning curve (600 steps would reach 100 %), so continued training has
    room to show.

    Addition is harder: models sit on a long plateau (~1 %) before they suddenly learn to carry. The
    teacher needs 800 steps of 128 (99.6 % on add:3). No student recipe found so far lands
    reliably between the plateau and mastery: the width-32 student was still at 1 % after 2,000 steps
    (width 48: 10 % after 1,500); a student of the teacher's width (``config`` overrides) reached
    26 % after 600 steps with one seed and 1 % with another. Prefer reverse:N for the tiny-world demo.
    ``config`` holds overrides of the :data:`TINY_SIZES` architecture.
    """
    if task.startswith("add:"):
        return dict(teacher=dict(steps=800, batch_size=128, lr=5e-3, config={}),
                    student=dict(steps=600, batch_size=64, lr=3e-3,
                                 config=dict(hidden_size=64, intermediate_size=256)))
    return dict(teacher=dict(steps=300, batch_size=64, lr=3e-3, config={}),
                student=dict(steps=240, batch_size=64, lr=3e-3, config={}))


def _key(task: str, seed: int) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in task).strip("-")
    return f"{slug}-seed{seed}-v{RECIPE_VERSION}"


def default_cache_dir() -> Path:
    """``$OPD_MINI_CACHE`` if set, else ``~/.cache/opd_mini``; the tiny pairs live in its ``tiny/``."""
    return Path(os.environ.get("OPD_MINI_CACHE", Path.home() / ".cache" / "opd_mini")) / "tiny"


def _paths(root: Path, info: dict | None = None) -> dict:
    out = dict(teacher=str(root / "teacher"), student=str(root / "student"), tokenizer=str(root / "tokenizer"),
               dir=str(root))
    if info is not None:
        out["task"] = info["task"]
        out["info"] = info
    return out


def _read_info(root: Path) -> dict | None:
    try:
        return json.loads((root / "info.json").read_text())
    except (OSError, ValueError):
        return None


def shipped_tiny_models(task: str = DEFAULT_TASK, seed: int = 0) -> dict | None:
    """The paths dict of the checkpoints shipped in the package for this recipe, or None if there are none."""
    root = ASSETS_DIR / _key(task, seed)
    info = _read_info(root)
    return _paths(root, info) if info is not None else None


def train_tiny_pair(out_dir: str | os.PathLike, *, task: str = DEFAULT_TASK, seed: int = 0,
                    progress: bool = True, eval_examples: int = 512) -> dict:
    """Train the tiny teacher from scratch and the warm-started student; save both (+ tokenizer) in ``out_dir``.

    Layout: ``out_dir/{tokenizer,teacher,student}`` (``save_pretrained`` directories; the model
    directories hold the tokenizer too) and ``out_dir/info.json`` with the recipe, sizes, greedy
    exact-match accuracies on ``eval_examples`` fresh draws and training times. Returns the info dict.
    """
    out_dir = Path(out_dir)
    task_obj = get_task(task)
    recipe = tiny_recipe(task)
    tokenizer = build_char_tokenizer()
    info: dict = dict(task=task, seed=seed, recipe_version=RECIPE_VERSION, recipe=recipe,
                      torch=torch.__version__, eval_examples=eval_examples)
    for role, size, role_seed in (("teacher", "teacher", seed), ("student", "student", seed + 1)):
        train_args = dict(recipe[role])
        model = build_tiny_model(size, tokenizer, seed=role_seed, **train_args.pop("config"))
        start = time.perf_counter()
        losses = sft_train(model, tokenizer, task_obj, seed=role_seed, progress=progress,
                           desc=f"tiny {role} ({task})", **train_args)
        seconds = time.perf_counter() - start
        with num_threads(1):
            accuracy = greedy_accuracy(model, tokenizer, task_obj, n=eval_examples)
        model.save_pretrained(out_dir / role)
        tokenizer.save_pretrained(out_dir / role)
        info[role] = dict(size=size, parameters=num_parameters(model), train_seconds=round(seconds, 2),
                          final_loss=round(losses[-1], 4), greedy_accuracy=accuracy)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def ensure_tiny_models(cache_dir: str | os.PathLike | None = None, *, task: str = DEFAULT_TASK, seed: int = 0,
                       force: bool = False, progress: bool = True, use_assets: bool = True) -> dict:
    """Paths of a trained tiny teacher and a warm-started student for ``task``; trains them if missing.

    Returns ``dict(teacher=path, student=path, tokenizer=path, dir=path, task=spec, info=dict)`` where
    the paths are ``save_pretrained`` directories (load them with ``from_pretrained`` like any model id)
    and ``info`` is the pair's ``info.json`` (accuracies, sizes, times).

    Lookup order: the checkpoints shipped in the package (when ``cache_dir`` is None and the recipe
    matches), then ``cache_dir/<task>-seed<seed>-v<version>`` (default :func:`default_cache_dir`); a
    missing pair is copied from the shipped assets when they match, else trained (seconds on a CPU for
    reverse:5) and written atomically, so repeated calls are instant.
    ``force=True`` retrains.
    """
    get_task(task)  # an unknown spec is an error before anything is trained
    key = _key(task, seed)
    shipped = shipped_tiny_models(task, seed) if use_assets and not force else None
    if cache_dir is None and shipped is not None:
        return shipped

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / key
    info = _read_info(target)
    if info is not None and not force:
        return _paths(target, info)

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    tmp.chmod(0o755)
    try:
        if shipped is not None:
            shutil.copytree(shipped["dir"], tmp, dirs_exist_ok=True)
        else:
            print(f"no tiny teacher/student for task {task} in {root}: training a new pair on it first (a teacher "
                  "from scratch, then a briefly warm-started student; its training split only)", file=sys.stderr)
            train_tiny_pair(tmp, task=task, seed=seed, progress=progress)
        if target.exists():
            if not force and _read_info(target) is not None:  # another process finished first
                shutil.rmtree(tmp)
                return _paths(target, _read_info(target))
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _paths(target, _read_info(target))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m opd_mini.tiny", description=(
        "Train (or find cached) the tiny offline teacher and warm-started student; print accuracies and times."))
    parser.add_argument("--out", default=None, help="cache directory (the pair goes to OUT/<task>-seed<seed>-v<n>); "
                        f"default {default_cache_dir()} or the shipped checkpoints")
    parser.add_argument("--task", default=DEFAULT_TASK, help="built-in task spec, e.g. reverse:5 or add:3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="retrain even if a cached pair exists")
    parser.add_argument("--write-assets", action="store_true",
                        help=f"(re)generate the checkpoints shipped in the package, under {ASSETS_DIR}")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.write_assets:
        target = ASSETS_DIR / _key(args.task, args.seed)
        ASSETS_DIR.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=ASSETS_DIR))
        tmp.chmod(0o755)
        train_tiny_pair(tmp, task=args.task, seed=args.seed, progress=not args.no_progress)
        shutil.rmtree(target, ignore_errors=True)  # swap in the new pair: readers never see a half-written one
        os.replace(tmp, target)
        paths = _paths(target, _read_info(target))
    else:
        paths = ensure_tiny_models(args.out, task=args.task, seed=args.seed, force=args.force,
                                   progress=not args.no_progress)
    info = paths["info"]
    print(f"tiny world for task {info['task']} (seed {info['seed']}), ready in {time.perf_counter() - start:.1f} s")
    print(f"{'role':8s} {'params':>8s} {'train s':>8s} {'greedy exact match':>19s}  path")
    for role in ("teacher", "student"):
        r = info[role]
        print(f"{role:8s} {r['parameters']:8,d} {r['train_seconds']:8.1f} {r['greedy_accuracy']:19.1%}  {paths[role]}")
    print(f"tokenizer: {paths['tokenizer']}")
    return paths


def _cli() -> int:
    main()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(_cli))
