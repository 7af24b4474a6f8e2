"""Sampler: behaviour log-probs equal a separate forward pass, completion-mask semantics, layout, errors."""

import copy

import pytest
import torch

from opd_mini.losses import token_logprobs
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
        return token_logprobs(completion_logits(model, rollouts, vocab_size), rollouts.completion_ids)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.9, top_k=20),
    dict(temperature=0.0),
])
def test_behaviour_logp_equals_a_separate_forward_pass(eos_happy_model, char_tokenizer, kwargs):
    r = sample(eos_happy_model, char_tokenizer, PROMPTS, num_generations=3, max_new_tokens=12, seed=0, **kwargs)
    mask = r.completion_mask
    assert 0 < mask.sum() < mask.numel()  # some rows ended early
    logp_BT = _forward_logp(eos_happy_model, r)
    assert torch.allclose(logp_BT[mask], r.behaviour_logp[mask], atol=1e-4, rtol=0)
    assert (r.behaviour_logp[~mask] == 0).all()


def test_layout_of_rollouts(eos_happy_model, char_tokenizer):
    tok = char_tokenizer
    r = sample(eos_happy_model, tok, PROMPTS, num_generations=2, max_new_tokens=8, seed=1)
    B, T, P = len(PROMPTS) * 2, r.completion_ids.shape[1], r.prompt_len
    assert P == max(len(p) for p in PROMPTS) and T <= 8
    assert r.input_ids.shape == r.attention_mask.shape == (B, P + T)
    assert torch.equal(r.completion_ids, r.input_ids[:, P:])
    assert r.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for row in range(B):
        prompt = PROMPTS[r.prompt_index[row]]
        n = len(prompt)
        assert tok.decode(r.input_ids[row, P - n:P]) == prompt  # left-padded prompt
        assert r.attention_mask[row, :P - n].sum() == 0 and r.attention_mask[row, P - n:P].all()
        assert (r.input_ids[row, :P - n] == tok.pad_token_id).all()
        assert torch.equal(r.attention_mask[row, P:].bool(), r.completion_mask[row])
        kept = r.completion_ids[row][r.completion_mask[row]]
        assert tok.decode(kept, skip_special_tokens=True) == r.completions[row]
        assert (r.completion_ids[row][~r.completion_mask[row]] == tok.pad_token_id).all()
    assert r.num_tokens == int(r.completion_mask.sum())
    sub = r.select(slice(2, 4))
    assert sub.prompt_index.tolist() == [1, 1] and sub.completions == r.completions[2:4]


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
    ended = (r.completion_ids == eos) & r.completion_mask
    assert ended.any() and (ended.sum(1) <= 1).all()  # exactly one EOS kept in rows that ended
    for row in range(r.input_ids.shape[0]):
        m = r.completion_mask[row]
        if ended[row].any():  # the kept EOS is the last masked-in token
            assert r.completion_ids[row, int(m.sum()) - 1] == eos and m[:int(m.sum())].all()
    logp_BT = _forward_logp(eos_happy_model, r)
    assert torch.allclose(logp_BT[r.completion_mask], r.behaviour_logp[r.completion_mask], atol=1e-4, rtol=0)


def test_seed_is_reproducible_and_leaves_the_global_rng(tiny_model, char_tokenizer):
    state = torch.get_rng_state()
    a = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=5)
    b = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.input_ids, b.input_ids) and a.completions == b.completions
    c = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, seed=6)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_greedy_and_top_k_one_pick_the_argmax(tiny_model, char_tokenizer):
    greedy = sample(tiny_model, char_tokenizer, PROMPTS, max_new_tokens=6, temperature=0.0)
    top1 = sample(tiny_model, char_tokenizer, PROMPTS, max_new_tokens=6, temperature=1.0, top_k=1, seed=0)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    with torch.no_grad():
        logits_BTV = completion_logits(tiny_model, greedy)
    assert torch.equal(logits_BTV.argmax(-1)[greedy.completion_mask], greedy.completion_ids[greedy.completion_mask])


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
    assert tok.decode(r.input_ids[0, :r.prompt_len]) == "[user] 12>\n[assistant] "
    r = sample(tiny_model, tok, ["12>"], max_new_tokens=2, seed=0, use_chat_template=False)
    assert r.prompt_texts == ["12>"]


