"""Which model indices this process trains: ``--farm.shard i/n``, a SLURM array task, or a torchrun rank."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mia_lightning.errors import MiaError


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the models i with i % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise MiaError(f"shard {self.index}/{self.count}: need 0 <= i < n (e.g. --farm.shard 0/4)")

    def select(self, indices: list[int]) -> list[int]:
        return [i for i in indices if i % self.count == self.index]

    def split(self, parts: int, part: int) -> "Shard":
        """Sub-shard ``part`` of ``parts`` (one worker per device inside this shard)."""
        return Shard(self.index + self.count * part, self.count * parts)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """Parse 'i/n'."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise MiaError(f"--farm.shard {text!r}: expected i/n, e.g. 0/4") from None
    return Shard(index, count)


def resolve_shard(text: str | None, environ: dict[str, str] | None = None) -> Shard:
    """The explicit shard, else SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else torchrun's RANK/WORLD_SIZE, else 0/1."""
    env = os.environ if environ is None else environ
    if text:
        return parse_shard(text)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        offset = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Shard(int(env["SLURM_ARRAY_TASK_ID"]) - offset, int(env["SLURM_ARRAY_TASK_COUNT"]))
    if "RANK" in env and "WORLD_SIZE" in env:
        return Shard(int(env["RANK"]), int(env["WORLD_SIZE"]))
    return Shard()
