"""The maths of ``opd_mini.losses`` checked against independent brute-force references.

Every reference below is written with explicit Python loops over batch rows b, positions t and
vocabulary entries v (3-5 tokens), on 0-d float64 tensors so that autograd can differentiate it.
No reference calls the function under test, its private helpers, or a library divergence
(``F.kl_div``, ``F.log_softmax`` ...): the student's log-softmax is rebuilt by hand from its logits.
Losses are compared in value and in their gradient with respect to the student logits.

Default tolerances: the module computes in float32 and the references in float64, so values and
gradients are compared with ``atol=1e-5, rtol=1e-4`` unless a test states otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from opd_mini import losses as L

ATOL, RTOL = 1e-5, 1e-4
FLOOR = -100.0  # the documented clamp of teacher log-probabilities inside reverse-KL terms


# ============================================================================================
# brute-force references (plain loops over b, t, v on scalars)
# ============================================================================================


def ref_log_softmax_row(row):
    """log-softmax of a 1-D tensor, entry by entry: z_v − log Σ_u exp(z_u) (shifted by max for range)."""
    vals = [row[v] for v in range(row.shape[0])]
    m = max(float(x.detach()) for x in vals)
    log_z = m + torch.log(sum(torch.exp(x - m) for x in vals))
    return [x - log_z for x in vals]


def ref_student_logp(z):
    """(B, T, V) logits -> nested lists logp[b][t][v] of 0-d tensors."""
    B, T, _ = z.shape
    return [[ref_log_softmax_row(z[b, t]) for t in range(T)] for b in range(B)]


def ref_token_logp(z, tokens):
    """(B, T) nested list of log π(y_t | c_t) of the given tokens."""
    lp = ref_student_logp(z)
    B, T = tokens.shape
    return [[lp[b][t][int(tokens[b, t])] for t in range(T)] for b in range(B)]


def ref_average(per_position, mask, num_tokens=None):
    """Σ_{b,t} mask_bt · ℓ_bt / N, with N = number of masked-in positions unless given."""
    B, T = mask.shape
    n = num_tokens if num_tokens is not None else max(int(mask.sum()), 1)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if bool(mask[b, t]):
                total = total + per_position(b, t)
    return total / n


def rkl_pos(lp, lq):
    """Σ_v p(v) (log p(v) − max(log q(v), FLOOR)) for one position."""
    return sum(torch.exp(a) * (a - max(float(c), FLOOR)) for a, c in zip(lp, lq))


def fkl_pos(lp, lq):
    """Σ_v q(v) (log q(v) − log p(v)) for one position, dropping q(v) = 0."""
    out = torch.zeros((), dtype=torch.float64)
    for a, c in zip(lp, lq):
        c = float(c)
        if c > -math.inf:
            out = out + math.exp(c) * (c - a)
    return out


def jsd_pos(lp, lq, beta):
    """β KL(q‖m) + (1−β) KL(p‖m), m = βq + (1−β)p, for one position, dropping zero-probability terms."""
    out = torch.zeros((), dtype=torch.float64)
    for a, c in zip(lp, lq):
        q = math.exp(float(c))
        p = torch.exp(a)
        log_m = torch.log(beta * q + (1.0 - beta) * p)
        if q > 0:
            out = out + beta * q * (math.log(q) - log_m)
        out = out + (1.0 - beta) * p * (a - log_m)
    return out


def entropy_pos(lq):
    return -sum(math.exp(float(c)) * float(c) for c in lq if float(c) > -math.inf)


def topk_pos(lp, lq, support, renormalize):
    """Reverse KL restricted to the set `support`; teacher log-probs clamped at FLOOR."""
    support = sorted(set(int(v) for v in support))
    q = {v: math.exp(max(float(lq[v]), FLOOR)) for v in support}
    p = {v: torch.exp(lp[v]) for v in support}
    if not renormalize:
        return sum(p[v] * (lp[v] - math.log(q[v])) for v in support)
    zp = sum(p[v] for v in support)
    zq = sum(q[v] for v in support)
    return sum((p[v] / zp) * (torch.log(p[v] / zp) - math.log(q[v] / zq)) for v in support)


def ref_reverse_kl_full(z, lq, mask, num_tokens=None):
    lp = ref_student_logp(z)
    return ref_average(lambda b, t: rkl_pos(lp[b][t], lq[b, t]), mask, num_tokens)


def ref_forward_kl_full(z, lq, mask, num_tokens=None):
    lp = ref_student_logp(z)
    return ref_average(lambda b, t: fkl_pos(lp[b][t], lq[b, t]), mask, num_tokens)


def ref_jsd(z, lq, mask, beta, num_tokens=None):
    lp = ref_student_logp(z)
    return ref_average(lambda b, t: jsd_pos(lp[b][t], lq[b, t], beta), mask, num_tokens)


def ref_entropy_aware(z, lq, mask, tau, num_tokens=None):
    lp = ref_student_logp(z)

    def pos(b, t):
        extra = fkl_pos(lp[b][t], lq[b, t]) if entropy_pos(lq[b, t]) > tau else 0.0
        return rkl_pos(lp[b][t], lq[b, t]) + extra

    return ref_average(pos, mask, num_tokens)


def ref_topk(z, lq_full, ids, mask, renormalize, sampled=None, num_tokens=None):
    lp = ref_student_logp(z)

    def pos(b, t):
        support = [int(v) for v in ids[b, t]]
        if sampled is not None:
            support.append(int(sampled[b, t]))
        return topk_pos(lp[b][t], lq_full[b, t], support, renormalize)

    return ref_average(pos, mask, num_tokens)


def ref_sft(z, tokens, mask, num_tokens=None):
    lp = ref_token_logp(z, tokens)
    return ref_average(lambda b, t: -lp[b][t], mask, num_tokens)


def ref_policy_gradient(z, tokens, adv, mask, behaviour=None, num_tokens=None):
    """Returns (value, surrogate): `value` is −(1/N) Σ ρ_t A_t and `surrogate` has the estimator's gradient.

    With behaviour log-probs ρ_t = exp(log π_θ(y_t) − log π_b(y_t)) and value and gradient are those of
    the same expression. Without them ρ = 1 in value and the gradient is −(1/N) Σ A_t ∇ log π_θ(y_t).
    """
    lp = ref_token_logp(z, tokens)
    B, T = mask.shape
    a = [[float(adv[b, t]) for t in range(T)] for b in range(B)]
    if behaviour is not None:
        f = lambda b, t: -torch.exp(lp[b][t] - float(behaviour[b, t])) * a[b][t]  # noqa: E731
        v = ref_average(f, mask, num_tokens)
        return v, v
    value = ref_average(lambda b, t: torch.tensor(-a[b][t], dtype=torch.float64), mask, num_tokens)
    surrogate = ref_average(lambda b, t: -a[b][t] * lp[b][t], mask, num_tokens)
    return value, surrogate


def ref_return_to_go(x, mask, gamma):
    """G_t = Σ_{t' ≥ t} γ^(t'−t) mask_t' x_t' as nested float lists (0^0 = 1)."""
    B, T = x.shape
    return [[sum(gamma ** (s - t) * float(x[b, s]) for s in range(t, T) if bool(mask[b, s]))
             for t in range(T)] for b in range(B)]


def ref_sampled_token_advantages(z, tokens, lq_tok, mask, gamma, clip):
    """A_t = −Σ_{t'≥t} γ^(t'−t) r_t' with r_t = log π(y_t) − max(log q(y_t), FLOOR), optionally clipped."""
    lp = ref_token_logp(z.detach(), tokens)
    B, T = mask.shape
    r = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            v = float(lp[b][t]) - max(float(lq_tok[b, t]), FLOOR)
            if clip is not None:
                v = min(max(v, -clip), clip)
            r[b, t] = v
    g = ref_return_to_go(r, mask, gamma)
    return torch.tensor([[-g[b][t] for t in range(T)] for b in range(B)], dtype=torch.float64)


# ============================================================================================
# inputs and a registry of every loss, driven by student logits z
# ============================================================================================


