"""The toy tabular world: indices, policies, exact quantities against each other and against sampling."""

import pytest
import torch

from opd_mini import losses
from toy import policies
from toy.policies import categorical, frozen_table
from toy.world import (
    LowRankPolicy,
    MLPPolicy,
    Policy,
    Task,
    TablePolicy,
    World,
    copy_policy,
    expectation,
    make_student,
    make_tasks,
    make_teacher,
    mc_expectation,
    sample,
    sequence_distribution,
    sequence_kl,
    sequence_logprobs,
    state_reach_probs,
    success,
)

KINDS = ["table", "lowrank", "mlp"]


@pytest.fixture
def world():
    return World(V=3, T=4, P=4)


def student(world, kind, seed=0, **kw):
    return make_student(world, kind, generator=torch.Generator().manual_seed(seed), **kw)


def test_state_index_is_a_bijection_on_prefixes(world):
    prefixes_ST, pos_S = world.state_prefixes(), world.state_positions()
    assert prefixes_ST.shape == (world.num_states, world.T) and world.num_states == 1 + 3 + 9 + 27
    idx_ST = world.state_index(prefixes_ST)
    # the state of position t(s) of prefix s is s itself
    assert torch.equal(idx_ST[torch.arange(world.num_states), pos_S], torch.arange(world.num_states))
    # every (sequence, position) maps to the state of its prefix; distinct prefixes, distinct states
    seqs = world.sequences()
    assert seqs.shape == (world.num_sequences, world.T)
    idx_NT = world.state_index(seqs)
    for t in range(world.T):
        assert idx_NT[:, t].unique().numel() == world.V ** t
        assert (pos_S[idx_NT[:, t]] == t).all()


