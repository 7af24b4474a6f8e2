"""A smaller student cut from a model (``--student_drop_layers``): the same network without a block of layers,
checked against the full model with those layers made the identity; written once into the cache, atomically; bad
ranges and an unwritable cache are one line and exit code 2; the loop trains it and records its layers."""

import json
import threading
from pathlib import Path

import pytest
import torch

from opd_mini import layer_drop
from tests.helpers import loop_args


def _identity_hooks(model, first: int, last: int) -> list:
    """Make decoder layers first..last pass their input through unchanged (the reference for dropping them)."""
    def skip(module, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    holder = layer_drop.decoder_layers(model)
    return [holder.layers[i].register_forward_hook(skip, with_kwargs=True) for i in range(first, last + 1)]


def _deep_model_dir(tmp_path, char_tokenizer) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(char_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=char_tokenizer.bos_token_id, eos_token_id=char_tokenizer.eos_token_id,
                         pad_token_id=char_tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "deep")
    char_tokenizer.save_pretrained(tmp_path / "deep")
    return str(tmp_path / "deep")


def test_the_dropped_model_is_the_full_model_with_those_layers_skipped(tmp_path, char_tokenizer):
    from transformers import AutoModelForCausalLM

    source = _deep_model_dir(tmp_path, char_tokenizer)
    small_dir = layer_drop.drop_layers(source, "1-2", tmp_path / "cache", progress=False)
    small, full = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (small_dir, source))
    assert small.config.num_hidden_layers == 3
    ids = torch.randint(3, len(char_tokenizer), (2, 9))
    hooks = _identity_hooks(full, 1, 2)
    with torch.no_grad():
        reference, got = full(ids).logits, small(ids).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)
    with torch.no_grad():  # the KV cache is indexed by the renumbered layers: cached decoding = the full forward
        out = small.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=char_tokenizer.pad_token_id)
        again = small.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False,
                               pad_token_id=char_tokenizer.pad_token_id)
    assert torch.equal(out, again)
    record = json.loads((Path(small_dir) / "opd_mini_gguf.json").read_text())
    assert record["dropped"] == [1, 2] and record["of"] == 5


def test_two_processes_asking_at_once_write_one_folder_once(tmp_path, char_tokenizer, monkeypatch):
    source, calls, got = _deep_model_dir(tmp_path, char_tokenizer), [], []
    real = layer_drop.decoder_layers
    monkeypatch.setattr(layer_drop, "decoder_layers", lambda model: calls.append(1) or real(model))
    threads = [threading.Thread(target=lambda: got.append(layer_drop.drop_layers(source, "0-1", tmp_path / "c",
                                                                                 progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1]
    assert [p for p in (tmp_path / "c").iterdir() if p.is_dir()] == [Path(got[0])]  # no temporary folder left


@pytest.mark.parametrize("text", ["", "a-b", "12-", "17-12", "-3", "1-2-3"])
def test_a_malformed_range_names_the_form(text):
    with pytest.raises(ValueError, match="FIRST-LAST"):
        layer_drop.parse_range(text)


@pytest.mark.parametrize("layers, message", [("4-9", "it has 2 layers"), ("0-1", "at least one must stay"),
                                             ("x", "FIRST-LAST")])
def test_a_bad_range_on_the_command_line_is_one_line_and_exit_code_2(layers, message, tiny_pair, tmp_path, capsys,
                                                                     monkeypatch):
    from opd_mini import train

    monkeypatch.setenv("OPD_MINI_CACHE", str(tmp_path / "cache"))
    code = train.main(loop_args(str(tiny_pair["student"]), str(tiny_pair["teacher"]), tmp_path / "run",
                                student_drop_layers=layers))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "cache" / "dropped").exists()


def test_an_unwritable_cache_is_one_line(tiny_pair, tmp_path, capsys, monkeypatch):
    from opd_mini import train

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("OPD_MINI_CACHE", str(blocker / "cache"))
    code = train.main(loop_args(str(tiny_pair["student"]), str(tiny_pair["teacher"]), tmp_path / "run",
                                student_drop_layers="1"))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "set OPD_MINI_CACHE to a writable directory" in err[0], err


def test_the_loop_trains_the_smaller_student_and_records_it(tiny_pair, tmp_path, monkeypatch):
    from opd_mini import train

    monkeypatch.setenv("OPD_MINI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert train.main(loop_args(str(tiny_pair["student"]), str(tiny_pair["teacher"]), out, student_drop_layers="0",
                                steps=1, task="reverse:3")) == 0
    ran = json.loads((out / "summary.json").read_text())["ran"]
    assert ran["student_layers"] == 1 and Path(ran["student"]).parent == tmp_path / "cache" / "dropped"


def test_an_adapter_of_the_full_model_on_the_smaller_student_is_one_line(tiny_pair, tmp_path, capsys, monkeypatch):
    """A LoRA adapter saved on the 2-layer student holds weights for a layer the 1-layer student lacks: refused before
    any load, with the layer counts named; the adapter of the smaller student itself is accepted."""
    from opd_mini import train

    monkeypatch.setenv("OPD_MINI_CACHE", str(tmp_path / "cache"))
    student, teacher = str(tiny_pair["student"]), str(tiny_pair["teacher"])
    common = dict(lora="true", steps=1, task="reverse:3")
    assert train.main(loop_args(student, teacher, tmp_path / "full", **common)) == 0
    capsys.readouterr()
    full_adapter = next((tmp_path / "full" / "checkpoints").iterdir()) / "model"
    code = train.main(loop_args(student, teacher, tmp_path / "run", student_drop_layers="0", init_adapter=full_adapter,
                                **common))
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "LoRA weights for 2 decoder layers" in err[0] and "has 1" in err[0], err
    assert "--student_drop_layers 0 cut it" in err[0] and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert train.main(loop_args(student, teacher, tmp_path / "small", student_drop_layers="0", **common)) == 0
    small_adapter = next((tmp_path / "small" / "checkpoints").iterdir()) / "model"
    assert train.main(loop_args(student, teacher, tmp_path / "again", student_drop_layers="0",
                                init_adapter=small_adapter, **common)) == 0