def make_batch(seed=0, B=2, T=3, V=4, K=2, scale=1.5):
    """A small random batch: student logits, teacher log-probs, mask with holes, sampled tokens, etc."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, V, generator=g) * scale
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, generator=g) * scale, -1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = False  # a hole inside the completion
    mask[-1, -1] = False  # a padded tail
    probs = torch.softmax(z, -1).reshape(-1, V)
    tokens = torch.multinomial(probs, 1, generator=g).reshape(B, T)
    topk_ids = teacher_logp.topk(K, dim=-1).indices
    behaviour = torch.log_softmax(z + 0.3 * torch.randn(B, T, V, generator=g), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    advantages = torch.randn(B, T, generator=g)
    return {"z": z, "teacher_logp": teacher_logp, "mask": mask, "tokens": tokens, "topk_ids": topk_ids,
            "behaviour": behaviour, "advantages": advantages}


def sub(data, sl):
    """Slice every per-row tensor of a batch along B."""
    return {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in data.items()}


def token_lp(z, tokens, round_to=None):
    """Student log-probs of the sampled tokens, computed in float32 and returned in z's dtype
    (first rounded to `round_to` when given, to mimic a low-precision input)."""
    lp = torch.log_softmax(z.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return (lp if round_to is None else lp.to(round_to)).to(z.dtype)


def _lp(z, d):
    return token_lp(z, d["tokens"], d.get("round_to"))


def teacher_tok(data):
    return data["teacher_logp"].gather(-1, data["tokens"].unsqueeze(-1)).squeeze(-1)


def _topk(renormalize, sampled):
    def run(z, d, **kw):
        extra = {}
        if sampled:
            extra = {"sampled_ids_BT": d["tokens"], "teacher_sampled_logp_BT": teacher_tok(d)}
        return L.reverse_kl_topk(z, d["topk_ids"], d["teacher_logp"].gather(-1, d["topk_ids"]), d["mask"],
                                 renormalize=renormalize, **extra, **kw)
    return run


def _sampled(gamma, clip=None, behaviour=False):
    def run(z, d, **kw):
        return L.reverse_kl_sampled_token(_lp(z, d), teacher_tok(d), d["mask"], gamma=gamma,
                                          clip_log_ratio=clip,
                                          behaviour_logp_BT=d["behaviour"] if behaviour else None, **kw)
    return run


#: every loss as ``fn(z, data, **kw) -> (loss, metrics)``; kw carries num_tokens
LOSSES = {
    "reverse_kl_full": lambda z, d, **kw: L.reverse_kl_full(z, d["teacher_logp"], d["mask"], **kw),
    "forward_kl_full": lambda z, d, **kw: L.forward_kl_full(z, d["teacher_logp"], d["mask"], **kw),
    "jsd_0.3": lambda z, d, **kw: L.generalized_jsd(z, d["teacher_logp"], d["mask"], beta=0.3, **kw),
    "topk_renorm": _topk(True, False),
    "topk_renorm_sampled": _topk(True, True),
    "topk_raw": _topk(False, False),
    "entropy_aware": lambda z, d, **kw: L.entropy_aware_kl(z, d["teacher_logp"], d["mask"], entropy_threshold=0.0, **kw),
    "sft": lambda z, d, **kw: L.sft_cross_entropy(_lp(z, d), d["mask"], **kw),
    "pg_on_policy": lambda z, d, **kw: L.policy_gradient(_lp(z, d), d["advantages"], d["mask"], **kw),
    "pg_behaviour": lambda z, d, **kw: L.policy_gradient(_lp(z, d), d["advantages"], d["mask"],
                                                         behaviour_logp_BT=d["behaviour"], **kw),
    "sampled_g0": _sampled(0.0),
    "sampled_g0.3_clip": _sampled(0.3, clip=0.5, behaviour=True),
    "sampled_g1": _sampled(1.0),
}
DIVERGENCES = ["reverse_kl_full", "forward_kl_full", "jsd_0.3", "topk_renorm", "topk_renorm_sampled", "entropy_aware",
               "sampled_g0", "sampled_g0.3_clip", "sampled_g1"]
WITH_TEACHER = [k for k in LOSSES if not k.startswith(("sft", "pg_"))]


def value_and_grad(fn, z, dtype=torch.float32):
    """(loss, d loss / d z) with z a fresh leaf of the given dtype; fn returns a loss or (loss, metrics)."""
    z = z.detach().to(dtype).requires_grad_()
    out = fn(z)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def assert_close(got, want, what, atol=ATOL, rtol=RTOL):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert torch.allclose(got, want, atol=atol, rtol=rtol), (
        f"{what}: max |got − want| = {(got - want).abs().max().item():.3e}\ngot  {got}\nwant {want}")


def check_against_reference(module_fn, ref_fn, z, what, ref_grad_fn=None):
    """Compare value and gradient w.r.t. logits of the module's loss (float32) and a loop reference (float64)."""
    loss, grad = value_and_grad(module_fn, z)
    if ref_grad_fn is None:
        ref_loss, ref_grad = value_and_grad(ref_fn, z, torch.float64)
    else:  # the value and the gradient come from different reference expressions
        ref_loss = ref_fn(z.detach().double())
        _, ref_grad = value_and_grad(ref_grad_fn, z, torch.float64)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, f"{what} value")
    assert_close(grad, ref_grad, f"{what} gradient")


# ============================================================================================
# 1. every loss against its loop reference (value and gradient)
# ============================================================================================


def test_reverse_kl_full_matches_loop():
    """Full reverse KL Σ_v π(log π − log q), per-token mean over the mask."""
    d = make_batch(1)
    check_against_reference(lambda z: L.reverse_kl_full(z, d["teacher_logp"], d["mask"]),
                            lambda z: ref_reverse_kl_full(z, d["teacher_logp"], d["mask"]), d["z"], "reverse_kl_full")


def test_forward_kl_full_matches_loop():
    """Full forward KL Σ_v q(log q − log π), per-token mean over the mask."""
    d = make_batch(2)
    check_against_reference(lambda z: L.forward_kl_full(z, d["teacher_logp"], d["mask"]),
                            lambda z: ref_forward_kl_full(z, d["teacher_logp"], d["mask"]), d["z"], "forward_kl_full")


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_loop(beta):
    """JSD(β) = β KL(q‖m) + (1−β) KL(π‖m); the endpoints return forward (β=0) and reverse (β=1) KL."""
    d = make_batch(3)
    if beta == 0.0:
        ref = lambda z: ref_forward_kl_full(z, d["teacher_logp"], d["mask"])  # noqa: E731
    elif beta == 1.0:
        ref = lambda z: ref_reverse_kl_full(z, d["teacher_logp"], d["mask"])  # noqa: E731
    else:
        ref = lambda z: ref_jsd(z, d["teacher_logp"], d["mask"], beta)  # noqa: E731
    check_against_reference(lambda z: L.generalized_jsd(z, d["teacher_logp"], d["mask"], beta=beta), ref, d["z"],
                            f"generalized_jsd(beta={beta})")


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("sampled", ["none", "inside_topk", "outside_topk"])
def test_reverse_kl_topk_matches_loop(renormalize, sampled):
    """Reverse KL on the teacher's top-K support (∪ the sampled token), renormalised or not."""
    d = make_batch(4, V=5, K=2)
    ids = d["topk_ids"]
    kw = {}
    y = None
    if sampled != "none":
        y = d["tokens"].clone()
        for b in range(y.shape[0]):
            for t in range(y.shape[1]):
                inside = [int(v) for v in ids[b, t]]
                y[b, t] = inside[1] if sampled == "inside_topk" else [v for v in range(5) if v not in inside][t % 3]
        kw = {"sampled_ids_BT": y, "teacher_sampled_logp_BT": d["teacher_logp"].gather(-1, y.unsqueeze(-1)).squeeze(-1)}
    check_against_reference(
        lambda z: L.reverse_kl_topk(z, ids, d["teacher_logp"].gather(-1, ids), d["mask"], renormalize=renormalize, **kw),
        lambda z: ref_topk(z, d["teacher_logp"], ids, d["mask"], renormalize, sampled=y),
        d["z"], f"reverse_kl_topk(renormalize={renormalize}, sampled={sampled})")


