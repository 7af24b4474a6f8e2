"""Shared fixtures: an offline character tokenizer and tiny Llama models saved with ``save_pretrained``.

Fixtures (session-scoped unless noted; all fast):

* ``char_tokenizer``      the character-level ``PreTrainedTokenizerFast`` of :mod:`opd_mini.tiny`
* ``tiny_model_dir``      path (str) of a random-init "teacher"-size tiny Llama + tokenizer (save_pretrained)
* ``tiny_student_dir``    path (str) of a random-init, smaller "student"-size tiny Llama + tokenizer
* ``tiny_model``          (function scope) a fresh ``LlamaForCausalLM`` loaded from ``tiny_model_dir``
* ``tiny_pair``           ``ensure_tiny_models()``: the trained teacher / warm-started student on the
                          default task (the checkpoints shipped in the package; trained into a temporary
                          cache if they are missing)

Every test runs offline (``HF_HUB_OFFLINE=1``) and with one torch thread: tiny models gain nothing from
more, and on a shared 2-core machine spinning worker threads slow them down by an order of magnitude.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def char_tokenizer():
    from opd_mini.tiny import build_char_tokenizer

    return build_char_tokenizer()


def _save_random_model(path, size: str, tokenizer, seed: int) -> str:
    from opd_mini.tiny import build_tiny_model

    model = build_tiny_model(size, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, char_tokenizer) -> str:
    return _save_random_model(tmp_path_factory.mktemp("tiny_teacher_random"), "teacher", char_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, char_tokenizer) -> str:
    return _save_random_model(tmp_path_factory.mktemp("tiny_student_random"), "student", char_tokenizer, seed=1)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict:
    from opd_mini.tiny import ensure_tiny_models, shipped_tiny_models

    # the checkpoints shipped in the package; if missing, train them (~20 s) into a temporary cache
    return shipped_tiny_models() or ensure_tiny_models(tmp_path_factory.mktemp("tiny_cache"), progress=False)
