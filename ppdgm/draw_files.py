"""Draws kept on disk in chunk files and read on access: a sampler's draws that need not fit in memory.

A folder holds one file per chunk, ``chunk-<first chain>-<first draw>.pt``, each
``{"samples": {site: (chains, draws, ...)}, "stats": {stat: (chains, draws)}}`` for a block of
chains and consecutive draws. :class:`DrawFiles` writes them and knows which block each holds;
:class:`LazyDraws` is the ``{name: (chain, draw, ...)}`` mapping a Fit holds, which reads a
name's chunks (memory-mapped, so only that name's bytes) and puts them together when it is
asked for that name.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ppdgm.fit import PathLike, atomic_save, safe_load

GROUPS = ("samples", "stats")


class DrawFiles:
    """A folder of chunk files holding ``num_chains`` x ``num_samples`` draws, and their index.

    ``chunks`` lists ``{"file", "chains": [first, width], "draws": [first, count]}``; ``names``
    the names in each group (as written by the first chunk)."""

    def __init__(
        self,
        directory: PathLike,
        num_chains: int,
        num_samples: int,
        chunks: list | None = None,
        names: dict | None = None,
    ):
        self.directory = Path(directory)
        self.num_chains, self.num_samples = num_chains, num_samples
        self.chunks: list[dict] = list(chunks or [])
        self.names: dict[str, list[str]] = {g: list((names or {}).get(g, [])) for g in GROUPS}

    def write(self, first_chain: int, first_draw: int, values: dict) -> dict:
        """Save one chunk ``{"samples": {...}, "stats": {...}}`` of host tensors ``(chains, draws, ...)``."""
        some = next(v for g in GROUPS for v in values[g].values())
        entry: dict[str, Any] = {
            "file": f"chunk-{first_chain:07d}-{first_draw:07d}.pt",
            "chains": [first_chain, some.shape[0]],
            "draws": [first_draw, some.shape[1]],
        }
        atomic_save({g: dict(values[g]) for g in GROUPS}, self.directory / entry["file"])
        self.add([entry])
        for g in GROUPS:
            if not self.names[g]:
                self.names[g] = list(values[g])
        return entry

    def add(self, entries: list) -> None:
        """Count chunks as written (a resumed run's); one rewritten replaces its old entry."""
        for entry in entries:
            if not (self.directory / entry["file"]).exists():
                raise ValueError(
                    f"{self.directory / entry['file']}: a chunk of draws the checkpoint counts on is missing; "
                    "rerun without resume"
                )
            self.chunks = [c for c in self.chunks if c["file"] != entry["file"]] + [dict(entry)]

    def entries(self, chains: slice) -> list:
        """The chunks of the chains ``chains`` (for a checkpoint)."""
        return [c for c in self.chunks if chains.start <= c["chains"][0] < chains.stop]

    def read(self, group: str, name: str) -> torch.Tensor:
        """``(num_chains, num_samples, ...)`` of one name, assembled from every chunk."""
        out = None
        for c in self.chunks:
            value = safe_load(self.directory / c["file"], mmap=True)[group][name]
            if out is None:
                out = value.new_empty((self.num_chains, self.num_samples, *value.shape[2:]))
            (c0, width), (d0, count) = c["chains"], c["draws"]
            out[c0 : c0 + width, d0 : d0 + count] = value
        if out is None:
            raise KeyError(f"no draws of {name!r} were written to {self.directory}")
        return out

    def copy_to(self, directory: PathLike) -> DrawFiles:
        """The same draws in ``directory`` (files copied unless it is this folder)."""
        directory = Path(directory)
        if directory.resolve() != self.directory.resolve():
            directory.mkdir(parents=True, exist_ok=True)
            for c in self.chunks:
                shutil.copyfile(self.directory / c["file"], directory / c["file"])
        return DrawFiles(directory, **self.state())

    def state(self) -> dict:
        """The index as plain data (saved in a Fit's ``tensors.pt``; the folder is where it lies)."""
        return {
            "num_chains": self.num_chains,
            "num_samples": self.num_samples,
            "chunks": self.chunks,
            "names": self.names,
        }


class LazyDraws(Mapping):
    """``{name: (chain, draw, ...)}`` of one group of :class:`DrawFiles`, read from disk on access
    (each access reads anew, so memory holds only what the caller keeps)."""

    def __init__(self, files: DrawFiles, group: str):
        if group not in GROUPS:
            raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
        self.files, self.group = files, group

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.files.names[self.group]:
            raise KeyError(name)
        return self.files.read(self.group, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files.names[self.group])

    def __len__(self) -> int:
        return len(self.files.names[self.group])

    def __repr__(self) -> str:
        return f"LazyDraws({self.group} {list(self)} in {self.files.directory}, {len(self.files.chunks)} chunks)"