def test_entropy_aware_kl_matches_loop_for_several_thresholds():
    """Reverse KL plus forward KL where H(q) > τ, for τ = 0, a mid-range τ (mixed positions), and ∞."""
    d = make_batch(5, V=5, scale=2.0)
    ent = sorted(entropy_pos(d["teacher_logp"][b, t]) for b in range(2) for t in range(3) if d["mask"][b, t])
    tau_mid = 0.5 * (ent[1] + ent[2])
    for tau in [0.0, tau_mid, math.inf]:
        check_against_reference(
            lambda z: L.entropy_aware_kl(z, d["teacher_logp"], d["mask"], entropy_threshold=tau),
            lambda z: ref_entropy_aware(z, d["teacher_logp"], d["mask"], tau), d["z"], f"entropy_aware_kl(tau={tau})")
    _, metrics = L.entropy_aware_kl(d["z"], d["teacher_logp"], d["mask"], entropy_threshold=tau_mid)
    assert 0.0 < metrics["opd/high_entropy_frac"].item() < 1.0, "the mid threshold must split the positions"


def test_sft_cross_entropy_matches_loop():
    """SFT: −(1/N) Σ log π(y_t) on the target tokens."""
    d = make_batch(6)
    check_against_reference(lambda z: L.sft_cross_entropy(token_lp(z, d["tokens"]), d["mask"]),
                            lambda z: ref_sft(z, d["tokens"], d["mask"]), d["z"], "sft_cross_entropy")


@pytest.mark.parametrize("behaviour", [False, True])
@pytest.mark.parametrize("adv_shape", ["BT", "B"])
def test_policy_gradient_matches_loop(behaviour, adv_shape):
    """−(1/N) Σ ρ_t A_t with ρ = π_θ/π_b (or ρ ≡ 1 on-policy); (B,) advantages broadcast over T."""
    d = make_batch(7)
    adv = d["advantages"] if adv_shape == "BT" else d["advantages"][:, 0]
    adv_bt = adv if adv_shape == "BT" else adv.unsqueeze(1).expand_as(d["advantages"])
    beh = d["behaviour"] if behaviour else None
    check_against_reference(
        lambda z: L.policy_gradient(token_lp(z, d["tokens"]), adv, d["mask"], behaviour_logp_BT=beh),
        lambda z: ref_policy_gradient(z, d["tokens"], adv_bt, d["mask"], beh)[0], d["z"],
        f"policy_gradient(behaviour={behaviour}, adv={adv_shape})",
        ref_grad_fn=lambda z: ref_policy_gradient(z, d["tokens"], adv_bt, d["mask"], beh)[1])


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("behaviour", [False, True])
def test_reverse_kl_sampled_token_matches_loop(gamma, clip, behaviour):
    """Sampled-token reverse KL: A_t = −Σ γ^(t'−t) r_t' (r clipped to ±c), loss −(1/N) Σ ρ_t A_t."""
    d = make_batch(8, T=4)
    lq_tok = teacher_tok(d)
    beh = d["behaviour"] if behaviour else None
    adv = ref_sampled_token_advantages(d["z"], d["tokens"], lq_tok, d["mask"], gamma, clip)
    if clip is not None:  # make sure clipping is exercised on both sides of the test inputs
        r = token_lp(d["z"], d["tokens"]) - lq_tok
        assert (r[d["mask"]].abs() > clip).any() and (r[d["mask"]].abs() < clip).any()
    check_against_reference(
        lambda z: L.reverse_kl_sampled_token(token_lp(z, d["tokens"]), lq_tok, d["mask"], gamma=gamma,
                                             clip_log_ratio=clip, behaviour_logp_BT=beh),
        lambda z: ref_policy_gradient(z, d["tokens"], adv, d["mask"], beh)[0], d["z"],
        f"reverse_kl_sampled_token(gamma={gamma}, clip={clip}, behaviour={behaviour})",
        ref_grad_fn=lambda z: ref_policy_gradient(z, d["tokens"], adv, d["mask"], beh)[1])


def test_sampled_token_and_topk_metrics_match_loop():
    """Documented metrics: mean r_t, negative-reward and clipped fractions, top-K masses."""
    d = make_batch(9, T=4, V=5)
    lp, lq = token_lp(d["z"], d["tokens"]), teacher_tok(d)
    _, m = L.reverse_kl_sampled_token(lp, lq, d["mask"], clip_log_ratio=0.5)
    pos = [(b, t) for b in range(2) for t in range(4) if d["mask"][b, t]]
    r = [float(lp[b, t]) - float(lq[b, t]) for b, t in pos]
    assert_close(m["kl/reverse_sampled"], sum(r) / len(r), "kl/reverse_sampled")
    assert_close(m["opd/neg_reward_frac"], sum(x > 0 for x in r) / len(r), "opd/neg_reward_frac")
    assert_close(m["opd/clip_frac"], sum(abs(x) > 0.5 for x in r) / len(r), "opd/clip_frac")
    _, m = L.reverse_kl_topk(d["z"], d["topk_ids"], d["teacher_logp"].gather(-1, d["topk_ids"]), d["mask"])
    p, q = torch.softmax(d["z"].double(), -1), d["teacher_logp"].double().exp()
    s_mass = sum(sum(float(p[b, t, v]) for v in d["topk_ids"][b, t]) for b, t in pos) / len(pos)
    t_mass = sum(sum(float(q[b, t, v]) for v in d["topk_ids"][b, t]) for b, t in pos) / len(pos)
    assert_close(m["student/topk_mass"], s_mass, "student/topk_mass")
    assert_close(m["teacher/topk_mass"], t_mass, "teacher/topk_mass")


# ============================================================================================
# 2. identical student and teacher
# ============================================================================================


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_student_and_teacher_give_zero_loss_and_gradient(kind):
    """π_θ = q: every divergence is 0 with 0 gradient (sampled-token: the advantage is 0)."""
    d = make_batch(10)
    d["teacher_logp"] = torch.log_softmax(d["z"], -1)
    d["topk_ids"] = d["teacher_logp"].topk(2, -1).indices
    loss, grad = value_and_grad(lambda z: LOSSES[kind](z, d), d["z"])
    assert abs(loss.item()) < 1e-6, f"{kind}: loss {loss.item()} for identical distributions"
    assert grad.abs().max().item() < 1e-6, f"{kind}: gradient {grad.abs().max().item()} for identical distributions"


# ============================================================================================
# 3. JSD(β) limits
# ============================================================================================


def test_jsd_endpoints_equal_forward_and_reverse_kl():
    """β = 0 returns exactly the forward KL and β = 1 exactly the reverse KL (value and gradient)."""
    d = make_batch(11)
    for beta, other in [(0.0, L.forward_kl_full), (1.0, L.reverse_kl_full)]:
        a = value_and_grad(lambda z: L.generalized_jsd(z, d["teacher_logp"], d["mask"], beta=beta), d["z"])
        b = value_and_grad(lambda z: other(z, d["teacher_logp"], d["mask"]), d["z"])
        assert_close(a[0], b[0], f"JSD({beta}) value", atol=0, rtol=0)
        assert_close(a[1], b[1], f"JSD({beta}) gradient", atol=0, rtol=0)


