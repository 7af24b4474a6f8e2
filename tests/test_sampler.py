"""Sampler: behaviour log-probs equal a separate forward pass, completion-mask semantics, layout, errors;
the fast decode loop against the generate reference (same distribution by chi-square tests, seeds)."""

import copy

import pytest
import torch

from opd_mini.losses import token_logprobs
from opd_mini.forward import sampled_token_logprobs
from opd_mini.sampler import build_rollouts, completion_mask_from_ids, sample
from opd_mini.student import completion_logits

PROMPTS = ["12>", "4071>", "x", "hello world>"]  # different lengths: left padding is exercised


@pytest.fixture
def eos_happy_model(tiny_model, char_tokenizer):
    """A random tiny model whose EOS logit is raised so completions end at various lengths."""
    with torch.no_grad():
        tiny_model.lm_head.weight[char_tokenizer.eos_token_id] = 3.0 * tiny_model.model.norm.weight.sign()
        tiny_model.model.norm.weight.mul_(3.0)
    return tiny_model


def _forward_logp(model, rollouts, vocab_size=None):
    with torch.no_grad():
        return token_logprobs(completion_logits(model, rollouts, vocab_size), rollouts.tokens_BT)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9, top_k=20),
    dict(temperature=0.0),
])
def test_behaviour_logp_equals_a_separate_forward_pass(eos_happy_model, char_tokenizer, kwargs):
    r = sample(eos_happy_model, char_tokenizer, PROMPTS, num_generations=3, max_new_tokens=12, seed=0, **kwargs)
    mask = r.mask_BT
    assert 0 < mask.sum() < mask.numel()  # some rows ended early
    logp_BT = _forward_logp(eos_happy_model, r)
    assert torch.allclose(logp_BT[mask], r.behaviour_logp_BT[mask], atol=1e-4, rtol=0)
    assert (r.behaviour_logp_BT[~mask] == 0).all()


def test_layout_of_rollouts(eos_happy_model, char_tokenizer):
    tok = char_tokenizer
    r = sample(eos_happy_model, tok, PROMPTS, num_generations=2, max_new_tokens=8, seed=1)
    B, T, P = len(PROMPTS) * 2, r.tokens_BT.shape[1], r.prompt_len
    assert P == max(len(p) for p in PROMPTS) and T <= 8
    assert r.input_ids_BL.shape == r.attention_mask_BL.shape == (B, P + T)
    assert torch.equal(r.tokens_BT, r.input_ids_BL[:, P:])
    assert r.prompt_index_B.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for row in range(B):
        prompt = PROMPTS[r.prompt_index_B[row]]
        n = len(prompt)
        assert tok.decode(r.input_ids_BL[row, P - n:P]) == prompt  # left-padded prompt
        assert r.attention_mask_BL[row, :P - n].sum() == 0 and r.attention_mask_BL[row, P - n:P].all()
        assert (r.input_ids_BL[row, :P - n] == tok.pad_token_id).all()
        assert torch.equal(r.attention_mask_BL[row, P:].bool(), r.mask_BT[row])
        kept = r.tokens_BT[row][r.mask_BT[row]]
        assert tok.decode(kept, skip_special_tokens=True) == r.completions[row]
        assert (r.tokens_BT[row][~r.mask_BT[row]] == tok.pad_token_id).all()
    assert r.num_masked == int(r.mask_BT.sum())
    sub = r.select(slice(2, 4))
    assert sub.prompt_index_B.tolist() == [1, 1] and sub.completions == r.completions[2:4]


def test_completion_mask_keeps_the_first_eos_only():
    eos, pad = 2, 0
    ids = torch.tensor([
        [5, 6, eos, pad, pad],  # EOS then padding
        [5, eos, eos, eos, eos],  # pad == eos: generate fills finished rows with EOS
        [eos, 5, 6, 7, 8],  # EOS first: only it is kept
        [5, 6, 7, 8, 9],  # no EOS (cut by max_new_tokens): everything kept
    ])
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(completion_mask_from_ids(ids, eos), expected)
    assert torch.equal(completion_mask_from_ids(ids, [eos, 9])[3], torch.tensor([1, 1, 1, 1, 1], dtype=torch.bool))
    assert completion_mask_from_ids(ids, None).all()


