"""Teacher: chunked scoring equals an unchunked reference, quantized teachers, self-distillation, vocab check."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_mini.sampler import sample
from opd_mini.student import load_student
from opd_mini.tasks import get_task
from opd_mini.teacher import (
    load_teacher,
    quantization_config,
    score,
    shared_vocab_size,
    teacher_is_student_base,
)

PROMPTS = ["12>", "4071>", "x", "953>"]


@pytest.fixture
def rollouts(tiny_model, char_tokenizer):
    return sample(tiny_model, char_tokenizer, PROMPTS, num_generations=2, max_new_tokens=7, seed=0)


def _reference_logp(model, r, vocab_size):
    """Unchunked reference: one plain forward, full log-softmax over the trimmed vocabulary, (B, T, V)."""
    P, T = r.prompt_len, r.tokens_BT.shape[1]
    with torch.no_grad():
        logits = model(input_ids=r.input_ids_BL, attention_mask=r.attention_mask_BL, position_ids=r.position_ids_BL()).logits
    return F.log_softmax(logits[:, P - 1:P + T - 1, :vocab_size].float(), dim=-1)


@pytest.mark.parametrize("chunk", [1, 3, "T", 1000])
def test_chunked_scoring_equals_an_unchunked_reference(tiny_model, char_tokenizer, rollouts, chunk):
    V, K = len(char_tokenizer), 5
    T = rollouts.tokens_BT.shape[1]
    sig = score(tiny_model, rollouts, vocab_size=V, top_k=K, full=True, chunk_size=T if chunk == "T" else chunk)
    logq_BTV = _reference_logp(tiny_model, rollouts, V)
    m = rollouts.mask_BT
    assert sig.teacher_logp_BT.shape == m.shape and sig.tokens_BT is rollouts.tokens_BT
    picked = logq_BTV.gather(-1, rollouts.tokens_BT.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(sig.teacher_logp_BT[m], picked[m], atol=1e-5)
    assert (sig.teacher_logp_BT[~m] == 0).all() and (sig.teacher_entropy_BT[~m] == 0).all()
    entropy = -(logq_BTV.exp() * logq_BTV).sum(-1)
    assert torch.allclose(sig.teacher_entropy_BT[m], entropy[m], atol=1e-5)
    top_logp, top_ids = logq_BTV.topk(K, dim=-1)
    assert sig.teacher_topk_ids_BTK.shape == sig.teacher_topk_logp_BTK.shape == (*m.shape, K)
    assert torch.equal(sig.teacher_topk_ids_BTK, top_ids) and torch.allclose(sig.teacher_topk_logp_BTK, top_logp, atol=1e-5)
    assert torch.allclose(sig.teacher_logp_BTV, logq_BTV, atol=1e-5)


def test_scoring_keeps_only_what_is_asked(tiny_model, char_tokenizer, rollouts):
    sig = score(tiny_model, rollouts, vocab_size=len(char_tokenizer))
    assert sig.teacher_topk_ids_BTK is None and sig.teacher_topk_logp_BTK is None and sig.teacher_logp_BTV is None
    sig = score(tiny_model, rollouts, vocab_size=60, top_k=60)  # trimmed vocabulary, K = V
    assert sig.teacher_topk_logp_BTK.shape[-1] == 60
    assert torch.allclose(sig.teacher_topk_logp_BTK.exp().sum(-1), torch.ones(sig.teacher_topk_logp_BTK.shape[:2]))
    with pytest.raises(ValueError, match="top_k"):
        score(tiny_model, rollouts, vocab_size=60, top_k=61)
    with pytest.raises(ValueError, match="chunk_size"):
        score(tiny_model, rollouts, vocab_size=60, chunk_size=-1)
    with pytest.raises(ValueError, match="disable_adapter"):
        score(tiny_model, rollouts, vocab_size=60, disable_adapter=True)


def test_self_distillation_scores_the_base_with_the_adapter_disabled(tiny_model_dir, char_tokenizer, rollouts):
    student = load_student(tiny_model_dir, lora=True)
    with torch.no_grad():  # make the adapters non-trivial (LoRA B starts at zero)
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    V = len(char_tokenizer)
    as_base = score(student, rollouts, vocab_size=V, top_k=4, disable_adapter=True)
    reference = score(base, rollouts, vocab_size=V, top_k=4)
    assert torch.allclose(as_base.teacher_logp_BT, reference.teacher_logp_BT, atol=1e-6)
    assert torch.equal(as_base.teacher_topk_ids_BTK, reference.teacher_topk_ids_BTK)
    assert torch.allclose(as_base.teacher_entropy_BT, reference.teacher_entropy_BT, atol=1e-6)
    with_adapter = score(student, rollouts, vocab_size=V)
    assert not torch.allclose(with_adapter.teacher_logp_BT, reference.teacher_logp_BT, atol=1e-3)
    assert student.training  # the mode is restored
    assert teacher_is_student_base(student, tiny_model_dir)
    assert not teacher_is_student_base(student, "some/other-model")
    assert not teacher_is_student_base(base, tiny_model_dir)


# --- quantized teachers ---------------------------------------------------------------------------------

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@needs_bnb
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("quantization, max_mean_abs, max_mean_kl", [("8bit", 0.02, 1e-3), ("4bit", 0.1, 1e-2)])
def test_quantized_teacher_scores_close_to_full_precision(tiny_pair, quantization, max_mean_abs, max_mean_kl):
    """Trained tiny teacher (save_pretrained dir) on the student's samples. Measured on this CPU:
    8-bit mean |Δ log q| ≈ 0.002 nats, mean KL ≈ 1e-6; 4-bit (NF4) ≈ 0.02 nats, mean KL ≈ 7e-5;
    the mean |log q| of the sampled tokens is ≈ 1.2 nats. Tolerances are 10x those figures or more."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair["student"])
    examples = get_task(tiny_pair["task"]).examples(64, seed=3)
    r = sample(student, tokenizer, [e.prompt for e in examples], max_new_tokens=7, seed=0)
    V, m = len(tokenizer), r.mask_BT
    reference = score(load_teacher(tiny_pair["teacher"]), r, vocab_size=V, top_k=4, full=True)

    teacher = load_teacher(tiny_pair["teacher"], quantization=quantization)
    layer = teacher.model.layers[0].mlp.up_proj
    assert type(layer).__name__ == {"8bit": "Linear8bitLt", "4bit": "Linear4bit"}[quantization]
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    sig = score(teacher, r, vocab_size=V, top_k=4, full=True, chunk_size=3)
    mean_abs = (sig.teacher_logp_BT - reference.teacher_logp_BT).abs()[m].mean()
    kl_BT = (reference.teacher_logp_BTV.exp() * (reference.teacher_logp_BTV - sig.teacher_logp_BTV)).sum(-1)  # KL(q_fp32 ‖ q_quant)
    assert mean_abs < max_mean_abs, mean_abs
    assert kl_BT[m].mean() < max_mean_kl, kl_BT[m].mean()
    assert (sig.teacher_topk_ids_BTK[..., 0] == reference.teacher_topk_ids_BTK[..., 0])[m].float().mean() > 0.98


