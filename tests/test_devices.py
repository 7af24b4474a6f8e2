"""One device discipline, checked without a GPU, and the memory bound of scoring and evaluation.

On a CUDA machine, a CPU tensor meeting one on the GPU in an operation raises; on the CPU both are the same
device and nothing can see it. :class:`EmulatedAccelerator` makes the CPU behave like that: while it is active,
every tensor on "the accelerator" (the models' parameters and buffers, whatever a factory or ``.to`` puts on a
device it names, and every result computed from such tensors) is tracked, and an operation that mixes one with
a host tensor (one made without a device, or brought back by ``.cpu()``) raises as CUDA would: arithmetic,
concatenation, a host tensor indexed by a device one. A 0-dimensional host tensor is a scalar and is allowed,
as on CUDA. Then the whole loop runs under it: sampling, scoring, every loss, evaluation with the teacher's
reverse and forward KL and KL(π₀ ‖ π), checkpoints.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from tests.helpers import loop_args


class DeviceMix(RuntimeError):
    pass


#: Index-taking ops where a device tensor may take host indices (CUDA moves them), but not the other way round.
_INDEXING = {"__getitem__", "index_select", "gather", "take_along_dim"}


class EmulatedAccelerator(TorchFunctionMode):
    """While active, tensors "on the accelerator" are tracked and mixing them with host tensors raises."""

    def __init__(self, *models):
        super().__init__()
        self.refs: dict[int, weakref.ref] = {}  # id -> the tensor, for the tensors on the accelerator
        for model in models:
            for t in [*model.parameters(), *model.buffers()]:
                self.add(t)

    def add(self, t: torch.Tensor) -> None:
        key = id(t)
        self.refs[key] = weakref.ref(t, lambda _, key=key: self.refs.pop(key, None))

    def on_device(self, t: torch.Tensor) -> bool:
        ref = self.refs.get(id(t))
        return ref is not None and ref() is t

    def _device(self, t) -> bool:
        return isinstance(t, torch.nn.Parameter) or self.on_device(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if self._device(t)]
        host = [t for t in tensors if not self._device(t) and t.dim() > 0]
        names_device = "device" in kwargs and kwargs["device"] is not None or (
            name == "to" and any(isinstance(a, (str, torch.device)) for a in args[1:]))
        if on_device and host and name not in ("cpu", "copy_", "to") and not names_device:
            indexed_on_device = name in _INDEXING and self._device(args[0])
            if name == "__setitem__" and self._device(args[0]):
                pass  # writing host values into a device tensor: CUDA copies them
            elif not indexed_on_device:
                raise DeviceMix(f"{name}: a host tensor of shape {tuple(host[0].shape)} meets a tensor on the "
                                "accelerator (on CUDA this raises)")
        out = func(*args, **kwargs)
        if name == "cpu":  # a copy to the host (on the CPU, .cpu() would hand back the same tensor)
            return out.clone() if on_device else out
        if name in ("numpy", "tolist", "item"):
            return out
        if on_device or names_device:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.add(t)
        return out


def test_the_emulation_catches_the_mixes_cuda_refuses():
    x = torch.zeros(3, device="cpu")  # "on the accelerator": a device was named
    with EmulatedAccelerator() as acc:
        y = torch.zeros(3, device="cpu") + 1
        assert acc.on_device(y)
        with pytest.raises(DeviceMix):
            y - torch.ones(3)  # a host tensor
        with pytest.raises(DeviceMix):
            torch.ones(3) - y.cpu() * 0 - y  # .cpu() brings it back to the host
        with pytest.raises(DeviceMix):
            torch.arange(3)[y > 0]  # a host tensor indexed by a device mask
        assert torch.equal(y[torch.tensor([True, False, True])].cpu(), torch.ones(2))  # device by host index: allowed
        assert float(y.sum() + torch.tensor(1.0)) == 4.0  # a 0-dim host tensor is a scalar
        # the evaluation bug this guards against: behaviour log-probs on the device minus the teacher's on the host
        with pytest.raises(DeviceMix):
            y - (y * 2).float().cpu()
    del x


@pytest.mark.parametrize("overrides", [
    dict(loss="reverse_kl_sampled", eval_kl_forward="true", lora="true", retention_task="add:1",
         eval_kl_to_init="true", mask_special_tokens="true", grad_accum=2),
    dict(loss="reverse_kl_full", loss_chunk_size=2, eval_kl_forward="true", lmbda=0.5, teacher_sample_pool=4),
    dict(loss="reverse_kl_topk", top_k=4, sampler="decode", teacher_template="{prompt} (the answer is {answer})",
         eval_kl_forward="true", task="reverse:3"),
    dict(loss="sft", teacher_sample_pool=4), dict(loss="grpo", teacher="none"),
    dict(loss="opd_grpo", sampler="decode"), dict(loss="jsd", loss_chunk_size=3), dict(loss="entropy_aware"),
])
def test_the_loop_keeps_every_tensor_on_the_models_device(overrides, tiny_student_dir, tiny_model_dir, tmp_path,
                                                           monkeypatch):
    """The whole loop under the emulated accelerator: no operation mixes a host tensor with the models' ones."""
    from opd_mini import models as models_mod
    from opd_mini.train import main

    active = []
    real = models_mod.load_models

    def load_and_track(cfg, device, dtype):
        m = real(cfg, device, dtype)
        mode = EmulatedAccelerator(*[x for x in (m.student, m.teacher, *[t.model for t in m.teachers.values()])
                                     if x is not None])
        mode.__enter__()
        active.append(mode)
        return m

    monkeypatch.setattr("opd_mini.train.load_models", load_and_track)
    teacher = overrides.pop("teacher", tiny_model_dir)
    try:
        assert main(loop_args(tiny_student_dir, teacher, tmp_path / "run", steps=2, eval_every=1, **overrides)) == 0
    finally:
        for mode in reversed(active):
            mode.__exit__(None, None, None)
    assert active