def test_pad_equal_to_eos_end_to_end(eos_happy_model, char_tokenizer):
    tok = copy.deepcopy(char_tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    r = sample(eos_happy_model, tok, PROMPTS, num_generations=4, max_new_tokens=12, seed=0)
    eos = tok.eos_token_id
    ended = (r.tokens_BT == eos) & r.mask_BT
    assert ended.any() and (ended.sum(1) <= 1).all()  # exactly one EOS kept in rows that ended
    for row in range(r.input_ids_BL.shape[0]):
        m = r.mask_BT[row]
        if ended[row].any():  # the kept EOS is the last masked-in token
            assert r.tokens_BT[row, int(m.sum()) - 1] == eos and m[:int(m.sum())].all()
    logp_BT = _forward_logp(eos_happy_model, r)
    assert torch.allclose(logp_BT[r.mask_BT], r.behaviour_logp_BT[r.mask_BT], atol=1e-4, rtol=0)


def test_seed_is_reproducible_and_leaves_the_global_rng(tiny_model, char_tokenizer):
    state = torch.get_rng_state()
    a = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=5)
    b = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.input_ids_BL, b.input_ids_BL) and a.completions == b.completions
    c = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=6)
    assert not torch.equal(a.input_ids_BL, c.input_ids_BL)


def test_greedy_and_top_k_one_pick_the_argmax(tiny_model, char_tokenizer):
    greedy = sample(tiny_model, char_tokenizer, PROMPTS, max_new_tokens=6, temperature=0.0)
    top1 = sample(tiny_model, char_tokenizer, PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1, seed=0)
    assert torch.equal(greedy.tokens_BT, top1.tokens_BT)
    with torch.no_grad():
        logits_BTV = completion_logits(tiny_model, greedy)
    assert torch.equal(logits_BTV.argmax(-1)[greedy.mask_BT], greedy.tokens_BT[greedy.mask_BT])


def test_model_mode_is_restored(tiny_model, char_tokenizer):
    tiny_model.train()
    sample(tiny_model, char_tokenizer, ["1>"], max_new_tokens=2, seed=0)
    assert tiny_model.training


def test_bad_prompts_are_clear_errors(tiny_model, char_tokenizer):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample(tiny_model, char_tokenizer, ["12>", ""])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sample(tiny_model, char_tokenizer, ["   "])
    with pytest.raises(ValueError, match="non-empty list"):
        sample(tiny_model, char_tokenizer, [])
    context = tiny_model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"{context - 5} tokens.*max_new_tokens=16.*context of {context}.*shorten"):
        sample(tiny_model, char_tokenizer, ["1>", "7" * (context - 5)], max_new_tokens=16)
    with pytest.raises(ValueError, match="num_generations"):
        sample(tiny_model, char_tokenizer, ["1>"], num_generations=0)
    with pytest.raises(ValueError, match="top_p"):
        sample(tiny_model, char_tokenizer, ["1>"], top_p=0.0)


def test_chat_template_is_used_when_the_tokenizer_has_one(tiny_model, char_tokenizer):
    with pytest.raises(ValueError, match="no chat template"):
        sample(tiny_model, char_tokenizer, ["1>"], use_chat_template=True)
    plain = sample(tiny_model, char_tokenizer, ["12>"], max_new_tokens=2, seed=0)
    assert plain.prompt_texts == ["12>"]  # "auto" without a template: the plain prompt
    tok = copy.deepcopy(char_tokenizer)
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    r = sample(tiny_model, tok, ["12>"], max_new_tokens=2, seed=0)
    assert r.prompt_texts == ["[user] 12>\n[assistant] "]
    assert tok.decode(r.input_ids_BL[0, :r.prompt_len]) == "[user] 12>\n[assistant] "
    r = sample(tiny_model, tok, ["12>"], max_new_tokens=2, seed=0, use_chat_template=False)
    assert r.prompt_texts == ["12>"]