@pytest.mark.parametrize("kind", KINDS)
def test_probabilities_sum_to_one(world, kind):
    pi = student(world, kind)
    dist_PN = sequence_distribution(pi)
    assert dist_PN.shape == (world.P, world.num_sequences)
    torch.testing.assert_close(dist_PN.sum(-1), torch.ones(world.P))
    reach_PS = state_reach_probs(pi)
    for t in range(world.T):  # the prefixes of each length carry total probability 1
        torch.testing.assert_close(reach_PS[:, world.offset(t): world.offset(t + 1)].sum(-1), torch.ones(world.P))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_are_causal_and_state_logits_agree(world, kind):
    pi = student(world, kind)
    g = torch.Generator().manual_seed(1)
    prompts_B = torch.randint(world.P, (32,), generator=g)
    a_BT = torch.randint(world.V, (32, world.T), generator=g)
    b_BT = a_BT.clone()
    b_BT[:, 2:] = torch.randint(world.V, (32, world.T - 2), generator=g)
    la, lb = pi.logits(prompts_B, a_BT), pi.logits(prompts_B, b_BT)
    assert la.shape == (32, world.T, world.V)
    torch.testing.assert_close(la[:, :3], lb[:, :3])  # position t sees tokens < t only
    torch.testing.assert_close(pi.state_logits(), Policy.state_logits(pi))  # override = generic route
    # the no-grad routes read the same logits: every state at once, one position at a time, a frozen table
    torch.testing.assert_close(pi.state_table(), Policy.state_logits(pi).detach(), rtol=0, atol=1e-6)
    for t in range(world.T):
        torch.testing.assert_close(pi.next_logits(prompts_B, a_BT, t), la[:, t], rtol=0, atol=1e-6)
    table = frozen_table(pi)
    assert isinstance(table, TablePolicy) and not any(p.requires_grad for p in table.parameters())
    torch.testing.assert_close(table.logits(prompts_B, a_BT), la.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_frequencies_match_exact_probabilities(world, kind):
    pi = student(world, kind)
    n = 40_000
    prompts_B = torch.full((n,), 2, dtype=torch.long)
    tokens_BT = sample(pi, prompts_B, torch.Generator().manual_seed(3))
    code_B = (tokens_BT * world.V ** torch.arange(world.T - 1, -1, -1)).sum(-1)
    freq_N = torch.bincount(code_B, minlength=world.num_sequences).double() / n
    p_N = sequence_distribution(pi, prompts=[2])[0].double().detach()
    z = (freq_N - p_N) / (p_N * (1 - p_N) / n).sqrt()
    assert z.abs().max() < 4.5, z.abs().max()  # 81 cells, each |z| < 4.5


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_reads_the_state_table_or_one_position_at_a_time_alike(world, kind, monkeypatch):
    """Both routes of ``sample`` (a state table walked along the prefix index, or one position's logits at a
    time) draw the same tokens from the same generator."""
    pi = student(world, kind)
    prompts_B = torch.randint(world.P, (64,), generator=torch.Generator().manual_seed(4))
    drawn = []
    for rows in (10 ** 9, 0):  # every policy reads its table; only table-like policies do
        monkeypatch.setattr(policies, "TABLE_ROWS_PER_SAMPLE", rows)
        drawn.append(sample(pi, prompts_B, torch.Generator().manual_seed(9)))
    assert torch.equal(*drawn)


@pytest.mark.parametrize("context", [1, 2])
def test_a_last_token_policy_samples_from_its_step_table_with_the_same_draws(monkeypatch, context):
    """An MLP that reads only the last token is sampled from its (prompt, position, previous token) table: the table
    holds next_logits' values bit for bit, at every batch size, and the draws equal the one-position route's. An MLP
    that reads more (context 2) has no such table."""
    world = World(V=4, T=12, P=5)  # 4^12 states: too many for a state table, so sample takes the step route
    pi = policies.MLPPolicy(world, hidden=16, context=context, generator=torch.Generator().manual_seed(2))
    table = pi.step_table()
    if context != 1:
        assert table is None
        return
    g = torch.Generator().manual_seed(5)
    for B in (1, 7, 64):
        prompts_B, tokens_BT = torch.randint(world.P, (B,), generator=g), torch.randint(world.V, (B, world.T), generator=g)
        for t in range(world.T):
            prev_B = tokens_BT[:, t - 1] if t else torch.full((B,), world.V)
            assert torch.equal(table[prompts_B, t, prev_B], pi.next_logits(prompts_B, tokens_BT, t)), (B, t)
    prompts_B = torch.randint(world.P, (256,), generator=g)
    fast = sample(pi, prompts_B, torch.Generator().manual_seed(9))
    monkeypatch.setattr(policies.MLPPolicy, "step_table", lambda self: None)
    assert torch.equal(fast, sample(pi, prompts_B, torch.Generator().manual_seed(9)))


def test_categorical_is_the_exponential_race_torch_multinomial_runs():
    g = torch.Generator().manual_seed(0)
    probs_BV = torch.softmax(3 * torch.randn(500, 5, generator=g), -1)
    probs_BV[0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0])
    ours = categorical(probs_BV, torch.Generator().manual_seed(1))
    theirs = torch.multinomial(probs_BV, 1, generator=torch.Generator().manual_seed(1)).squeeze(-1)
    assert torch.equal(ours, theirs) and ours[0] == 2
    counts = torch.bincount(categorical(probs_BV[1:2].expand(40_000, 5), g), minlength=5).double() / 40_000
    p = probs_BV[1].double()
    assert ((counts - p).abs() / (p * (1 - p) / 40_000).sqrt().clamp(min=1e-12)).max() < 4.5


