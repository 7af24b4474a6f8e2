"""The slippery environment (--slip_prob) and the route task: the slip's law against its formula, the loss mask,
the route's verifier against a brute-force walk, and the refusals."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from opd_mini.sampler import Slip, apply_slip, sample, slip_for
from opd_mini.tasks import RouteTask, WalkTask, get_task
from tests.helpers import loop_args


def _walk(prompt: str, moves: str) -> bool:
    """Brute force: follow the moves, tick off the waypoints in order, end on the last."""
    stops = [int(c) for c in prompt[:-1].split(">")]
    pos, visited = stops[0], []
    for m in moves:
        pos += {"L": -1, "R": 1}[m]
        visited.append(pos)
    i = 0
    for p in visited:
        if i < len(stops) - 1 and p == stops[i + 1]:
            i += 1
    return i == len(stops) - 1 and pos == stops[-1]


def test_route_reward_equals_a_brute_force_walk_on_every_short_move_string():
    task = get_task("route:5:2")
    examples = task.examples(40, seed=0)
    for e in examples:
        assert task.reward(e.answer, e) == 1.0 and len(e.answer) == sum(
            abs(b - a) for a, b in zip(RouteTask.stops(e.prompt), RouteTask.stops(e.prompt)[1:]))
        for n in range(0, 7):
            for moves in itertools.product("LR", repeat=n):
                assert task.reward("".join(moves), e) == float(_walk(e.prompt, moves)), (e.prompt, moves)
        assert task.reward(e.answer + "x", e) == 0.0 and task.reward(e.answer + "<eos>junk", e) == 1.0


def test_route_with_one_waypoint_is_the_walk_task():
    route, walk = get_task("route:10:1"), get_task("walk:10")
    rng = random.Random(0)
    for e in walk.examples(50, seed=3):
        for _ in range(5):
            moves = "".join(rng.choice("LR") for _ in range(rng.randint(0, 12)))
            assert route.reward(moves, e) == walk.reward(moves, e)


def test_next_move_leads_home_from_anywhere():
    """From any prefix of moves, following next_move completes the route, by the shortest way back."""
    rng = random.Random(1)
    for e in get_task("route:10:4").examples(30, seed=0):
        for _ in range(5):
            moves = "".join(rng.choice("LR") for _ in range(rng.randint(0, 8)))
            while (m := RouteTask.next_move(e.prompt, moves)) is not None:
                moves += m
                assert len(moves) < 80
            assert RouteTask.legs_done(e.prompt, moves)[1]
        assert RouteTask.next_move(e.prompt, e.answer) is None


@pytest.mark.parametrize("spec, message", [("route:10:0", "K >= 1"), ("route:11:2", "2 <= N <= 10"),
                                           ("route:10", "route:N:K"), ("route:a:b", "route:N:K")])
def test_bad_route_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        get_task(spec)


def test_slip_moves_of_tasks():
    assert WalkTask.slip_moves == RouteTask.slip_moves == ("L", "R")
    assert get_task("reverse:3").slip_moves is None
    assert get_task("walk:10+route:10:2").slip_moves == ("L", "R")
    assert get_task("walk:10+reverse:3").slip_moves is None


def test_slip_for_resolves_single_tokens_and_refuses_the_rest(char_tokenizer):
    slip = slip_for(char_tokenizer, ("L", "R"), 0.1)
    L, R = (char_tokenizer.convert_tokens_to_ids(c) for c in "LR")
    assert slip == Slip(0.1, {L: R, R: L})
    assert slip_for(char_tokenizer, ("L", "R"), 0.0) is None
    with pytest.raises(ValueError, match="no moves that can slip"):
        slip_for(char_tokenizer, None, 0.1)
    with pytest.raises(ValueError, match="one token each"):
        slip_for(char_tokenizer, ("LL", "R"), 0.1)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Slip(bad, {L: R, R: L})


def test_apply_slip_swaps_only_partners_of_live_rows():
    slip = Slip(0.5, {3: 4, 4: 3})
    y = torch.tensor([3, 4, 5, 3] * 2500)
    live = torch.ones_like(y, dtype=torch.bool)
    live[-4:] = False
    g = torch.Generator().manual_seed(0)
    out, slipped = apply_slip(y, slip, live, g)
    assert not slipped[y == 5].any() and not slipped[~live].any()
    assert torch.equal(out[slipped], torch.where(y[slipped] == 3, 4, 3)) and torch.equal(out[~slipped], y[~slipped])
    n = int(((y != 5) & live).sum())
    assert abs(int(slipped.sum()) - n / 2) < 4 * (n / 4) ** 0.5  # Binomial(n, 1/2) within 4 standard deviations


def test_emitted_first_token_follows_the_slipped_law(tiny_model, char_tokenizer):
    """P(emit L) = (1 − ε) p_L + ε p_R and the same for R; other tokens are untouched: 20,000 first tokens of one
    prompt against the exact probabilities (within 4 standard deviations), and the slipped mask is exactly where
    a move was emitted against the draw."""
    tok, eps, n = char_tokenizer, 0.3, 20_000
    with torch.no_grad():  # put real mass on L and R
        L, R = (tok.convert_tokens_to_ids(c) for c in "LR")
        tiny_model.lm_head.weight[L] += 4 * tiny_model.model.norm.weight.sign()
        tiny_model.lm_head.weight[R] += 2 * tiny_model.model.norm.weight.sign()
    r = sample(tiny_model, tok, ["3>7="], num_generations=n, max_new_tokens=1, seed=0, use_chat_template=False,
               slip=slip_for(tok, ("L", "R"), eps))
    with torch.no_grad():
        p = tiny_model(input_ids=r.input_ids_BL[:1, :r.prompt_len]).logits[0, -1, :len(tok)].softmax(-1).double()
    expected = {L: (1 - eps) * p[L] + eps * p[R], R: (1 - eps) * p[R] + eps * p[L]}
    first = r.tokens_BT[:, 0]
    for token, q in expected.items():
        assert abs(float((first == token).double().mean()) - float(q)) < 4 * float((q * (1 - q) / n) ** 0.5)
    slipped = r.slipped_BT[:, 0]
    assert not slipped[(first != L) & (first != R)].any()
    share = float(slipped[(first == L) | (first == R)].double().mean())
    moves = float(p[L] + p[R])
    assert abs(share - eps) < 4 * (eps * (1 - eps) / (n * moves)) ** 0.5
    # the behaviour log-prob is the emitted token's, as a forward pass of the sequence gives it
    assert torch.allclose(r.behaviour_logp_BT[:, 0], p.log()[first].float(), atol=1e-5)


def test_slips_need_the_decode_sampler(tiny_model, char_tokenizer):
    with pytest.raises(ValueError, match="decode"):
        sample(tiny_model, char_tokenizer, ["3>7="], method="generate", slip=slip_for(char_tokenizer, ("L", "R"), 0.1))


def test_a_sample_without_slips_is_unchanged(tiny_model, char_tokenizer):
    a = sample(tiny_model, char_tokenizer, ["3>7="], num_generations=8, max_new_tokens=6, seed=4)
    b = sample(tiny_model, char_tokenizer, ["3>7="], num_generations=8, max_new_tokens=6, seed=4, slip=None)
    assert torch.equal(a.tokens_BT, b.tokens_BT) and a.slipped_BT is None and b.slipped_BT is None


def test_finish_batch_leaves_slipped_tokens_out_of_the_loss(tiny_model, char_tokenizer):
    from types import SimpleNamespace

    from opd_mini.config import TrainConfig
    from opd_mini.rollouts import finish_batch

    tok = char_tokenizer
    with torch.no_grad():
        for c, w in zip("LR", (3, 3)):
            tiny_model.lm_head.weight[tok.convert_tokens_to_ids(c)] += w * tiny_model.model.norm.weight.sign()
    task = get_task("walk:10")
    examples = task.examples(4, seed=0)
    r = sample(tiny_model, tok, [e.prompt for e in examples], num_generations=4, max_new_tokens=8, seed=1,
               slip=slip_for(tok, ("L", "R"), 0.5))
    assert r.slipped_BT.any()
    cfg = TrainConfig(task="walk:10", slip_prob=0.5, max_new_tokens=8, num_generations=4)
    done = finish_batch(cfg, SimpleNamespace(student=tiny_model, tokenizer=tok), r, examples, task, torch.device("cpu"))
    assert torch.equal(done.mask_BT, r.mask_BT & ~r.slipped_BT)


@pytest.mark.parametrize("flags, message", [
    (dict(task="reverse:3", slip_prob=0.1), "no moves that can slip"),
    (dict(task="walk:10", slip_train="false"), "no effect without slips"),
    (dict(task="walk:10", slip_prob=0.1, sampler="generate"), "needs --sampler decode"),
    (dict(task="walk:10", slip_prob=1.0), "slip_prob"),
    (dict(task="walk:10", slip_prob=0.1, eval_task="reverse:3"), "does not slip the moves"),
])
def test_bad_slip_options_are_one_line_and_exit_2(flags, message, tiny_student_dir, tiny_model_dir, tmp_path, capsys):
    from opd_mini import train

    out = tmp_path / "run"
    code = train.main(loop_args(tiny_student_dir, tiny_model_dir, out, **flags))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (out / "metrics.jsonl").exists()