def test_build_rollouts_from_texts(char_tokenizer, tiny_model):
    tok = char_tokenizer
    r = build_rollouts(tok, ["12>", "4071>"], ["21", "1704"])
    assert r.prompt_len == 5 and r.completion_ids.shape == (2, 5)
    assert r.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert r.completion_ids[0, 2] == tok.eos_token_id and r.completion_ids[1, 4] == tok.eos_token_id
    assert r.completions == ["21", "1704"] and (r.behaviour_logp == 0).all()
    no_eos = build_rollouts(tok, ["12>", "4071>"], ["21", "1704"], add_eos=False)
    assert no_eos.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    # the teacher-forced log-probs of a greedy sample equal its behaviour log-probs
    greedy = sample(tiny_model, tok, ["12>", "4071>"], max_new_tokens=4, temperature=0.0)
    forced = build_rollouts(tok, ["12>", "4071>"], greedy.completions, add_eos=False)
    assert torch.equal(forced.completion_ids, greedy.completion_ids)
    assert torch.allclose(_forward_logp(tiny_model, forced), greedy.behaviour_logp, atol=1e-4)


def test_sampling_speed_is_reasonable(tiny_model, char_tokenizer):
    """Not a benchmark: guards against losing the KV cache (tens of thousands of tokens/s expected)."""
    import time

    start = time.perf_counter()
    r = sample(tiny_model, char_tokenizer, ["0412>"] * 64, max_new_tokens=32, seed=0)
    seconds = time.perf_counter() - start
    assert r.completion_ids.numel() / seconds > 500


def test_model_generation_defaults_do_not_change_the_sampling_distribution(tiny_model, char_tokenizer):
    """Hub models often ship a repetition penalty / min-p in generation_config.json: they must not apply."""
    clean = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, max_new_tokens=8, seed=3)
    gc = tiny_model.generation_config
    gc.repetition_penalty, gc.min_p, gc.typical_p, gc.no_repeat_ngram_size = 5.0, 0.9, 0.2, 1
    gc.top_k, gc.temperature, gc.do_sample = 1, 0.1, True
    tweaked = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, max_new_tokens=8, seed=3)
    assert torch.equal(clean.input_ids, tweaked.input_ids)
    assert torch.allclose(clean.behaviour_logp, tweaked.behaviour_logp)
    greedy = sample(tiny_model, char_tokenizer, PROMPTS, max_new_tokens=8, temperature=0.0)
    with torch.no_grad():
        argmax = completion_logits(tiny_model, greedy).argmax(-1)
    assert torch.equal(argmax[greedy.completion_mask], greedy.completion_ids[greedy.completion_mask])


def test_padding_rows_of_the_embedding_are_never_sampled(tiny_model, char_tokenizer):
    V = len(char_tokenizer)
    tiny_model.resize_token_embeddings(128, mean_resizing=False)
    with torch.no_grad():
        tiny_model.lm_head.weight[V:] = 5.0 * tiny_model.model.norm.weight.sign()  # make them very likely
        tiny_model.model.norm.weight.mul_(3.0)
    r = sample(tiny_model, char_tokenizer, PROMPTS, num_generations=4, max_new_tokens=8, seed=0)
    assert r.completion_ids.max() < V
    # behaviour log-probs are over the tokens that can be sampled (the head trimmed to len(tokenizer)), as the
    # training loop's student log-probs are, so the on-policy importance ratio is exactly 1
    logp_BT = _forward_logp(tiny_model, r, vocab_size=V)
    assert torch.allclose(logp_BT[r.completion_mask], r.behaviour_logp[r.completion_mask], atol=1e-4)
    untrimmed = _forward_logp(tiny_model, r)
    assert not torch.allclose(untrimmed[r.completion_mask], r.behaviour_logp[r.completion_mask], atol=1e-2)
