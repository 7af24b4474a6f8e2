"""Self-distillation on a transformer (python -m opd_mini.experiments forgetting), the fixed set of teacher
samples (teacher_sample_pool) and the forward-KL evaluation it reads (eval/kl_forward)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_mini.eval import evaluate, held_out_seed, held_out_examples
from opd_mini.experiments import forgetting, toolkit
from opd_mini.experiments.worlds import ensure_setting
from opd_mini.losses import token_logprobs
from opd_mini.rollouts import TeacherPool
from opd_mini.sampler import build_rollouts, sample
from opd_mini.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "tutorials" / "results" / "forgetting.json"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("forgetting")
    assert forgetting.main(["--quick", "--out", str(out), "--no-progress"]) == 0
    assert (out / "forgetting.png").stat().st_size > 0 and "| lr |" in (out / "forgetting.md").read_text()
    assert (out / "forgetting_perturbed.png").stat().st_size > 0
    return json.loads((out / "forgetting.json").read_text())


def test_quick_self_distillation_opd_stays_exactly_put_and_sft_moves(quick):
    by = {e["method"]: e for e in quick["self_distill"]}
    assert set(by) == set(forgetting.METHODS) and all(e["seeds"] == [0, 1, 2] for e in by.values())
    for e in by.values():
        assert all(k[0] == 0.0 for k in e["kl_to_init"])  # the adapter starts at zero: the student is π₀
    assert all(x == 0.0 for k in by["opd"]["kl_to_init"] for x in k)  # r_t = 0 for every sample: no gradient
    assert all(len(set(per_seed)) == 1 for per_seed in by["opd"]["pass@1"])  # the same model at every evaluation
    for name in ("sft_fixed", "sft_fresh"):  # measured at this scale: 0.012 to 0.055 nats per token at step 10
        assert all(k[-1] > 1e-4 for k in by[name]["kl_to_init"]), name


def test_quick_perturbed_start_is_the_same_for_every_method_and_opd_comes_back(quick):
    """The noise adapter (σ = 0.07) puts the start 0.15-0.25 nats per token from π₀ in each seed; 10 steps of OPD
    at lr 3e-3 bring it to 0.01-0.07 (measured on 3 seeds): the bounds are a third of the start."""
    by = {e["method"]: e for e in quick["perturbed"]}
    starts = [k[0] for k in by["opd"]["kl_to_init"]]
    assert all(x > 0.05 for x in starts)
    for e in by.values():  # one perturbed adapter per seed, shared by every method
        assert [k[0] for k in e["kl_to_init"]] == starts
    assert all(k[-1] < k[0] / 3 for k in by["opd"]["kl_to_init"])


def test_kl_forward_matches_a_brute_force_computation():
    """eval/kl_forward = mean over the teacher's sampled tokens of log q(y_t) − log π(y_t), computed here from
    full forwards of both models on the same teacher samples."""
    paths = ensure_setting("compounding")
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(paths["student"]).eval()
    task = get_task("walk:10")

    def sample_teacher(prompts, n, seed):
        return sample(teacher, tokenizer, prompts, num_generations=n, max_new_tokens=12, temperature=1.0, seed=seed)

    out = evaluate(student, tokenizer, task, num_prompts=16, num_samples=2, k=1, max_new_tokens=12, seed=3,
                   sample_teacher=sample_teacher)
    prompts = [e.prompt for e in held_out_examples(task, 16, 3)]
    r = sample_teacher(prompts, 2, held_out_seed(3) + 1)
    with torch.no_grad():
        logp = {}
        for name, model in (("q", teacher), ("pi", student)):
            logits = model(r.input_ids_BL, attention_mask=r.attention_mask_BL, position_ids=r.position_ids_BL()).logits
            logp[name] = token_logprobs(logits[:, r.prompt_len - 1:-1].float(), r.tokens_BT)
    mask = r.mask_BT
    expected = float(((logp["q"] - logp["pi"])[mask]).sum() / mask.sum())
    assert out["eval/kl_forward"] == pytest.approx(expected, abs=1e-5)
    assert expected > 0.1  # a real gap between this teacher and student, not a trivial zero


def test_fixed_teacher_sample_set_is_drawn_from_once_and_per_step_deterministically():
    from opd_mini.config import TrainConfig
    from opd_mini.tiny import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    examples = get_task("walk:10").examples(6, seed=0)
    cfg = TrainConfig(num_generations=2, prompts_per_step=4, teacher_sample_pool=6, seed=5, loss="sft")
    pool_r = build_rollouts(tokenizer, [e.prompt for e in examples for _ in range(2)],
                            [f"{e.answer}{g}" for e in examples for g in range(2)])
    # the pool as TeacherPool draws it at the start of a run (here: given, instead of sampled by a teacher)
    pool = TeacherPool.__new__(TeacherPool)
    pool.cfg, pool.task, pool.examples, pool.batch = cfg, get_task("walk:10"), examples, pool_r
    models = SimpleNamespace(teacher_for=lambda task: None)
    piece = pool.piece(models, step_index=7, micro=1, n=3)
    r, ex = piece.batch, piece.examples
    again = pool.piece(models, step_index=7, micro=1, n=3).batch
    other = pool.piece(models, step_index=8, micro=1, n=3).batch
    assert r.completions == again.completions and r.completions != other.completions
    assert r.prompt_index_B.tolist() == [0, 0, 1, 1, 2, 2]
    for i, e in enumerate(ex):  # each picked prompt comes with its own two samples from the set
        assert r.completions[2 * i:2 * i + 2] == [f"{e.answer}0", f"{e.answer}1"]
    with pytest.raises(ValueError, match="teacher_sample_pool=2 is out of range"):
        TrainConfig(prompts_per_step=4, teacher_sample_pool=2, loss="sft")


@pytest.mark.parametrize("argv, message", [(["--lrs", "fast"], "--lrs"), (["--steps", "0"], "steps=0 is out of range")])
def test_forgetting_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path):
    assert forgetting.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_docs_self_distillation_block_and_reading_match_the_committed_results():
    result = json.loads(COMMITTED.read_text())
    assert toolkit.committed(forgetting) == result
    block = toolkit.read_block(ROOT / "docs" / "results.md", "forgetting")
    assert block == forgetting.docs_block(result, "../tutorials/results")
    assert result["scale"] == "full" and len(result["seeds"]) >= 3
    by = {(e["method"], e["lr"]): e for e in result["self_distill"]}
    lrs = sorted({e["lr"] for e in result["self_distill"]})
    final = {k: toolkit.mean([x[-1] for x in e["kl_to_init"]]) for k, e in by.items()}
    # the reading after the block, statement by statement
    spread = {k: toolkit.mean_std([x[-1] for x in e["kl_to_init"]])[1] for k, e in by.items()}
    assert all(x == 0.0 for lr in lrs for k in by[("opd", lr)]["kl_to_init"] for x in k)
    assert all(final[(name, lr)] > 0 for lr in lrs for name in ("sft_fixed", "sft_fresh"))
    cases = {(c["method"], c["lr"]): c for c in result["claims"]["sft_kl_rises_opd_below_tenth"]["cases"]}
    steady = [k for k, c in cases.items() if c["kl_rank_correlation_with_steps"] > 0.8]
    assert steady == [("sft_fixed", lrs[0])] and [k for k, c in cases.items() if c["rises"]] == steady
    low = lrs[0]
    assert final[("sft_fixed", low)] - final[("sft_fresh", low)] > spread[("sft_fixed", low)] + spread[("sft_fresh", low)]

    def furthest(name, lr):
        e = by[(name, lr)]
        means = [toolkit.mean([k[i] for k in e["kl_to_init"]]) for i in range(len(e["steps"]))]
        return max(range(len(means)), key=means.__getitem__)

    assert all(furthest("sft_fresh", lr) == 1 for lr in lrs)  # furthest at the first evaluation, then back
    high = lrs[-1]
    assert furthest("sft_fixed", high) == 1
    assert abs(final[("sft_fixed", high)] - final[("sft_fresh", high)]) < max(spread[("sft_fixed", high)],
                                                                               spread[("sft_fresh", high)])
    assert "holds in\none case of six" in (ROOT / "docs" / "results.md").read_text() and len(cases) == 6


def test_docs_reading_of_the_perturbed_start_holds_on_the_committed_results():
    """The reading after the forgetting_perturbed block, statement by statement."""
    result = json.loads(COMMITTED.read_text())
    block = toolkit.read_block(ROOT / "docs" / "results.md", "forgetting_perturbed")
    assert block == forgetting.perturbed_block(result, "../tutorials/results")
    by = {(e["method"], e["lr"]): e for e in result["perturbed"]}
    lrs = sorted({e["lr"] for e in result["perturbed"]})
    ms = {k: toolkit.mean_std([x[-1] for x in e["kl_to_init"]]) for k, e in by.items()}
    start = toolkit.mean([x[0] for x in by[("opd", lrs[0])]["kl_to_init"]])
    for lr in lrs:
        assert all(ms[(m, lr)][0] < start / 3 for m in forgetting.METHODS)  # every method comes back toward π₀
        assert ms[("opd", lr)][0] < min(ms[("sft_fixed", lr)][0], ms[("sft_fresh", lr)][0])  # OPD closest
        assert ms[("sft_fixed", lr)][0] > 5 * ms[("opd", lr)][0]  # fixed-set SFT: more than 5x further
    fresh = {lr: ms[("sft_fresh", lr)][0] for lr in lrs}
    assert max(fresh, key=fresh.get) == lrs[-1] and fresh[lrs[-1]] > 5 * ms[("opd", lrs[-1])][0]
    (m_f, s_f), (m_o, s_o) = ms[("sft_fresh", lrs[0])], ms[("opd", lrs[0])]
    assert abs(m_f - m_o) < s_f + s_o and not result["claims"]["opd_5x_closer_than_sft"]["holds"]


def test_decode_sampler_runs_the_loop_and_keeps_self_distillation_exact(tmp_path):
    """--sampler decode (the fast loop) trains; with the student's own base as the teacher its behaviour
    log-probs still come from a forward, so OPD's r_t is exactly 0 and the student does not move."""
    from opd_mini.config import TrainConfig
    from opd_mini.train import train

    paths = ensure_setting("compounding")
    common = dict(student=paths["student"], tokenizer=paths["tokenizer"], task="walk:10", max_new_tokens=12,
                  prompts_per_step=4, num_generations=2, steps=2, eval_every=1, eval_prompts=8, eval_samples=2, pass_k=1,
                  threads=1, device="cpu", dtype="float32", progress=False, sampler="decode", lr=1e-2)
    selfd = train(TrainConfig(**common, lora=True, teacher="self", loss="reverse_kl_sampled", eval_kl_forward=True,
                              out_dir=str(tmp_path / "self")))
    assert all(h["eval/kl_forward"] == 0.0 and h["eval/kl_reverse"] == 0.0 for h in selfd["eval_history"])
    other = train(TrainConfig(**common, lora=False, teacher=paths["teacher"], loss="reverse_kl_full",
                              out_dir=str(tmp_path / "other")))
    assert other["steps_done"] == 2 and other["eval_history"][-1]["eval/kl_reverse"] > 0
