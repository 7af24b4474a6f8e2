"""The offline tiny world: character tokenizer, tiny Llama configs, local "model ids", the trained pair."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from opd_mini.tasks import get_task
from opd_mini.tiny import (
    DEFAULT_TASK,
    build_char_tokenizer,
    build_tiny_model,
    ensure_tiny_models,
    greedy_accuracy,
    main,
    num_parameters,
    tiny_config,
)


def test_char_tokenizer_is_a_fast_character_tokenizer(char_tokenizer):
    tok = char_tokenizer
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == 101
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    text = "12 3+4=\n\n579>~"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no special tokens added
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("ab")["input_ids"]) == ["a", "b"]
    assert tok("é")["input_ids"] == [tok.unk_token_id]
    assert tok.decode([5, 6, tok.eos_token_id, 0], skip_special_tokens=True) == tok.decode([5, 6])
    assert build_char_tokenizer().get_vocab() == tok.get_vocab()  # deterministic vocabulary
    assert tok.chat_template is None


def test_char_tokenizer_round_trips_through_save_pretrained(char_tokenizer, tmp_path):
    char_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(char_tokenizer) and loaded.get_vocab() == char_tokenizer.get_vocab()
    for text in ["reverse 0412>2140", "a b\tc\n", "123+456=579"]:
        assert loaded(text)["input_ids"] == char_tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token, loaded.eos_token, loaded.eos_token_id) == ("<pad>", "<eos>", 2)


def test_tiny_configs():
    teacher, student = tiny_config("teacher", vocab_size=101), tiny_config("student", vocab_size=101)
    assert teacher.num_hidden_layers >= 2 and 64 <= teacher.hidden_size <= 128
    assert student.num_hidden_layers * student.hidden_size < teacher.num_hidden_layers * teacher.hidden_size
    bench = tiny_config("bench", vocab_size=151_936, max_position_embeddings=512)
    assert (bench.vocab_size, bench.num_hidden_layers, bench.hidden_size) == (151_936, 2, 64)
    assert bench.max_position_embeddings == 512
    with pytest.raises(ValueError, match="unknown tiny size"):
        tiny_config("huge", vocab_size=10)


def test_build_tiny_model_is_deterministic_and_leaves_the_global_rng(char_tokenizer):
    state = torch.get_rng_state()
    a, b = build_tiny_model("student", char_tokenizer, seed=3), build_tiny_model("student", char_tokenizer, seed=3)
    c = build_tiny_model("student", char_tokenizer, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.dtype == torch.float32 and a.config.vocab_size == len(char_tokenizer)
    assert num_parameters(a) < num_parameters(build_tiny_model("teacher", char_tokenizer))


def test_a_local_save_pretrained_dir_loads_like_a_model_id(tiny_model_dir, char_tokenizer):
    """The "any Hugging Face model id" path: from_pretrained on a local directory, no network."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = build_tiny_model("teacher", char_tokenizer, seed=0)  # what conftest saved
    ids = torch.tensor([tokenizer("0412>2140")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_shipped_pair_loads_and_is_consistent(tiny_pair):
    info = tiny_pair["info"]
    assert tiny_pair["task"] == info["task"] == DEFAULT_TASK
    assert info["teacher"]["greedy_accuracy"] >= 0.95
    assert 0.2 <= info["student"]["greedy_accuracy"] <= 0.6
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["tokenizer"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    assert num_parameters(student) < num_parameters(teacher)
    task = get_task(DEFAULT_TASK)
    assert greedy_accuracy(teacher, tokenizer, task, n=64, seed=7) >= 0.9
    assert AutoTokenizer.from_pretrained(tiny_pair["teacher"]).get_vocab() == tokenizer.get_vocab()


@pytest.mark.slow
def test_train_tiny_pair_from_scratch_and_cache(tmp_path, capsys):
    """Trains the default teacher and warm-started student (~20 s on 2 CPU cores), then hits the cache."""
    start = time.perf_counter()
    paths = ensure_tiny_models(tmp_path, progress=False, use_assets=False)
    trained_in = time.perf_counter() - start
    info = json.loads((tmp_path / paths["dir"].split("/")[-1] / "info.json").read_text())
    assert info["teacher"]["greedy_accuracy"] >= 0.95, info
    assert 0.2 <= info["student"]["greedy_accuracy"] <= 0.6, info  # worse than the teacher, but not zero
    assert trained_in < 120
    for role in ("teacher", "student", "tokenizer"):
        assert paths[role].startswith(str(tmp_path))

    start = time.perf_counter()
    again = ensure_tiny_models(tmp_path, progress=False, use_assets=False)
    assert again == paths and time.perf_counter() - start < 1.0  # cached: instant
    main(["--out", str(tmp_path), "--no-progress"])  # the CLI reports the cached pair
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "100.0%" in out
