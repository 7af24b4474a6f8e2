"""Student: LoRA (and full) training, save/reload with plain peft, completion logits/hidden states."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from opd_mini.losses import sft_cross_entropy, token_logprobs
from opd_mini.sampler import build_rollouts, sample
from opd_mini.student import completion_hidden, completion_logits, load_student, project_logits, save_student

PROMPTS, ANSWERS = ["12>", "4071>", "953>", "88012>"], ["21", "1704", "359", "21088"]


def _sft_steps(model, rollouts, steps: int, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logp_BT = token_logprobs(completion_logits(model, rollouts), rollouts.tokens_BT)
        loss, _ = sft_cross_entropy(logp_BT, rollouts.mask_BT)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_lora_targets_every_linear_layer_but_the_head(tiny_model_dir):
    model = load_student(tiny_model_dir, lora=True, lora_r=4, lora_alpha=8)
    assert isinstance(model, PeftModel) and model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targeted = {n.split(".")[-4] for n in trainable if n.endswith("lora_A.default.weight")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.task_type) == (4, 8, "CAUSAL_LM")
    only_q = load_student(tiny_model_dir, lora_target_modules=["q_proj"])
    assert {n.split(".")[-4] for n, p in only_q.named_parameters() if p.requires_grad} == {"q_proj"}


def test_lora_student_trains_saves_and_reloads_with_plain_peft(tiny_model_dir, char_tokenizer, tmp_path):
    model = load_student(tiny_model_dir, lora=True, lora_r=8, lora_alpha=16)
    rollouts = build_rollouts(char_tokenizer, PROMPTS, ANSWERS)
    losses = _sft_steps(model, rollouts, steps=8)
    assert losses[-1] < losses[0] - 0.1  # it learns

    path = save_student(model, tmp_path / "adapter", tokenizer=char_tokenizer)
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    assert not (path / "model.safetensors").exists()  # adapters only

    model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(base, str(path)).eval()
    resumed = load_student(tiny_model_dir, adapter_path=path).eval()
    with torch.no_grad():
        expected = completion_logits(model, rollouts)
        assert torch.equal(completion_logits(reloaded, rollouts), expected)
        assert torch.equal(completion_logits(resumed, rollouts), expected)
        merged = reloaded.merge_and_unload()  # the adapters also merge into a plain model
        assert torch.allclose(completion_logits(merged, rollouts), expected, atol=1e-5)
    assert any(p.requires_grad for p in resumed.parameters())


def test_full_fine_tuning_student(tiny_model_dir, char_tokenizer, tmp_path):
    model = load_student(tiny_model_dir, lora=False)
    assert not isinstance(model, PeftModel) and all(p.requires_grad for p in model.parameters())
    rollouts = build_rollouts(char_tokenizer, PROMPTS, ANSWERS)
    losses = _sft_steps(model, rollouts, steps=4, lr=3e-3)
    assert losses[-1] < losses[0]
    save_student(model, tmp_path / "full")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    model.eval()
    with torch.no_grad():
        assert torch.equal(completion_logits(reloaded, rollouts), completion_logits(model, rollouts))
    with pytest.raises(ValueError, match="lora"):
        load_student(tiny_model_dir, lora=False, adapter_path=tmp_path)


def test_completion_logits_match_a_plain_forward(tiny_model, char_tokenizer):
    r = sample(tiny_model, char_tokenizer, ["12>", "4071>"], num_generations=2, max_new_tokens=5, seed=0)
    P, T = r.prompt_len, r.tokens_BT.shape[1]
    with torch.no_grad():
        logits_BTV = completion_logits(tiny_model, r)
        full = tiny_model(input_ids=r.input_ids_BL, attention_mask=r.attention_mask_BL, position_ids=r.position_ids_BL()).logits
        assert torch.allclose(logits_BTV, full[:, P - 1:P + T - 1], atol=1e-5)
        assert completion_logits(tiny_model, r, vocab_size=50).shape == (4, T, 50)
        hidden_BTH, lm_head = completion_hidden(tiny_model, r)
        assert hidden_BTH.shape == (4, T, tiny_model.config.hidden_size)
        assert torch.allclose(lm_head(hidden_BTH), logits_BTV, atol=1e-5)
        assert torch.allclose(project_logits(tiny_model, hidden_BTH, 50), logits_BTV[..., :50], atol=1e-5)


def test_gradients_flow_through_completion_logits_with_checkpointing(tiny_model_dir, char_tokenizer):
    model = load_student(tiny_model_dir, gradient_checkpointing=True)
    rollouts = build_rollouts(char_tokenizer, PROMPTS, ANSWERS)
    hidden_BTH, _ = completion_hidden(model, rollouts)
    hidden_BTH.pow(2).mean().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    r = sample(model, char_tokenizer, ["12>"], max_new_tokens=3, seed=0)  # generation still works
    assert r.tokens_BT.shape == (1, 3)


def test_qlora_student_takes_a_step(tiny_model_dir, char_tokenizer):
    """LoRA on a 4-bit (NF4) base: bitsandbytes 0.50 runs this on the CPU."""
    model = load_student(tiny_model_dir, quantization="4bit")
    assert "Linear4bit" in type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__
    rollouts = build_rollouts(char_tokenizer, PROMPTS, ANSWERS)
    losses = _sft_steps(model, rollouts, steps=3)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="lora=True"):
        load_student(tiny_model_dir, lora=False, quantization="4bit")


# ---------------------------------------------------------------------------------------------
# the fused chunked path of the full-vocabulary losses
# ---------------------------------------------------------------------------------------------

FULL_LOSSES = ["reverse_kl_full", "forward_kl", "jsd", "entropy_aware"]


class _LargestVocabTensor:
    """Records the largest number of positions of any (B, ·, V) tensor an op materialises (dispatch mode)."""

    def __init__(self, vocab: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in (out if isinstance(out, (tuple, list)) else [out]):
                    materialised = isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= t.numel() * t.element_size()
                    if materialised and t.dim() == 3 and t.shape[-1] == vocab:  # (a broadcast view holds no memory)
                        outer.max_positions = max(outer.max_positions, t.shape[1])
                return out

        self.max_positions, self.mode = 0, Mode()


@pytest.mark.parametrize("loss", FULL_LOSSES)
def test_fused_full_vocabulary_path_equals_the_reference(loss, tiny_model_dir, tiny_student_dir, char_tokenizer):
    """Teacher hidden states projected chunk by chunk inside the loss give the reference path's loss, metrics
    and gradients, and no (B, T, V) tensor of either model is ever created."""
    from opd_mini import registry
    from opd_mini.student import loss_and_backward
    from opd_mini.teacher import load_teacher, score

    V = len(char_tokenizer)
    teacher = load_teacher(tiny_model_dir)
    opts = registry.LossOptions(beta=0.3, entropy_threshold=0.5)
    spec = registry.get_loss(loss)
    rollouts = sample(load_student(tiny_student_dir, lora=False), char_tokenizer, PROMPTS, num_generations=2,
                      max_new_tokens=7, seed=0)
    T = rollouts.tokens_BT.shape[1]
    assert T >= 6

    def run(fused: bool):
        student = load_student(tiny_student_dir, lora=False)
        scored = score(teacher, rollouts, vocab_size=V, full=not fused, keep_hidden=fused, chunk_size=3)
        batch = scored.replace(num_tokens=rollouts.num_masked)
        probe = _LargestVocabTensor(V)
        with probe.mode:
            metrics = loss_and_backward(student, batch, spec, opts, vocab_size=V, chunk_size=2 if fused else 0)
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        return metrics.result(), grads, probe.max_positions

    ref_metrics, ref_grads, ref_positions = run(fused=False)
    metrics, grads, positions = run(fused=True)
    assert ref_positions >= T and positions <= 3  # the reference holds (B, T, V); the fused path chunks of ≤ 3
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-7), k
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
