"""One `omnikv eval` spread over several processes by `accelerate launch` (or `torchrun`).

Each process reads its rank from the launcher's environment, runs every n-th work unit (the same
split as `--shard i/n`) into its own directory `OUTPUT/shard-i-of-n/`, on its own GPU when there
are several, and marks it done. The last process to finish merges every shard into OUTPUT (the
same merge as `omnikv eval merge`). No process group is needed: the shards share only files.

    accelerate launch --num_processes 4 -m omnikv eval --model M --tasks ... --output runs/x
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DONE = "DONE"
_LOCK = ".merge.lock"


def launcher_rank() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by a launcher with more than one process, from
    RANK / WORLD_SIZE / LOCAL_RANK (set by accelerate launch and torchrun); None otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    if world <= 1 or not 0 <= rank < world:
        return None
    return rank, world, local


def shard_dir(output: Path, rank: int, world: int) -> Path:
    return Path(output) / f"shard-{rank}-of-{world}"


def start_shard(output: Path, rank: int, world: int) -> Path:
    """This process's output directory, with a stale done-mark of an earlier run removed."""
    d = shard_dir(output, rank, world)
    d.mkdir(parents=True, exist_ok=True)
    (d / DONE).unlink(missing_ok=True)
    return d


def finish_shard(output: Path, rank: int, world: int) -> dict[str, Any] | None:
    """Mark this shard done; if every shard is, merge them into `output` and return the merged
    metrics; None when this process did not merge. Two processes finishing together merge once
    (an exclusive lock file); merging again later would give the same result."""
    from omnikv.eval.runner import merge_outputs

    (shard_dir(output, rank, world) / DONE).touch()
    dirs = [shard_dir(output, r, world) for r in range(world)]
    if not all((d / DONE).is_file() for d in dirs):
        return None
    lock = Path(output) / _LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    try:
        return merge_outputs(dirs, Path(output))
    finally:
        os.close(fd)
        lock.unlink(missing_ok=True)