def test_build_rollouts_from_texts(char_tokenizer, tiny_model):
    tok = char_tokenizer
    r = build_rollouts(tok, ["12>", "4071>"], ["21", "1704"])
    assert r.prompt_len == 5 and r.tokens_BT.shape == (2, 5)
    assert r.mask_BT.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert r.tokens_BT[0, 2] == tok.eos_token_id and r.tokens_BT[1, 4] == tok.eos_token_id
    assert r.completions == ["21", "1704"] and (r.behaviour_logp_BT == 0).all()
    no_eos = build_rollouts(tok, ["12>", "4071>"], ["21", "1704"], add_eos=False)
    assert no_eos.mask_BT.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    # the teacher-forced log-probs of a greedy sample equal its behaviour log-probs
    greedy = sample(tiny_model, tok, ["12>", "4071>"], max_new_tokens=4, temperature=0.0)
    forced = build_rollouts(tok, ["12>", "4071>"], greedy.completions, add_eos=False)
    assert torch.equal(forced.tokens_BT, greedy.tokens_BT)
    assert torch.allclose(_forward_logp(tiny_model, forced), greedy.behaviour_logp_BT, atol=1e-4)


def test_sampling_speed_is_reasonable(tiny_model, char_tokenizer):
    """Not a benchmark: guards against losing the KV cache (tens of thousands of tokens/s expected)."""
    import time

    start = time.perf_counter()
    r = sample(tiny_model, char_tokenizer, ["0412>"] * 64, max_new_tokens=32, seed=0)
    seconds = time.perf_counter() - start
    assert r.tokens_BT.numel() / seconds > 500


def test_model_generation_defaults_do_not_change_the_sampling_distribution(tiny_model, char_tokenizer):
    """Hub models often ship a repetition penalty / min-p in generation_config.json: they must not apply."""
    clean = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, max_new_tokens=8, seed=3)
    gc = tiny_model.generation_config
    gc.repetition_penalty, gc.min_p, gc.typical_p, gc.no_repeat_ngram_size = 5.0, 0.9, 0.2, 1
    gc.top_k, gc.temperature, gc.do_sample = 1, 0.1, True
    tweaked = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, max_new_tokens=8, seed=3)
    assert torch.equal(clean.input_ids_BL, tweaked.input_ids_BL)
    assert torch.allclose(clean.behaviour_logp_BT, tweaked.behaviour_logp_BT)
    greedy = sample(tiny_model, char_tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        argmax = completion_logits(tiny_model, greedy).argmax(-1)
    assert torch.equal(argmax[greedy.mask_BT], greedy.tokens_BT[greedy.mask_BT])


def test_padding_rows_of_the_embedding_are_never_sampled(tiny_model, char_tokenizer):
    V = len(char_tokenizer)
    tiny_model.resize_token_embeddings(128, mean_resizing=False)
    with torch.no_grad():
        tiny_model.lm_head.weight[V:] = 5.0 * tiny_model.model.norm.weight.sign()  # make them very likely
        tiny_model.model.norm.weight.mul_(3.0)
    r = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=4, max_new_tokens=8, seed=0)
    assert r.tokens_BT.max() < V
    # behaviour log-probs are over the tokens that can be sampled (the head trimmed to len(tokenizer)), as the
    # training loop's student log-probs are, so the on-policy importance ratio is exactly 1
    logp_BT = _forward_logp(tiny_model, r, vocab_size=V)
    assert torch.allclose(logp_BT[r.mask_BT], r.behaviour_logp_BT[r.mask_BT], atol=1e-4)
    untrimmed = _forward_logp(tiny_model, r)
    assert not torch.allclose(untrimmed[r.mask_BT], r.behaviour_logp_BT[r.mask_BT], atol=1e-2)


# --- the fast path: method="decode" (KV-cache loop, inverse-CDF draws, log-probs recorded while decoding) ----


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9, top_k=20),
    dict(temperature=0.0),
])
def test_decode_records_the_forward_log_probs(eos_happy_model, char_tokenizer, kwargs):
    """Recorded while decoding, log π(y_t) equals the trainer's forward to float rounding (measured max 5e-6
    here, not bit for bit: a KV-cache step multiplies other matrix shapes); behaviour_logp='forward' is exact."""
    r = sample(eos_happy_model, char_tokenizer, PROMPTS, num_generations=3, max_new_tokens=12, seed=0,
               method="decode", **kwargs)
    mask = r.mask_BT
    assert 0 < mask.sum() < mask.numel()
    logp_BT = _forward_logp(eos_happy_model, r)
    assert torch.allclose(logp_BT[mask], r.behaviour_logp_BT[mask], atol=1e-4, rtol=0)
    assert (r.behaviour_logp_BT[~mask] == 0).all()
    exact = sample(eos_happy_model, char_tokenizer, PROMPTS, num_generations=3, max_new_tokens=12, seed=0,
                   method="decode", behaviour_logp="forward", **kwargs)
    assert torch.equal(exact.tokens_BT, r.tokens_BT)  # the same draw
    assert torch.equal(exact.behaviour_logp_BT, sampled_token_logprobs(eos_happy_model, exact, len(char_tokenizer)))