@pytest.mark.parametrize("kind", KINDS)
def test_kl_enumeration_equals_dp_with_gradients(world, kind):
    pi = student(world, kind, seed=0)
    q = student(world, "table", seed=1)
    for p_pol, q_pol in ((pi, q), (q, pi)):  # reverse KL(π‖q) and forward KL(q‖π)
        kl_enum = sequence_kl(p_pol, q_pol, method="enum")
        g_enum = torch.autograd.grad(kl_enum, list(pi.parameters()))
        kl_dp = sequence_kl(p_pol, q_pol, method="dp")
        g_dp = torch.autograd.grad(kl_dp, list(pi.parameters()))
        torch.testing.assert_close(kl_enum, kl_dp, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_enum, g_dp):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # a third route: E_π[log π(y) − log q(y)]
    third = expectation(pi, lambda p, y: sequence_logprobs(pi, p, y) - sequence_logprobs(q, p, y))
    torch.testing.assert_close(third, sequence_kl(pi, q), rtol=1e-5, atol=1e-5)
    assert sequence_kl(pi, copy_policy(pi)).abs() < 1e-5


def test_exact_expectation_agrees_with_monte_carlo(world):
    pi, q = student(world, "mlp"), student(world, "table", seed=5)

    def log_ratio(p, y):
        with torch.no_grad():
            return sequence_logprobs(pi, p, y) - sequence_logprobs(q, p, y)

    exact = sequence_kl(pi, q).detach()
    mean, se = mc_expectation(pi, log_ratio, num_samples=20_000, generator=torch.Generator().manual_seed(7))
    assert (mean - exact).abs() < 4 * se, (float(mean), float(exact), float(se))


def test_tasks_teacher_and_success(world):
    g = torch.Generator().manual_seed(0)
    tasks = make_tasks(world, 2, g)
    assert [t.prompts for t in tasks] == [[0, 1], [2, 3]]
    teacher = make_teacher(world, tasks, peak=4.0, noise=0.5, generator=g)
    pi = student(world, "mlp")
    for task in tasks:
        s_teacher = float(success(teacher, task).detach())
        assert s_teacher > 0.8  # peaked on the right answers
        assert float(success(pi, task).detach()) < 0.2  # a random student rarely is
        # the exact-match shortcut equals enumeration with the same rule written as a verifier
        verified = Task(task.name, task.prompts, task.answers_KT,
                        verifier=lambda p, y, t=task: (y == t.answer_for(p)).all(-1))
        torch.testing.assert_close(success(teacher, verified), success(teacher, task))
        # and the Monte Carlo success rate
        mean, se = mc_expectation(teacher, lambda p, y, t=task: t.is_correct(p, y).float(), prompts=task.prompts,
                                  num_samples=8000, generator=g)
        assert abs(float(mean) - s_teacher) < 4 * float(se) + 1e-6


@pytest.mark.parametrize("kind,shared", [("table", False), ("lowrank", True), ("mlp", True)])
def test_shared_parameter_students_share_across_tasks(world, kind, shared):
    """An SFT step on task A's prompts moves task B's logits only when parameters are shared."""
    tasks = make_tasks(world, 2, torch.Generator().manual_seed(0))
    pi = student(world, kind)
    before_B = pi.state_logits()[tasks[1].prompts_K].detach().clone()
    before_A = pi.state_logits()[tasks[0].prompts_K].detach().clone()
    A = tasks[0]
    logp_BT = losses.token_logprobs(pi.logits(A.prompts_K, A.answers_KT), A.answers_KT)
    loss, _ = losses.sft_cross_entropy(logp_BT, torch.ones_like(logp_BT, dtype=torch.bool))
    loss.backward()
    torch.optim.SGD(pi.parameters(), lr=0.5).step()
    with torch.no_grad():
        change_B = (pi.state_logits()[tasks[1].prompts_K] - before_B).abs().max()
        change_A = (pi.state_logits()[tasks[0].prompts_K] - before_A).abs().max()
    assert change_A > 1e-3
    assert (change_B > 1e-3) == shared, float(change_B)


def test_copy_policy_is_frozen_and_equal(world):
    pi = student(world, "lowrank", rank=2)
    frozen = copy_policy(pi)
    assert all(not p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(frozen.state_logits(), pi.state_logits().detach())
    assert isinstance(frozen, LowRankPolicy) and isinstance(student(world, "mlp"), MLPPolicy)
    assert isinstance(student(world, "table"), TablePolicy)