def test_jsd_scaled_limits_tend_to_the_kls():
    """JSD(β)/β → forward KL at β = 1e-4 and JSD(β)/(1−β) → reverse KL at β = 1 − 1e-4.

    Tolerance: relative 2e-3 on values and 5e-3 · max|∇| on gradients. The gap is the O(β) (resp.
    O(1 − β)) next term of the expansion plus float32 rounding of a term that is O(β²) in size; observed
    on these inputs: ≈ 2e-4 relative on values and ≈ 9e-4 · max|∇| on gradients.
    """
    d = make_batch(12)
    eps = 1e-4
    for beta, scale, other in [(eps, 1.0 / eps, L.forward_kl_full), (1.0 - eps, 1.0 / (1.0 - (1.0 - eps)), L.reverse_kl_full)]:
        a_loss, a_grad = value_and_grad(lambda z: L.generalized_jsd(z, d["teacher_logp"], d["mask"], beta=beta), d["z"])
        b_loss, b_grad = value_and_grad(lambda z: other(z, d["teacher_logp"], d["mask"]), d["z"])
        assert_close(a_loss * scale, b_loss, f"JSD({beta}) scaled value", atol=0, rtol=2e-3)
        assert_close(a_grad * scale, b_grad, f"JSD({beta}) scaled gradient", atol=5e-3 * b_grad.abs().max().item(), rtol=0)


def test_jsd_half_is_the_symmetric_js_divergence():
    """β = 0.5 is JS(π, q) = ½ KL(π‖m) + ½ KL(q‖m), m = (π + q)/2, written out by hand on one position."""
    z = torch.tensor([[[0.3, -1.2, 2.0]]])
    q = [0.5, 0.3, 0.2]
    lq = torch.log(torch.tensor([[q]]))
    zs = [0.3, -1.2, 2.0]
    p = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m)) + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m))
    loss, _ = L.generalized_jsd(z, lq, torch.ones(1, 1, dtype=torch.bool), beta=0.5)
    assert_close(loss, js, "JSD(0.5) vs hand-written JS divergence", atol=1e-6, rtol=1e-5)
    assert js <= math.log(2), "JS divergence is bounded by log 2"


# ============================================================================================
# 4. top-K special cases
# ============================================================================================


@pytest.mark.parametrize("with_sampled", [False, True])
def test_topk_with_k_equal_v_is_full_reverse_kl(with_sampled):
    """K = V (with or without the sampled token, which is then already inside) equals reverse_kl_full."""
    d = make_batch(13, V=4, K=4)
    lq = d["teacher_logp"].clone()
    lq[0, 0, 2] = -math.inf  # includes a zero-probability teacher token (clamped identically)
    d["teacher_logp"] = torch.log_softmax(lq, -1)
    fn = _topk(True, with_sampled)
    a = value_and_grad(lambda z: fn(z, d), d["z"])
    b = value_and_grad(lambda z: L.reverse_kl_full(z, d["teacher_logp"], d["mask"]), d["z"])
    assert_close(a[0], b[0], "top-K (K=V) value vs full reverse KL", atol=1e-6, rtol=1e-5)
    assert_close(a[1], b[1], "top-K (K=V) gradient vs full reverse KL", atol=1e-6, rtol=1e-5)


def test_topk_k1_with_renormalisation_is_rejected():
    """K = 1 with renormalisation is identically zero, so it is refused."""
    d = make_batch(14, K=1)
    with pytest.raises(ValueError, match="K=1 is degenerate"):
        L.reverse_kl_topk(d["z"], d["topk_ids"], d["teacher_logp"].gather(-1, d["topk_ids"]), d["mask"])


def test_topk_without_renormalisation_differs():
    """With K < V the unrenormalised truncated KL is a different (non-divergence) quantity."""
    d = make_batch(15, V=5, K=2)
    lr = LOSSES["topk_renorm"](d["z"], d)[0].item()
    lu = LOSSES["topk_raw"](d["z"], d)[0].item()
    assert abs(lr - lu) > 1e-2, f"renormalised {lr} vs unrenormalised {lu}"
    # the unrenormalised loss can go negative (the student escapes the support); the divergence cannot
    z = d["z"].clone()
    z.scatter_(-1, d["topk_ids"], -5.0)
    assert LOSSES["topk_raw"](z, d)[0].item() < 0 <= LOSSES["topk_renorm"](z, d)[0].item()


# ============================================================================================
# 5. the sampled-token estimator is unbiased for the gradient of its objective (exact enumeration)
# ============================================================================================


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_sampled_token_single_step_expectation_is_exact_kl_gradient(gamma):
    """T = 1: Σ_y π(y) ∇ loss(y) = ∇ KL(π‖q) for every γ, by enumerating y over the vocabulary.

    Tolerance: float32 vs float64 enumeration, atol 1e-5.
    """
    g = torch.Generator().manual_seed(16)
    V, C = 4, 3  # C independent contexts
    z0 = torch.randn(C, V, generator=g) * 1.5
    lq = torch.log_softmax(torch.randn(C, V, generator=g) * 1.5, -1)

    def expected_estimator(z):
        logp = torch.log_softmax(z, -1)
        total = torch.zeros(())
        for c in range(C):
            for y in range(V):
                loss, _ = L.reverse_kl_sampled_token(logp[c, y].view(1, 1), lq[c, y].view(1, 1), torch.ones(1, 1, dtype=torch.bool),
                                                     gamma=gamma)
                total = total + logp[c, y].detach().exp() * loss
        return total

    def exact_kl(z):
        return sum(rkl_pos(ref_log_softmax_row(z[c]), lq[c]) for c in range(C))

    _, g_est = value_and_grad(expected_estimator, z0)
    _, g_ref = value_and_grad(exact_kl, z0, torch.float64)
    assert_close(g_est, g_ref, f"E[sampled-token gradient] vs ∇KL (gamma={gamma})")


V_TAB, T_TAB = 3, 3


def _prefix_index(prefix):
    """Row of the tabular policy for a prefix: 0 for (), then 1.. for the V + V² + ... non-empty prefixes."""
    idx, offset = 0, 0
    for k in range(len(prefix)):
        offset += V_TAB ** k
    for tok in prefix:
        idx = idx * V_TAB + tok
    return offset + idx if prefix else 0


