"""The conversion cache: turn a GGUF into a float32 safetensors checkpoint once, atomically.

A cache entry is a Hugging Face checkpoint directory that contains `omnikv-cache.json` (written
last, it records where the entry came from and the conversion's format, `CONVERSION_FORMAT`; an
entry of another format is converted again). Conversion happens in a temporary sibling directory
that is renamed into place at the end, under an inter-process lock, so a crash or Ctrl-C never
leaves a half-written entry and two processes never convert the same model twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from omnikv.errors import ModelLoadError

MARKER = "omnikv-cache.json"
# What a conversion writes, versioned: raised whenever it changes, so that entries written before
# are converted again instead of being loaded as they are. 2: the tokenizer follows the GGUF's
# add_bos_token / add_eos_token (`apply_gguf_add_flags`; transformers 5.2 made SmolLM2's tokenizer
# put <|im_start|> before every prompt) and its special tokens are the model config's
# (`align_special_tokens`). Entries without the field are format 1.
CONVERSION_FORMAT = 2
# Texts whose token ids must survive a save/reload of a converted tokenizer (measured: Gemma's
# GGUF tokenizer only round-trips when saved by a recent transformers).
_TOKENIZER_PROBES = (
    "The capital of France is Paris.",
    "  leading spaces,\ttabs and\nnew lines\n\n",
    "Zahlen 1234567 und Ümlaute, 東京, emoji 🙂, café",
)


def convert_once(
    entry: Path, convert: Callable[[Path, Path], None], label: str, origin: dict[str, Any]
) -> Path:
    """Materialize `entry` with `convert(out_dir, scratch_dir)`, atomically and only once (again
    when the entry there is of another `CONVERSION_FORMAT`)."""
    if is_current(entry):
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".write-test-", dir=entry.parent))
        probe.rmdir()
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the model cache {entry.parent} ({exc.strerror or exc}); set OMNIKV_CACHE "
            "to a writable directory") from exc
    with _file_lock(entry.parent / f".{entry.name}.lock"):
        fmt = entry_format(entry)
        if fmt == CONVERSION_FORMAT:  # another process converted it while we waited
            return entry
        why = ""
        if entry.exists():  # not written by us, by an old layout or by an older conversion: replace it
            if fmt is not None:
                why = f" (the cached one is of conversion format {fmt}, this omnikv writes {CONVERSION_FORMAT})"
            # Moved aside first (atomic), so a process reading the entry sees it whole or not at all.
            old = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-{os.getpid()}-old-", dir=entry.parent))
            os.rename(entry, old / "entry")
            shutil.rmtree(old)
        _remove_stale_temps(entry)
        print(f"omnikv: converting {label} to a safetensors checkpoint once (up to a minute){why}; "
              f"cache: {entry}", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-{os.getpid()}-", dir=entry.parent))
        try:
            out, scratch = tmp / "checkpoint", tmp / "scratch"
            out.mkdir()
            scratch.mkdir()
            start = time.perf_counter()
            convert(out, scratch)
            meta = dict(origin, format=CONVERSION_FORMAT, converted_seconds=round(time.perf_counter() - start, 1),
                        transformers=transformers_version())
            (out / MARKER).write_text(json.dumps(meta, indent=2))
            os.rename(out, entry)  # atomic on one filesystem: the entry appears complete or not at all
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"converting {label} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


def entry_format(entry: Path) -> int | None:
    """The conversion format an entry's marker records (1 when it records none), None without a
    readable marker (no entry, or not a complete one)."""
    try:
        meta = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return int(meta.get("format", 1)) if isinstance(meta, dict) else None


def is_current(entry: Path) -> bool:
    """`entry` is complete and of this version's `CONVERSION_FORMAT`: it can be loaded as it is."""
    return entry_format(entry) == CONVERSION_FORMAT


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a float32 HF checkpoint at `out`, then check the tokenizer round-trips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
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
        align_special_tokens(tokenizer, model.config)
        apply_gguf_add_flags(tokenizer, gguf_add_flags(gguf))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        reloaded = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for probe in _TOKENIZER_PROBES:
        if reloaded(probe)["input_ids"] != tokenizer(probe)["input_ids"]:
            raise ModelLoadError(
                f"the tokenizer converted from {gguf} does not round-trip after saving (probe {probe!r}); "
                f"this transformers version ({transformers_version()}) cannot convert it"
            )


def align_special_tokens(tokenizer: Any, config: Any) -> dict[str, tuple[Any, str]]:
    """Make the tokenizer's eos / bos / pad tokens the ones the model's config names, in place;
    returns what changed: name -> (old token, new token).

    Both come from the same GGUF's metadata, but transformers before 5.24 reads a GGUF tokenizer's
    special tokens on its own: SmolLM2's comes out with eos `<|im_start|>` (id 1) and no pad, while
    its config says eos 2 (`<|im_end|>`) and pad 2, as 5.24 reads both. A wrong eos stops
    generation on the wrong token and is what the server reports to clients."""
    text = getattr(config, "text_config", None) or config
    changed: dict[str, tuple[Any, str]] = {}
    size = len(tokenizer)
    for name in ("eos", "bos", "pad"):
        want = getattr(text, f"{name}_token_id", None)
        if not isinstance(want, int) or not 0 <= want < size or getattr(tokenizer, f"{name}_token_id", None) == want:
            continue
        token = tokenizer.convert_ids_to_tokens(want)
        changed[name] = (getattr(tokenizer, f"{name}_token", None), token)
        setattr(tokenizer, f"{name}_token", token)
    return changed


def gguf_add_flags(gguf: Path) -> dict[str, bool]:
    """`add_bos_token` / `add_eos_token` as the GGUF's metadata states them (absent: not stated)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    flags: dict[str, bool] = {}
    for name in ("add_bos_token", "add_eos_token"):
        field = fields.get(f"tokenizer.ggml.{name}")
        if field is not None and field.data:
            flags[name] = bool(field.parts[field.data[0]][0])
    return flags


def apply_gguf_add_flags(tokenizer: Any, flags: dict[str, bool]) -> dict[str, bool]:
    """Make the tokenizer add BOS / EOS when the GGUF says so, in place; returns what changed.
    transformers 5.2 adds BOS to every GGUF tokenizer's input, SmolLM2's included, whose GGUF says
    not to (`<|im_start|>` before every prompt); 5.17 and 5.24 follow the GGUF."""
    changed = {}
    for name, value in flags.items():
        if getattr(tokenizer, name, None) is not None and getattr(tokenizer, name) != value:
            setattr(tokenizer, name, value)
            changed[name] = value
    return changed


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


def transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-load progress bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
