"""Loading a Hugging Face causal LM for opd_mini: the device and dtype, and 4/8-bit quantization.

``load_pretrained`` takes a hub id or a local ``save_pretrained`` directory; ``"8bit"`` (LLM.int8) and
``"4bit"`` (NF4 with double quantization) go through bitsandbytes. Where bitsandbytes cannot run, a
:class:`QuantizationError` says why and what to change, instead of a library traceback.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from transformers import AutoModelForCausalLM

QUANTIZATIONS = ("none", "8bit", "4bit")

_NO_QUANT_HINT = "set teacher_quantization='none' (command line: --teacher_quantization none) to load it unquantized"


class QuantizationError(RuntimeError):
    """4/8-bit loading was asked for where bitsandbytes cannot run; the message says what to change."""

    exit_code = 2


def native_bf16(device: str | torch.device = "cuda") -> bool:
    """True on a CUDA GPU with native bfloat16 (compute capability 8.0 or newer): ``is_bf16_supported()`` alone
    also counts emulation, which runs bf16 on older cards many times slower."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return torch.cuda.get_device_capability()[0] >= 8


def default_compute_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a CUDA GPU with native bf16 (else float16, for a 4/8-bit teacher's compute); float32
    elsewhere (CPUs have no fast bf16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.float32


def quantization_config(quantization: str, device: str | torch.device = "cpu",
                        compute_dtype: torch.dtype | None = None):
    """A transformers ``BitsAndBytesConfig`` for ``"8bit"`` / ``"4bit"`` (NF4 + double quantization),
    or None for ``"none"``. Raises a clear error when bitsandbytes cannot run on ``device``."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "none":
        return None
    device = torch.device(device)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(f"{quantization} quantization needs the bitsandbytes package, which is not installed: "
                           f"`pip install bitsandbytes`, or {_NO_QUANT_HINT}")
    if device.type not in ("cpu", "cuda", "xpu"):
        raise QuantizationError(f"bitsandbytes {quantization} quantization does not run on device {device.type!r} "
                           f"(it supports cpu, cuda and xpu): {_NO_QUANT_HINT}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantizationError(f"{quantization} quantization on {device} was asked for but CUDA is not available: "
                           f"use device='cpu', or {_NO_QUANT_HINT}")
    from transformers import BitsAndBytesConfig

    compute_dtype = compute_dtype or default_compute_dtype(device)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_pretrained(name_or_path, *, quantization: str = "none", device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None):
    """A ``*ForCausalLM`` from a hub id or directory: weights in ``dtype`` (default: see
    :func:`default_compute_dtype`), or 4/8-bit through bitsandbytes with ``dtype`` as the compute dtype."""
    device = torch.device(device)
    dtype = dtype or default_compute_dtype(device)
    bnb_config = quantization_config(quantization, device, dtype)
    if bnb_config is None:
        try:
            return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device)
        except OSError as e:
            raise ValueError(_not_loadable(name_or_path, e)) from None
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=bnb_config, dtype=dtype,
                                                    device_map={"": str(device)})
    except OSError as e:
        raise ValueError(_not_loadable(name_or_path, e)) from None
    except (ValueError, TypeError):
        raise  # a bad argument: the library's message is the clearest
    except torch.OutOfMemoryError:
        raise QuantizationError(f"loading {name_or_path} with {quantization} quantization ran out of memory on {device}: "
                                "free the GPU (other processes, a smaller --eval_prompts), or pick a smaller teacher; "
                                "loading it unquantized would need several times more memory") from None
    except Exception as e:  # bitsandbytes backend failures come in many types
        raise QuantizationError(f"loading {name_or_path} with {quantization} quantization on {device} failed "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); {_NO_QUANT_HINT}") from e


def _not_loadable(name_or_path, error: Exception) -> str:
    first = " ".join(str(error).split("\n")[0].split())
    return (f"cannot load the model {name_or_path!r}: give a directory written by save_pretrained (with config.json) "
            f"or a Hugging Face model id, which needs a network the first time ({first})")


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``device`` auto|cpu|cuda and ``dtype`` auto|float32|bfloat16|float16 → concrete values (auto: cuda when
    available; bf16 on a cuda GPU with native bf16, else fp32). bfloat16 asked for on a GPU that only emulates
    it falls back to float32, with a one-line notice."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch.cuda.is_available() is False: use --device cpu (or auto)")
    resolved = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                            ("cpu" if device == "auto" else device))
    if dtype == "auto":
        return resolved, torch.bfloat16 if native_bf16(resolved) else torch.float32
    if dtype == "bfloat16" and resolved.type == "cuda" and not native_bf16(resolved):
        print(f"notice: {torch.cuda.get_device_name(resolved)} has no native bfloat16 (it would be emulated, many times "
              "slower): training in float32 instead", file=sys.stderr)
        return resolved, torch.float32
    if dtype == "float16" and resolved.type == "cpu":
        raise ValueError("dtype='float16' on the CPU overflows in sampling (NaN probabilities after a step): use "
                         "--dtype float32 (or bfloat16)")
    return resolved, getattr(torch, dtype)