def _tabular_setup():
    g = torch.Generator().manual_seed(17)
    n_prefix = sum(V_TAB ** k for k in range(T_TAB))  # 1 + 3 + 9 = 13
    student = torch.randn(n_prefix, V_TAB, generator=g) * 1.5
    teacher = torch.log_softmax(torch.randn(n_prefix, V_TAB, generator=g) * 1.5, -1)
    seqs = [[(i // V_TAB ** (T_TAB - 1 - t)) % V_TAB for t in range(T_TAB)] for i in range(V_TAB ** T_TAB)]
    rows = torch.tensor([[_prefix_index(s[:t]) for t in range(T_TAB)] for s in seqs])  # (27, T)
    toks = torch.tensor(seqs)  # (27, T)
    return student, teacher, rows, toks


def _tabular_expected_estimator(table, teacher, rows, toks, loss_fn):
    """Σ_y π(y) · loss(y), π(y) detached, where loss(y) is evaluated on one sequence (B = 1)."""
    logp = torch.log_softmax(table, -1)
    slp = logp[rows, toks]  # (27, T) log π(y_t | y_<t)
    tlp = teacher[rows, toks]
    seq_prob = slp.detach().sum(-1).exp()
    assert abs(seq_prob.sum().item() - 1.0) < 1e-5
    total = torch.zeros(())
    for i in range(rows.shape[0]):
        total = total + seq_prob[i] * loss_fn(logp, i, slp[i:i + 1], tlp[i:i + 1])
    return total


def _exact_sequence_kl_over_t(table, teacher, rows, toks):
    """KL(π(y_1:T) ‖ q(y_1:T)) / T by enumerating every sequence (float64 loops)."""
    lp_rows = [ref_log_softmax_row(table[r]) for r in range(table.shape[0])]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(rows.shape[0]):
        log_pi = sum(lp_rows[int(rows[i, t])][int(toks[i, t])] for t in range(T_TAB))
        log_q = sum(float(teacher[int(rows[i, t]), int(toks[i, t])]) for t in range(T_TAB))
        total = total + torch.exp(log_pi) * (log_pi - log_q)
    return total / T_TAB


def test_sampled_token_gamma1_is_unbiased_for_sequence_kl_and_gamma0_is_not():
    """Tabular policy, V = 3, T = 3, all 27 sequences enumerated.

    Σ_y π(y) ∇ loss_γ=1(y) (num_tokens = T) equals ∇ KL(π(y_1:T) ‖ q(y_1:T)) / T (atol 1e-5, float32
    enumeration vs float64 reference; the observed error is ~1e-8). γ = 0 drops the future log-ratios and
    is biased: on these tables its expected gradient is off by ~0.1 (max |∇| ≈ 0.23); asserted > 1e-2.
    """
    student, teacher, rows, toks = _tabular_setup()
    ones = torch.ones(1, T_TAB, dtype=torch.bool)

    def estimator(gamma):
        return lambda table: _tabular_expected_estimator(
            table, teacher, rows, toks,
            lambda logp, i, s, t: L.reverse_kl_sampled_token(s, t, ones, gamma=gamma, num_tokens=T_TAB)[0])

    _, g_ref = value_and_grad(lambda tb: _exact_sequence_kl_over_t(tb, teacher, rows, toks), student, torch.float64)
    _, g1 = value_and_grad(estimator(1.0), student)
    _, g0 = value_and_grad(estimator(0.0), student)
    assert_close(g1, g_ref, "E[gamma=1 estimator gradient] vs ∇ sequence KL / T")
    bias = (g0.double() - g_ref).abs().max().item()
    assert bias > 1e-2, f"gamma=0 should be biased against the sequence-level gradient for T >= 2, gap {bias:.2e}"


def test_sampled_token_gamma0_is_unbiased_for_per_prefix_reverse_kl():
    """γ = 0 is the on-policy estimate of Σ_t ∇ KL(π(·|c_t) ‖ q(·|c_t)) with the prefix distribution held
    fixed, i.e. the expected gradient of reverse_kl_full on the student's own prefixes (atol 1e-5)."""
    student, teacher, rows, toks = _tabular_setup()
    ones = torch.ones(1, T_TAB, dtype=torch.bool)
    est = lambda table: _tabular_expected_estimator(  # noqa: E731
        table, teacher, rows, toks,
        lambda logp, i, s, t: L.reverse_kl_sampled_token(s, t, ones, gamma=0.0, num_tokens=T_TAB)[0])

    def per_prefix_kl(table):  # float64 loop: Σ_y π(y) (detached) Σ_t KL(π(·|y_<t) ‖ q(·|y_<t)) / T
        lp_rows = [ref_log_softmax_row(table[r]) for r in range(table.shape[0])]
        total = torch.zeros((), dtype=torch.float64)
        for i in range(rows.shape[0]):
            w = math.exp(sum(float(lp_rows[int(rows[i, t])][int(toks[i, t])].detach()) for t in range(T_TAB)))
            total = total + w * sum(rkl_pos(lp_rows[int(rows[i, t])], teacher[int(rows[i, t])]) for t in range(T_TAB))
        return total / T_TAB

    _, g0 = value_and_grad(est, student)
    _, g_ref = value_and_grad(per_prefix_kl, student, torch.float64)
    assert_close(g0, g_ref, "E[gamma=0 estimator gradient] vs per-prefix reverse KL gradient")


# ============================================================================================
# 6. masked positions
# ============================================================================================


def _perturb_masked(d, seed=18):
    """Copy of the batch with new student logits, teacher values, tokens and advantages at masked positions."""
    g = torch.Generator().manual_seed(seed)
    e = {k: v.clone() for k, v in d.items()}
    off = ~d["mask"]
    e["z"][off] = torch.randn(int(off.sum()), d["z"].shape[-1], generator=g) * 10
    e["teacher_logp"][off] = torch.log_softmax(torch.randn(int(off.sum()), d["z"].shape[-1], generator=g) * 5, -1)
    e["behaviour"][off] = torch.randn(int(off.sum()), generator=g)
    e["advantages"][off] = torch.randn(int(off.sum()), generator=g) * 10
    e["tokens"][off] = (e["tokens"][off] + 1) % d["z"].shape[-1]
    return e


@pytest.mark.parametrize("kind", list(LOSSES))
def test_masked_positions_contribute_nothing(kind):
    """Changing every input at masked positions (finite values) changes neither the loss nor the gradient."""
    d = make_batch(19)
    e = _perturb_masked(d)
    a = value_and_grad(lambda z: LOSSES[kind](z, d), d["z"])
    b = value_and_grad(lambda z: LOSSES[kind](z, e), e["z"])
    assert_close(a[0], b[0], f"{kind}: loss after perturbing masked positions", atol=1e-6, rtol=1e-6)
    assert_close(a[1], b[1], f"{kind}: gradient after perturbing masked positions", atol=1e-6, rtol=1e-6)
    assert (a[1][~d["mask"]] == 0).all(), f"{kind}: masked positions receive a gradient"


@pytest.mark.parametrize("fill", [-math.inf, math.inf, math.nan], ids=["-inf", "+inf", "nan"])
@pytest.mark.parametrize("kind", WITH_TEACHER)
def test_nonfinite_teacher_at_masked_positions_is_ignored(kind, fill):
    """Teacher log-probs of ±inf or NaN at masked positions (e.g. padding) leave loss and gradient unchanged."""
    d = make_batch(20)
    e = {k: v.clone() for k, v in d.items()}
    e["teacher_logp"][~d["mask"]] = fill
    a = value_and_grad(lambda z: LOSSES[kind](z, d), d["z"])
    b = value_and_grad(lambda z: LOSSES[kind](z, e), d["z"])
    assert_close(a[0], b[0], f"{kind}: loss with teacher={fill} at masked positions", atol=0, rtol=0)
    assert bool(torch.isfinite(b[1]).all()), (
        f"BUG (opd_mini/losses.py, {kind}): teacher log-prob {fill} at a masked-out position leaks into the "
        f"backward pass; student-logit gradient at masked positions = {b[1][~d['mask']].tolist()} (expected 0). "
        "_masked_sum zeroes these positions in the forward pass only: the backward of p·(log p − log q) "
        "multiplies the zero upstream gradient by a non-finite factor (0·inf = 0·NaN = NaN).")
    assert_close(a[1], b[1], f"{kind}: gradient with teacher={fill} at masked positions", atol=0, rtol=0)


# ============================================================================================
# 7. bf16 inputs
# ============================================================================================


@pytest.mark.parametrize("kind", list(LOSSES))
def test_bf16_inputs_are_computed_in_fp32(kind):
    """bf16 student and teacher inputs give a float32 loss equal to the fp32 loss on the bf16-rounded inputs."""
    d = make_batch(21)
    d16 = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in d.items()}
    d32 = {k: (v.float() if v.is_floating_point() else v) for k, v in d16.items()}
    d32["round_to"] = torch.bfloat16  # per-token student log-probs enter as bf16-rounded values too
    z16 = d16["z"].clone().requires_grad_()
    loss16, metrics = LOSSES[kind](z16, d16)
    loss32, _ = LOSSES[kind](d32["z"], d32)
    assert loss16.dtype == torch.float32, f"{kind}: loss dtype {loss16.dtype}"
    assert all(m.dtype == torch.float32 for m in metrics.values()), f"{kind}: metric dtypes"
    assert_close(loss16.detach(), loss32, f"{kind}: bf16 vs fp32-on-rounded-inputs", atol=1e-6, rtol=1e-6)
    loss16.backward()
    assert z16.grad.dtype == torch.bfloat16 and torch.isfinite(z16.grad.float()).all()


# ============================================================================================
# 8. zero-probability teacher tokens
# ============================================================================================


@pytest.mark.parametrize("kind", list(LOSSES))
def test_zero_probability_teacher_tokens_never_give_nan(kind):
    """log q = −inf on some tokens (including a sampled token and a top-K entry) gives finite loss and gradient."""
    d = make_batch(22, V=5, K=3)
    lq = d["teacher_logp"].clone()
    lq[0, 0, d["tokens"][0, 0]] = -math.inf  # the sampled token has zero teacher probability
    lq[1, 1, d["topk_ids"][1, 1, -1]] = -math.inf  # a top-K entry has zero teacher probability
    lq[1, 0, :3] = -math.inf  # three of five tokens impossible
    d["teacher_logp"] = torch.log_softmax(lq, -1)
    loss, grad = value_and_grad(lambda z: LOSSES[kind](z, d), d["z"])
    assert torch.isfinite(loss), f"{kind}: loss {loss}"
    assert torch.isfinite(grad).all(), f"{kind}: gradient {grad}"


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_tokens_impossible_for_both_student_and_teacher_give_finite_gradients(beta):
    """π_θ(v) = q(v) = 0 at the same entry (a −inf student logit, a −inf teacher log-prob): the JSD's mixture
    is 0 there, and its gradient must stay finite (logaddexp(−inf, −inf) alone has a NaN backward)."""
    d = make_batch(31, V=5)
    z = d["z"].detach().clone()
    z[0, 0, 2] = -math.inf
    lq = d["teacher_logp"].clone()
    lq[0, 0, 2] = -math.inf
    t = torch.log_softmax(lq, -1)
    loss, grad = value_and_grad(lambda x: L.generalized_jsd(x, t, d["mask"], beta=beta), z)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (beta, loss, grad)
    # at that position the entry is impossible for both: the value is the JSD over the other four tokens
    only = torch.zeros_like(d["mask"])
    only[0, 0] = True
    keep = [0, 1, 3, 4]
    ref, _ = L.generalized_jsd(z[..., keep], torch.log_softmax(lq[..., keep], -1), only, beta=beta)
    torch.testing.assert_close(L.generalized_jsd(z, t, only, beta=beta)[0], ref, rtol=1e-5, atol=1e-6)


def test_zero_probability_teacher_tokens_match_loop_references():
    """With −inf teacher log-probs the values still match the references (reverse terms clamped at −100)."""
    d = make_batch(23)
    lq = d["teacher_logp"].clone()
    lq[0, 0, 1] = -math.inf
    lq[1, 1, :2] = -math.inf
    d["teacher_logp"] = torch.log_softmax(lq, -1)
    t, m = d["teacher_logp"], d["mask"]
    check_against_reference(lambda z: L.reverse_kl_full(z, t, m), lambda z: ref_reverse_kl_full(z, t, m), d["z"], "rkl")
    check_against_reference(lambda z: L.forward_kl_full(z, t, m), lambda z: ref_forward_kl_full(z, t, m), d["z"], "fkl")
    check_against_reference(lambda z: L.generalized_jsd(z, t, m, beta=0.4), lambda z: ref_jsd(z, t, m, 0.4), d["z"], "jsd")
    check_against_reference(lambda z: L.entropy_aware_kl(z, t, m, entropy_threshold=0.0),
                            lambda z: ref_entropy_aware(z, t, m, 0.0), d["z"], "entropy_aware")


# ============================================================================================
# 9. num_tokens and gradient accumulation
# ============================================================================================


@pytest.mark.parametrize("kind", list(LOSSES))
def test_num_tokens_makes_microbatches_sum_to_the_full_batch(kind):
    """Two micro-batches with num_tokens = total masked tokens: summed losses and gradients equal the full batch."""
    d = make_batch(24, B=4)
    d["mask"][2, :] = False  # uneven token counts: 5 in the first half, 2 in the second
    d["mask"][3, 0] = False
    n = int(d["mask"].sum())
    full = value_and_grad(lambda z: LOSSES[kind](z, d)[0], d["z"])
    full_n = value_and_grad(lambda z: LOSSES[kind](z, d, num_tokens=n)[0], d["z"])
    split = value_and_grad(lambda z: LOSSES[kind](z[:2], sub(d, slice(0, 2)), num_tokens=n)[0]
                           + LOSSES[kind](z[2:], sub(d, slice(2, 4)), num_tokens=n)[0], d["z"])
    assert_close(full_n[0], full[0], f"{kind}: num_tokens=mask.sum() equals the default", atol=1e-7, rtol=1e-6)
    assert_close(split[0], full[0], f"{kind}: summed micro-batch losses", atol=1e-7, rtol=1e-6)
    assert_close(split[1], full[1], f"{kind}: summed micro-batch gradients", atol=1e-7, rtol=1e-6)
    check = LOSSES[kind](d["z"], d, num_tokens=2 * n)[0]
    assert_close(check, full[0] / 2, f"{kind}: loss scales as 1/num_tokens", atol=1e-7, rtol=1e-6)


# ============================================================================================
# 10. invalid arguments
# ============================================================================================


def _invalid_cases():
    d = make_batch(25)
    z, lq, mask, tok = d["z"], d["teacher_logp"], d["mask"], d["tokens"]
    lp, lq_tok = token_lp(z, tok), teacher_tok(d)
    ids, ids_lp = d["topk_ids"], lq.gather(-1, d["topk_ids"])
    B, T, V = z.shape
    bad_mask = torch.ones(B, T + 1, dtype=torch.bool)
    cases = []
    for g in [-0.1, 1.5, math.nan]:
        cases.append((f"sampled gamma={g}", lambda g=g: L.reverse_kl_sampled_token(lp, lq_tok, mask, gamma=g),
                      r"gamma must lie in \[0, 1\]"))
    cases.append(("return_to_go gamma=2", lambda: L.return_to_go(lq_tok, mask, 2.0), r"gamma must lie in \[0, 1\]"))
    for b in [-0.1, 1.1, math.nan]:
        cases.append((f"jsd beta={b}", lambda b=b: L.generalized_jsd(z, lq, mask, beta=b), r"beta must lie in \[0, 1\]"))
    wide = torch.arange(V + 1).expand(B, T, V + 1)
    cases += [
        ("topk K>V", lambda: L.reverse_kl_topk(z, wide, torch.zeros(B, T, V + 1), mask), r"1 <= K <= V=4, got K=5"),
        ("topk K=0", lambda: L.reverse_kl_topk(z, ids[..., :0], ids_lp[..., :0], mask), r"1 <= K <= V=4, got K=0"),
        ("topk K=1", lambda: L.reverse_kl_topk(z, ids[..., :1], ids_lp[..., :1], mask), r"K=1 is degenerate"),
        ("topk ids out of range", lambda: L.reverse_kl_topk(z, ids + V, ids_lp, mask), r"ids outside \[0, 4\)"),
        ("topk ids/logp shapes", lambda: L.reverse_kl_topk(z, ids, ids_lp[..., :1], mask),
         r"teacher_topk_ids_BTK has shape .* teacher_topk_logp_BTK has shape"),
        ("topk sampled ids alone", lambda: L.reverse_kl_topk(z, ids, ids_lp, mask, sampled_ids_BT=tok), r"pass both"),
        ("topk mask shape", lambda: L.reverse_kl_topk(z, ids, ids_lp, bad_mask), r"must match"),
    ]
    for name, fn in [("reverse_kl_full", L.reverse_kl_full), ("forward_kl_full", L.forward_kl_full),
                     ("jsd", lambda *a, **k: L.generalized_jsd(*a, beta=0.5, **k)),
                     ("entropy_aware", L.entropy_aware_kl)]:
        cases += [
            (f"{name} teacher (B, T+1)", lambda fn=fn: fn(z, torch.zeros(B, T + 1, V), mask),
             r"teacher_logp_BTV has shape .* mask_BT has shape"),
            (f"{name} mask (B, T+1)", lambda fn=fn: fn(z, lq, bad_mask), r"student_logits_BTV has shape .* must match"),
            (f"{name} mask 3-D", lambda fn=fn: fn(z, lq, mask.unsqueeze(-1)), r"mask_BT must have shape \(B, T\)"),
            (f"{name} vocabulary mismatch", lambda fn=fn: fn(z, lq[..., :V - 1], mask), r"vocabulary size 3 .* student has 4"),
            (f"{name} num_tokens=0", lambda fn=fn: fn(z, lq, mask, num_tokens=0), r"num_tokens must be a positive"),
            (f"{name} num_tokens=-3", lambda fn=fn: fn(z, lq, mask, num_tokens=-3), r"num_tokens must be a positive"),
            (f"{name} num_tokens=nan", lambda fn=fn: fn(z, lq, mask, num_tokens=math.nan), r"num_tokens must be a positive"),
        ]
    cases += [
        ("sampled student/teacher shapes", lambda: L.reverse_kl_sampled_token(lp, lq, mask),
         r"teacher_logp_BT has shape .* mask_BT has shape .* must be \(B, T\)"),
        ("sampled teacher (B, T+1)", lambda: L.reverse_kl_sampled_token(lp, torch.zeros(B, T + 1), mask),
         r"teacher_logp_BT has shape .* must match"),
        ("sampled behaviour (B, T+1)",
         lambda: L.reverse_kl_sampled_token(lp, lq_tok, mask, behaviour_logp_BT=torch.zeros(B, T + 1)),
         r"behaviour_logp_BT has shape"),
        ("sampled mask (B, T+1)", lambda: L.reverse_kl_sampled_token(lp, lq_tok, bad_mask), r"must match"),
        ("sampled num_tokens=0", lambda: L.reverse_kl_sampled_token(lp, lq_tok, mask, num_tokens=0), r"num_tokens"),
        ("sft num_tokens=-1", lambda: L.sft_cross_entropy(lp, mask, num_tokens=-1), r"num_tokens must be a positive"),
        ("sft mask shape", lambda: L.sft_cross_entropy(lp, bad_mask), r"student_logp_BT has shape"),
        ("pg advantages (B+1,)", lambda: L.policy_gradient(lp, torch.zeros(B + 1), mask), r"advantages_BT has shape"),
        ("pg num_tokens=inf", lambda: L.policy_gradient(lp, d["advantages"], mask, num_tokens=math.inf),
         r"num_tokens must be a positive"),
        ("entropy threshold < 0", lambda: L.entropy_aware_kl(z, lq, mask, entropy_threshold=-1.0),
         r"entropy_threshold must be >= 0"),
        ("grpo group_size=1", lambda: L.grpo_advantages(torch.zeros(6), 1), r"group_size must be >= 2"),
        ("grpo group_size=4 of 6", lambda: L.grpo_advantages(torch.zeros(6), 4), r"batch size 6 is not a multiple of group_size 4"),
        ("grpo 2-D rewards", lambda: L.grpo_advantages(torch.zeros(6, 1), 2), r"rewards_B must have shape \(B,\)"),
        ("mix weight < 0", lambda: L.mix_advantages(lq_tok, torch.zeros(B), -1.0), r"reward_weight must be a finite"),
        ("mix weight nan", lambda: L.mix_advantages(lq_tok, torch.zeros(B), math.nan), r"reward_weight must be a finite"),
        ("mix reward shape", lambda: L.mix_advantages(lq_tok, torch.zeros(B + 1), 1.0), r"reward_advantages_B must have shape"),
        ("token_logprobs shapes", lambda: L.token_logprobs(z, tok[:, :-1]), r"tokens_BT has shape"),
        ("mask_special_tokens shapes", lambda: L.mask_special_tokens(bad_mask, tok, [0]), r"tokens_BT has shape"),
    ]
    for c in [0.0, -1.0, math.nan]:
        cases.append((f"clip_log_ratio={c}", lambda c=c: L.reverse_kl_sampled_token(lp, lq_tok, mask, clip_log_ratio=c),
                      r"clip_log_ratio must be > 0"))
    return cases


_CASES = _invalid_cases()


@pytest.mark.parametrize("fn, match", [(c[1], c[2]) for c in _CASES], ids=[c[0] for c in _CASES])
def test_invalid_arguments_raise_informative_value_error(fn, match):
    """Each invalid argument raises ValueError whose message names the problem."""
    with pytest.raises(ValueError, match=match):
        fn()


def test_per_token_inputs_with_extra_trailing_dims_are_rejected():
    """(B, T) inputs must be exactly (B, T): a (B, T, 1) or (B, T, V) tensor must not broadcast silently.

    With B = T the shapes broadcast without a torch error, so only the module's own check can catch it.
    """
    d = make_batch(26, B=3, T=3, V=3)
    lp, lq_tok, mask = token_lp(d["z"], d["tokens"]), teacher_tok(d), d["mask"]
    cases = {
        "reverse_kl_sampled_token(behaviour_logp_BT of shape (B, T, 1))":
            lambda: L.reverse_kl_sampled_token(lp, lq_tok, mask, behaviour_logp_BT=d["behaviour"].unsqueeze(-1)),
        "policy_gradient(advantages_BT of shape (B, T, 1))":
            lambda: L.policy_gradient(lp, d["advantages"].unsqueeze(-1), mask),
        "sft_cross_entropy(student_logp_BT of shape (B, T, V))":
            lambda: L.sft_cross_entropy(torch.log_softmax(d["z"], -1), mask),
    }
    problems = []
    for what, fn in cases.items():
        try:
            out = fn()
        except ValueError:
            continue
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{what} raised {type(exc).__name__}: {exc}")
            continue
        problems.append(f"{what} was accepted and returned loss {out[0].item():.4f}")
    assert not problems, ("BUG (opd_mini/tensors.py, check_bt compares only shape[:2], so per-token inputs with "
                          "extra trailing dims broadcast silently):\n  " + "\n  ".join(problems))


# ============================================================================================
# 11. helpers
# ============================================================================================


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_return_to_go_matches_loop(gamma):
    """G_t = Σ_{t'≥t} γ^(t'−t) mask_t' x_t'; masked-out positions add nothing but still age the discount."""
    g = torch.Generator().manual_seed(27)
    x = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)
    x[~mask] = math.nan  # masked values must not leak
    got = L.return_to_go(x, mask, gamma)
    assert got.dtype == torch.float32
    assert_close(got, ref_return_to_go(x, mask, gamma), f"return_to_go(gamma={gamma})", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_advantages_match_loop(normalize_std):
    """A_i = (R_i − mean_group) / (population std_group + eps), or just R_i − mean_group."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 2.0, -1.0, 4.0, 0.5, 0.5, 0.5, 0.5])
    G, eps = 4, 1e-6
    want = []
    for start in range(0, len(rewards), G):
        grp = [float(r) for r in rewards[start:start + G]]
        mean = sum(grp) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / G)  # population std
        want += [(r - mean) / (std + eps) if normalize_std else r - mean for r in grp]
    got = L.grpo_advantages(rewards, G, normalize_std=normalize_std, eps=eps)
    assert_close(got, want, f"grpo_advantages(normalize_std={normalize_std})", atol=1e-5, rtol=1e-5)
    assert torch.equal(got[8:12], torch.zeros(4)), "the constant group gets advantage 0"


def test_grpo_constant_group_gets_zero_advantage():
    """A group whose rewards are all equal gets advantage exactly 0 (no division by a zero std)."""
    got = L.grpo_advantages(torch.tensor([0.5, 0.5, 0.5, 1.0, 0.0, 1.0]), 3)
    assert torch.equal(got[:3], torch.zeros(3)) and torch.isfinite(got).all()


def test_mix_advantages_matches_loop():
    """A_bt = A^OPD_bt + w · A^reward_b, broadcast over T; w = 0 is pure OPD."""
    g = torch.Generator().manual_seed(28)
    opd, rew = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    for w in [0.0, 0.7, 2.0]:
        want = [[float(opd[b, t]) + w * float(rew[b]) for t in range(4)] for b in range(3)]
        assert_close(L.mix_advantages(opd, rew, w), want, f"mix_advantages(w={w})", atol=1e-6, rtol=1e-6)


def test_masks_must_be_boolean_and_token_ids_integers():
    """A float mask of weights (0.5) would be read as True; float ids would be truncated: both refused, in one line."""
    logits, teacher = torch.randn(2, 3, 5), torch.log_softmax(torch.randn(2, 3, 5), -1)
    with pytest.raises(ValueError, match="mask_BT must be a boolean tensor, got torch.float32"):
        L.reverse_kl_full(logits, teacher, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="tokens_BT must hold integer token ids, got torch.float32"):
        L.token_logprobs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="teacher_topk_ids_BTK must hold integer token ids"):
        L.reverse_kl_topk(logits, torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.ones(2, 3, dtype=torch.bool))


def test_mask_special_tokens_matches_loop():
    """Positions whose token is special are dropped; already-masked positions stay masked; empty list is a no-op."""
    tokens = torch.tensor([[5, 0, 7, 2], [1, 2, 2, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    special = [2, 7]
    want = [[bool(mask[b, t]) and int(tokens[b, t]) not in special for t in range(4)] for b in range(2)]
    got = L.mask_special_tokens(mask, tokens, special)
    assert got.dtype == torch.bool and got.tolist() == want
    assert L.mask_special_tokens(mask, tokens, []).tolist() == mask.bool().tolist()


def test_token_logprobs_matches_log_softmax_gather():
    """token_logprobs = log_softmax(logits).gather(y), in float32, also for bf16 logits; checked against the loop."""
    d = make_batch(29, V=5)
    got = L.token_logprobs(d["z"], d["tokens"])
    want = torch.log_softmax(d["z"], -1).gather(-1, d["tokens"].unsqueeze(-1)).squeeze(-1)
    assert_close(got, want, "token_logprobs vs log_softmax+gather", atol=1e-6, rtol=1e-6)
    loop = ref_token_logp(d["z"].double(), d["tokens"])
    assert_close(got, [[float(x) for x in row] for row in loop], "token_logprobs vs loop", atol=1e-6, rtol=1e-6)
    z16 = d["z"].bfloat16()
    got16 = L.token_logprobs(z16, d["tokens"])
    assert got16.dtype == torch.float32
    assert_close(got16, L.token_logprobs(z16.float(), d["tokens"]), "token_logprobs bf16", atol=0, rtol=0)


@pytest.mark.parametrize("kind, beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3), ("jsd", 0.9)])
def test_the_fused_divergence_equals_the_plain_formula_under_autograd(kind, beta):
    """opd_mini.divergences writes each gradient out (and keeps only the logits for the backward pass); values and
    gradients equal autograd of the plain formula, with masked positions holding garbage that must not leak."""
    from opd_mini.divergences import divergence, reference

    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 2
    logq = torch.log_softmax(torch.randn(3, 4, 9, generator=g, dtype=torch.float64) * 3, -1)
    logq[0, 0, :4] = -math.inf  # tokens the teacher forbids
    mask = torch.rand(3, 4, generator=g) > 0.25
    z_masked = torch.where(mask[..., None], z, torch.full_like(z, math.nan))
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    floor = -100.0 if kind == "reverse" else None
    grads = []
    for fn in (divergence, reference):
        x = z_masked.clone().requires_grad_()
        values = fn(x, logq, mask, kind, beta, floor)
        (torch.where(mask, values, 0.0) * w).sum().backward()
        grads.append((values[mask], x.grad))
    (v_fused, g_fused), (v_ref, g_ref) = grads
    torch.testing.assert_close(v_fused, v_ref, rtol=1e-5, atol=1e-6)  # both compute in float32
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g_fused).all() and (g_fused[~mask] == 0).all()


@pytest.mark.parametrize("kind, beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3)])
def test_the_compiled_backend_equals_the_fused_divergence(kind, beta):
    """--divergence_backend compiled (torch.compile of the plain formula) gives the fused function's values and
    gradients to float rounding, masked garbage and forbidden tokens included; the backend is restored after."""
    import shutil

    from opd_mini import divergences

    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler for torch.compile on the CPU")
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 5, 33, generator=g) * 2
    logq = torch.log_softmax(torch.randn(2, 5, 33, generator=g) * 3, -1)
    logq[0, 0, :4] = -math.inf
    mask = torch.rand(2, 5, generator=g) > 0.25
    z_masked = torch.where(mask[..., None], z, torch.full_like(z, math.nan))
    w = torch.randn(2, 5, generator=g)
    floor = -100.0 if kind == "reverse" else None
    out = {}
    for name in divergences.BACKENDS:
        with divergences.backend(name):
            x = z_masked.clone().requires_grad_()
            values = divergences.divergence(x, logq, mask, kind, beta, floor)
            (torch.where(mask, values, 0.0) * w).sum().backward()
            out[name] = (values[mask], x.grad)
    assert divergences._backend["name"] == "fused"
    torch.testing.assert_close(out["compiled"][0], out["fused"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["compiled"][1], out["fused"][1], rtol=1e-5, atol=1e-6)
    assert (out["compiled"][1][~mask] == 0).all()


# ============================================================================================
# top-K with a tail bucket
# ============================================================================================


def ref_topk_tail(z, lq_full, ids, mask, sampled=None):
    """Σ over the buckets S ∪ {tail} of p_b (log p_b − log q_b), the tail being everything outside S, by hand."""
    lp = ref_student_logp(z)

    def pos(b, t):
        support = sorted({int(v) for v in ids[b, t]} | ({int(sampled[b, t])} if sampled is not None else set()))
        rest = [v for v in range(z.shape[-1]) if v not in support]
        p_tail = sum(torch.exp(lp[b][t][v]) for v in rest)
        q_tail = sum(math.exp(float(lq_full[b, t, v])) for v in rest)
        total = sum(torch.exp(lp[b][t][v]) * (lp[b][t][v] - max(float(lq_full[b, t, v]), FLOOR)) for v in support)
        return total + p_tail * (torch.log(p_tail) - max(math.log(q_tail), FLOOR))

    return ref_average(pos, mask)


@pytest.mark.parametrize("sampled", ["none", "inside_topk", "outside_topk"])
def test_reverse_kl_topk_tail_is_the_reverse_kl_of_the_coarsened_distributions(sampled):
    """Top-K + tail bucket (TRL's loss_add_tail): value and gradient against the hand-built coarsened KL."""
    d = make_batch(14, V=6, K=2)
    ids = d["topk_ids"]
    kw, y = {}, None
    if sampled != "none":
        y = d["tokens"].clone()
        for b in range(y.shape[0]):
            for t in range(y.shape[1]):
                inside = [int(v) for v in ids[b, t]]
                y[b, t] = inside[1] if sampled == "inside_topk" else [v for v in range(6) if v not in inside][t % 3]
        kw = {"sampled_ids_BT": y, "teacher_sampled_logp_BT": d["teacher_logp"].gather(-1, y.unsqueeze(-1)).squeeze(-1)}
    check_against_reference(
        lambda z: L.reverse_kl_topk(z, ids, d["teacher_logp"].gather(-1, ids), d["mask"], renormalize=False,
                                    tail=True, **kw),
        lambda z: ref_topk_tail(z, d["teacher_logp"], ids, d["mask"], sampled=y), d["z"], f"topk tail ({sampled})")


def test_topk_tail_stays_exact_when_the_tail_is_below_float_precision():
    """A confident student (tail mass ~1e-26, far below float32's 1 − Σπ resolution) keeps a finite gradient and
    the exact value; a student that equals the teacher has zero loss; the tail needs a token outside S."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 2, 7, generator=g)
    lq = torch.log_softmax(torch.randn(1, 2, 7, generator=g), -1)
    mask = torch.ones(1, 2, dtype=torch.bool)
    ids = lq.topk(3, -1).indices
    z[0, 0, ids[0, 0, 0]] = 60.0  # nearly all of the student's mass inside the support: the tail is ~e^-60
    check_against_reference(lambda x: L.reverse_kl_topk(x, ids, lq.gather(-1, ids), mask, renormalize=False, tail=True),
                            lambda x: ref_topk_tail(x, lq, ids, mask), z, "topk tail, confident student")
    same, _ = L.reverse_kl_topk(lq.clone(), ids, lq.gather(-1, ids), mask, renormalize=False, tail=True)
    assert abs(same.item()) < 1e-6
    full = lq.topk(7, -1).indices
    with pytest.raises(ValueError, match="needs a token outside the support"):
        L.reverse_kl_topk(z, full, lq.gather(-1, full), mask, renormalize=False, tail=True)
