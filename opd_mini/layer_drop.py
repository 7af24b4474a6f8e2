"""A smaller student cut from a pretrained model: a contiguous block of its decoder layers dropped.

    --student smollm2-135m --student_drop_layers 12-17 --teacher smollm2-135m

gives a real teacher ≠ student pair offline: the full model teaches the same model without layers 12 to 17
(inclusive). Keeping every other layer breaks a small model; dropping one block from the middle leaves it fluent
but weaker. The smaller model is written once, as a plain ``save_pretrained`` folder with the source's tokenizer,
into ``$OPD_MINI_CACHE/dropped`` (by default ``~/.cache/opd_mini/dropped``), atomically and under a file lock as
for :mod:`opd_mini.gguf_models`; later runs load that folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

from opd_mini.gguf_models import build_cached


def cache_root() -> Path:
    return Path(os.environ.get("OPD_MINI_CACHE", Path.home() / ".cache" / "opd_mini")) / "dropped"


def parse_range(text: str) -> tuple[int, int]:
    """``"A-B"`` (or ``"A"``) → (A, B), 0 <= A <= B: the layers to drop, both ends included."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if m is None or int(m.group(2) or m.group(1)) < int(m.group(1)):
        raise ValueError(f"student_drop_layers={text!r} is not a layer range: write FIRST-LAST with FIRST <= LAST, "
                         "counting from 0, e.g. 12-17")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def decoder_layers(model):
    """The decoder's list of layers (``model.model.layers`` in Llama, Qwen, Mistral, ...)."""
    import torch

    n = model.config.num_hidden_layers
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == n:
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: --student_drop_layers works on "
                     "models whose layers are a ModuleList named 'layers' (Llama, Qwen, Mistral, ...)")


def check_range(source: str, layers: str) -> tuple[int, int, int]:
    """(first, last, number of layers of the model), or a ValueError when the range is outside the model."""
    from transformers import AutoConfig

    first, last = parse_range(layers)
    n = AutoConfig.from_pretrained(source).num_hidden_layers
    if last >= n or last - first + 1 >= n:
        raise ValueError(f"student_drop_layers={layers} is outside the model {source}: it has {n} layers (0-{n - 1}), "
                         f"and at least one must stay")
    return first, last, n


def drop_layers(source: str, layers: str, cache_dir: str | os.PathLike | None = None, *,
                progress: bool = True) -> str:
    """The folder of ``source`` without the decoder layers ``layers`` ("A-B"): the cached one, else written now."""
    first, last, n = check_range(source, layers)
    key = hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:12]
    target = (Path(cache_dir) if cache_dir is not None else cache_root()) / f"{Path(source).name}-drop{first}-{last}-{key}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if progress:
            print(f"writing {Path(source).name} without layers {first}-{last} of {n} (once): {target}",
                  file=sys.stderr, flush=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        holder = decoder_layers(model)
        kept = [layer for i, layer in enumerate(holder.layers) if not first <= i <= last]
        for i, layer in enumerate(kept):  # the KV cache is indexed by each attention's layer_idx
            attention = getattr(layer, "self_attn", None)
            if attention is not None and hasattr(attention, "layer_idx"):
                attention.layer_idx = i
        holder.layers = torch.nn.ModuleList(kept)
        model.config.num_hidden_layers = len(kept)
        if isinstance(getattr(model.config, "layer_types", None), list):
            model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if not first <= i <= last]
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)

    return str(build_cached(target, build, {"source": str(source), "dropped": [first, last], "of": n},
                            "smaller student"))