def test_scoring_and_evaluation_stay_within_their_logits_budget_at_the_presets_shapes(monkeypatch):
    """The laptop-gpu preset's step-0 evaluation samples 128 prompts × 4 and scores them, at V = 151,936. Every
    logits tensor the output head makes there (recorded through the projection) stays within the budgets:
    CHUNK_ELEMENTS (2^22) when scoring, EVAL_STEP_ELEMENTS (2^24) per decoding step of the evaluation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from opd_mini import eval as eval_mod, forward, sampler, teacher as teacher_mod
    from opd_mini.eval import EVAL_STEP_ELEMENTS, evaluate
    from opd_mini.forward import CHUNK_ELEMENTS
    from opd_mini.tasks import get_task

    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_shapes

    V_rows, tokens = 151_936, 151_665
    tokenizer = gpu_shapes.build_tokenizer(tokens)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V_rows, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=None)).eval()
    largest = {"score": 0, "eval": 0}
    phase = ["eval"]
    real = forward.project_logits

    def recording(model_, hidden, vocab_size=None):
        out = real(model_, hidden, vocab_size)
        largest[phase[0]] = max(largest[phase[0]], out.numel())
        return out

    for mod in (forward, sampler, teacher_mod):
        monkeypatch.setattr(mod, "project_logits", recording)

    def scorer(batch):
        phase[0] = "score"
        try:
            return teacher_mod.score(model, batch, vocab_size=len(tokenizer))
        finally:
            phase[0] = "eval"

    out = evaluate(model, tokenizer, get_task("reverse:6"), num_prompts=128, num_samples=4, k=4, max_new_tokens=3,
                   score_teacher=scorer, sampler_options=dict(method="decode"))
    assert 0 < largest["score"] <= CHUNK_ELEMENTS and 0 < largest["eval"] <= EVAL_STEP_ELEMENTS, largest
    assert out["eval/kl_reverse"] == pytest.approx(0.0, abs=1e-5)  # the model scored its own samples
    del eval_mod