def test_decode_layout_and_greedy_match_generate(eos_happy_model, char_tokenizer):
    ref = sample(eos_happy_model, char_tokenizer, PROMPTS, num_generations=2, max_new_tokens=12, temperature=0.0)
    fast = sample(eos_happy_model, char_tokenizer, PROMPTS, num_generations=2, max_new_tokens=12, temperature=0.0,
                  method="decode")
    for name in ("input_ids_BL", "attention_mask_BL", "tokens_BT", "mask_BT", "prompt_index_B"):
        assert torch.equal(getattr(ref, name), getattr(fast, name)), name
    assert ref.completions == fast.completions and ref.prompt_len == fast.prompt_len
    assert torch.allclose(ref.behaviour_logp_BT, fast.behaviour_logp_BT, atol=1e-4, rtol=0)


def test_decode_seed_is_reproducible_and_leaves_the_global_rng(tiny_model, char_tokenizer):
    state = torch.get_rng_state()
    a = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=5, method="decode")
    b = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=5, method="decode")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.input_ids_BL, b.input_ids_BL) and torch.equal(a.behaviour_logp_BT, b.behaviour_logp_BT)
    c = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=6, method="decode")
    assert not torch.equal(a.input_ids_BL, c.input_ids_BL)


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of observed counts against probabilities (cells with an expected count below 5
    pooled); the p-value from the Wilson-Hilferty normal approximation of the chi-square distribution."""
    n = counts.sum().double()
    expected, counts = probs.double() * n, counts.double()
    small = expected < 5
    exp_cells = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    obs_cells = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    keep = exp_cells > 0
    assert (obs_cells[~keep] == 0).all(), "a token of probability 0 was drawn"
    stat = float(((obs_cells[keep] - exp_cells[keep]) ** 2 / exp_cells[keep]).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / (2 / (9 * df)) ** 0.5
    return float(0.5 * torch.erfc(torch.tensor(z / 2 ** 0.5, dtype=torch.float64)))


def _expected_probs(model, ids_1L, V, temperature, top_k, top_p):
    """The next-token distribution generate samples from, by transformers' own warpers on one forward."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    with torch.no_grad():
        scores = model(input_ids=ids_1L).logits[:, -1, :V].float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids_1L, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids_1L, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids_1L, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("method", ["decode", "generate"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_samples_follow_the_model_distribution(tiny_model, char_tokenizer, method, temperature, top_k, top_p):
    """Chi-square tests, 4,000 samples: the first token against the exact filtered softmax, and the second
    token (drawn after one KV-cache step) given the most frequent first token. The reference sampler
    (generate) passes the same test, so the test itself is checked."""
    tok, V, n = char_tokenizer, len(char_tokenizer), 4000
    with torch.no_grad():  # a flatter distribution than random init's near-uniform one: more informative cells
        tiny_model.model.norm.weight.mul_(8.0)
    r = sample(tiny_model, tok, ["12>"], num_generations=n, max_new_tokens=2, seed=0, temperature=temperature,
               top_k=top_k, top_p=top_p, method=method, use_chat_template=False)
    prompt_1L = r.input_ids_BL[:1, :r.prompt_len]
    first_B = r.tokens_BT[:, 0]
    p1 = _expected_probs(tiny_model, prompt_1L, V, temperature, top_k, top_p)
    assert _chi_square_p_value(torch.bincount(first_B, minlength=V), p1) > 1e-3
    y0 = int(torch.bincount(first_B, minlength=V).argmax())
    rows = (first_B == y0) & r.mask_BT[:, 1]
    assert rows.sum() > 200
    p2 = _expected_probs(tiny_model, torch.cat([prompt_1L, torch.tensor([[y0]])], 1), V, temperature, top_k, top_p)
    assert _chi_square_p_value(torch.bincount(r.tokens_BT[rows, 1], minlength=V), p2) > 1e-3


def test_filter_logits_matches_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from opd_mini.sampler import filter_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    logits[0, :5] = 2.0  # ties at the k-th value are kept by both
    ids = torch.zeros(6, 1, dtype=torch.long)
    for temperature, k, p in [(0.7, 20, 0.9), (1.0, 5, 1.0), (1.3, 0, 0.5), (1.0, 0, 1.0), (1.0, 50, 0.01)]:
        ref = TemperatureLogitsWarper(temperature)(ids, logits.clone()) if temperature != 1.0 else logits.clone()
        ref = TopKLogitsWarper(k)(ids, ref) if k else ref
        ref = TopPLogitsWarper(p)(ids, ref) if p < 1.0 else ref
        assert torch.equal(filter_logits(logits, temperature, k, p), ref), (temperature, k, p)


def test_inverse_cdf_sample_never_draws_zero_probability_tokens():
    from opd_mini.sampler import inverse_cdf_sample

    probs = torch.zeros(4, 10)
    probs[0, 0] = probs[1, 9] = 1.0
    probs[2, 3] = probs[2, 4] = 0.5
    probs[3, [1, 7]] = torch.tensor([1e-30, 2e-30])  # tiny but unnormalised: still a valid distribution
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([inverse_cdf_sample(probs, g) for _ in range(500)])
    assert (draws[:, 0] == 0).all() and (draws[:, 1] == 9).all()
    assert set(draws[:, 2].tolist()) == {3, 4} and set(draws[:, 3].tolist()) == {1, 7}


def test_decode_with_a_lora_student_and_padding_rows(tiny_model_dir, tiny_model, char_tokenizer):
    from opd_mini.student import load_student

    student = load_student(tiny_model_dir, lora=True)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    r = sample(student, char_tokenizer, PROMPTS, num_generations=2, max_new_tokens=6, seed=0, method="decode")
    assert torch.allclose(sampled_token_logprobs(student, r)[r.mask_BT], r.behaviour_logp_BT[r.mask_BT],
                          atol=1e-4)
    V = len(char_tokenizer)
    tiny_model.resize_token_embeddings(128, mean_resizing=False)
    with torch.no_grad():
        tiny_model.lm_head.weight[V:] = 5.0 * tiny_model.model.norm.weight.sign()
        tiny_model.model.norm.weight.mul_(3.0)
    r = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=4, max_new_tokens=8, seed=0, method="decode")
    assert r.tokens_BT.max() < V
    assert torch.allclose(_forward_logp(tiny_model, r, vocab_size=V)[r.mask_BT],
                          r.behaviour_logp_BT[r.mask_BT], atol=1e-4)


def test_method_errors(tiny_model, char_tokenizer):
    with pytest.raises(ValueError, match="method must be one of generate, decode"):
        sample(tiny_model, char_tokenizer, ["1>"], method="vllm")
    with pytest.raises(ValueError, match="behaviour_logp must be one of"):
        sample(tiny_model, char_tokenizer, ["1>"], method="decode", behaviour_logp="cache")
    with pytest.raises(ValueError, match="needs method='decode'"):
        sample(tiny_model, char_tokenizer, ["1>"], method="generate", behaviour_logp="decode")


@pytest.mark.parametrize("V, spread", [(101, 3.0), (2_000, 1.0), (2_000, 0.05), (50_000, 2.0)])
def test_top_p_without_a_full_sort_equals_the_hf_warper(V, spread):
    """The nucleus found from the top-k candidates (sorting the whole vocabulary only for rows whose nucleus is wider) keeps exactly
    the tokens of generate's TopPLogitsWarper, on sharp and on flat distributions (flat ones need the fallback).
    In float64, so that no token sits within the two summation orders' rounding of the boundary (in float32 the
    nucleus sums in float64 and is the more accurate of the two)."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from opd_mini.sampler import filter_logits

    g = torch.Generator().manual_seed(V)
    for top_p in (0.5, 0.9, 0.99):
        logits = torch.randn(6, V, generator=g, dtype=torch.float64) * spread
        ours = torch.isfinite(filter_logits(logits, top_p=top_p))
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        assert torch.equal(ours, theirs), (V, spread, top_p, (ours != theirs).sum())