def test_quantization_errors_say_why_and_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="must be one of"):
        quantization_config("3bit")
    assert quantization_config("none") is None
    with pytest.raises(RuntimeError, match="does not run on device 'mps'.*teacher_quantization='none'"):
        quantization_config("4bit", device="mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available.*--teacher_quantization none"):
            quantization_config("8bit", device="cuda")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="pip install bitsandbytes.*teacher_quantization='none'"):
        quantization_config("4bit", device="cpu")


@needs_bnb
def test_quantization_config_defaults():
    cfg = quantization_config("4bit", device="cpu")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.float32  # no fast bf16 on CPUs
    assert quantization_config("8bit", device="cpu").load_in_8bit


# --- vocabulary check -----------------------------------------------------------------------------------


class _Head:
    """Just enough of a model for the vocabulary check: an output head with ``rows`` rows."""

    def __init__(self, rows: int):
        self.head = torch.nn.Linear(1, rows, bias=False)

    def get_output_embeddings(self):
        return self.head


class _Tokenizer:
    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def get_vocab(self):
        return {f"t{i}": i for i in range(self.n)}


def test_vocab_padding_only_difference_uses_the_tokenizer_length():
    # one model family: embeddings padded to 151,936 and 152,064 rows, tokenizer of 151,665 tokens
    assert shared_vocab_size(_Tokenizer(151_665), _Head(151_936), _Head(152_064)) == 151_665
    assert shared_vocab_size(_Tokenizer(151_936), _Head(151_936), _Head(152_064)) == 151_936


def test_vocab_real_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"student's output head has 32000 rows and the teacher's 152064.*151936"):
        shared_vocab_size(_Tokenizer(151_936), _Head(32_000), _Head(152_064))
    with pytest.raises(ValueError, match=r"151936 tokens, teacher 32000 tokens"):
        shared_vocab_size(_Tokenizer(151_936), _Head(151_936), _Head(152_064), teacher_tokenizer=_Tokenizer(32_000))


def test_vocab_check_on_real_tiny_models(tiny_model_dir, tiny_student_dir, char_tokenizer, tmp_path):
    from opd_mini.tiny import build_tiny_model

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student = load_student(tiny_student_dir, lora=True)  # a peft model works too
    assert shared_vocab_size(char_tokenizer, student, teacher) == len(char_tokenizer)
    teacher.resize_token_embeddings(128, mean_resizing=False)  # padding rows only
    assert shared_vocab_size(char_tokenizer, student, teacher) == len(char_tokenizer)
    small = build_tiny_model("teacher", char_tokenizer, vocab_size=40)
    with pytest.raises(ValueError, match="head has 101 rows and the teacher's 40"):
        shared_vocab_size(char_tokenizer, student, small)
