"""Evaluations that survive and scale out: per-example result shards with a manifest, resumable after a kill,
one shard per process under ``torch.distributed``, and progress lines readable in a log file.

An evaluation is a set of *records*, one per ``(example id, round)``: a few float64 numbers per record (the
per-example log-density, its standard error, its terms). Records are computed in blocks of examples and handed
to a :class:`ResultStore`, which (with a folder) writes each block as its own ``.npz`` shard with an atomic
rename, so a process killed at any instant leaves only whole shards behind. ``manifest.json`` holds the
settings and the data hash; resuming checks them and computes only the records that no shard holds. Because
every random draw is keyed by ``(seed, example id, round)`` (:mod:`scoredensity.rng`), the resumed evaluation
gives the *identical* final figure.

Layout of a store folder::

    manifest.json               {"format": 1, "settings": {...}, "data_sha256": ...}
    shards/r000-0000000.npz     ids [b] int64, round [b] int64, one float64 [b] array per record key
    results.npz                 all records merged and ordered by (round, id), written by rank 0 at the end
    result.json                 the final figures, written by rank 0 at the end

Each process writes only ``shards/r{rank}-*``; rank 0 merges. Any number of processes may resume a store
written by any other number.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from .distributed import rank_world

__all__ = ["ResultStore", "StoreError", "ProgressLog", "gather_records", "atomic_write_bytes", "atomic_write_json"]

FORMAT = 1
_IGNORED_SETTINGS = (
    "world_size",
    "progress",
    "out",
    "resume",
    "device",
    "max_batch",
    "batch_size",
)  # may change on resume


class StoreError(ValueError):
    """A result folder that cannot be used: settings or data differ, or the folder holds something else."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a process killed midway) sees the old file or the new
    one, never a partial one: write a temporary file beside it, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _canon(obj: Any) -> Any:
    """JSON round trip, so that settings compare equal whether fresh or read back (tuples become lists)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class ResultStore:
    """Per-record results of one evaluation, in memory and (with ``folder``) in shards on disk.

    Args:
        keys: the float64 values of a record (e.g. ``["formula-discrete/logp", ...]``).
        folder: where to write shards, the manifest and the merged results; ``None`` keeps everything in memory.
        settings: the evaluation's settings (JSON-serialisable); a resumed evaluation must have the same ones
            (except ``world_size``, ``device``, ``max_batch``, ``batch_size``, ``progress``: they do not change
            the figures).
        data_sha256: hash of the evaluated data; a resumed evaluation must have the same.
        resume: continue a folder that holds a manifest. Without it, a folder that already holds one is refused.

    Raises:
        StoreError: a folder with an evaluation in it and no ``resume``; ``resume`` with other settings or data.
    """

    def __init__(
        self,
        keys: Iterable[str],
        folder: str | os.PathLike | None = None,
        *,
        settings: dict | None = None,
        data_sha256: str = "",
        resume: bool = False,
    ) -> None:
        self.keys = list(keys)
        self.rank, self.world = rank_world()
        self.folder = None if folder is None else Path(folder)
        # per round: values [capacity, len(keys)] float64 indexed by example id, and which ids are filled
        self._values: dict[int, np.ndarray] = {}
        self._filled: dict[int, np.ndarray] = {}
        self._seq = 0
        if self.folder is None:
            if resume:
                raise StoreError("--resume needs --out DIR (the folder of the evaluation to continue)")
            return
        settings = _canon({k: v for k, v in (settings or {}).items() if k not in _IGNORED_SETTINGS})
        manifest = {"format": FORMAT, "settings": settings, "data_sha256": data_sha256, "keys": self.keys}
        mpath = self.folder / "manifest.json"
        if self.folder.exists() and not self.folder.is_dir():
            raise StoreError(f"--out {self.folder}: exists and is not a folder")
        if mpath.exists():
            if not resume:
                raise StoreError(
                    f"--out {self.folder}: already holds an evaluation (manifest.json); pass --resume to continue "
                    "it or choose a new folder"
                )
            try:
                old = json.loads(mpath.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise StoreError(f"{mpath}: unreadable manifest ({e})") from None
            self._check_same(old, manifest)
        elif resume and self.folder.exists() and any(self.folder.iterdir()):
            raise StoreError(f"--resume {self.folder}: no manifest.json there; not an evaluation folder")
        _barrier()
        if self.rank == 0:
            (self.folder / "shards").mkdir(parents=True, exist_ok=True)
            if not mpath.exists():
                atomic_write_json(mpath, manifest)
        _barrier()
        for tmp in (self.folder / "shards").glob(f".r{self.rank:03d}-*.tmp-*"):
            tmp.unlink(missing_ok=True)  # a shard this rank was writing when it was killed
        self._load_shards()

    def _check_same(self, old: dict, new: dict) -> None:
        if old.get("format") != FORMAT:
            raise StoreError(
                f"--resume {self.folder}: manifest format {old.get('format')}, this version writes {FORMAT}"
            )
        if old.get("data_sha256") != new["data_sha256"]:
            raise StoreError(
                f"--resume {self.folder}: the data differ from the evaluation there (sha256 "
                f"{str(old.get('data_sha256'))[:16]}... vs {new['data_sha256'][:16]}...)"
            )
        a, b = old.get("settings", {}), new["settings"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff or old.get("keys") != new["keys"]:
            what = ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in diff[:6]) or "the result keys"
            raise StoreError(f"--resume {self.folder}: settings differ from the evaluation there ({what})")

    def _load_shards(self) -> None:
        assert self.folder is not None
        mine = f"r{self.rank:03d}-"
        for p in sorted((self.folder / "shards").glob("r*.npz")):
            if p.name.startswith(mine):
                self._seq = max(self._seq, int(p.stem.split("-")[1]) + 1)
            try:
                with np.load(p, allow_pickle=False) as z:
                    ids, rounds = z["ids"], z["round"]
                    vals = np.stack([z[k] for k in self.keys], axis=1)
            except (OSError, KeyError, ValueError) as e:
                raise StoreError(f"{p}: unreadable shard ({e}); remove it to recompute its examples") from None
            for r in np.unique(rounds).tolist():
                sel = rounds == r
                self._put(int(r), ids[sel], vals[sel])

    # ------------------------------------------------------------------------------------------ records
    def _put(self, round_: int, ids: np.ndarray, rows: np.ndarray) -> None:
        """Store ``rows`` [b, len(keys)] of examples ``ids`` [b] in ``round_`` (arrays grow by doubling)."""
        if len(ids) == 0:
            return
        need = int(ids.max()) + 1
        vals, filled = self._values.get(round_), self._filled.get(round_)
        if vals is None or vals.shape[0] < need:
            cap = max(need, 2 * (0 if vals is None else vals.shape[0]), 1024)
            new_v = np.full((cap, len(self.keys)), np.nan)
            new_f = np.zeros(cap, dtype=bool)
            if vals is not None:
                new_v[: vals.shape[0]], new_f[: filled.shape[0]] = vals, filled
            self._values[round_], self._filled[round_] = vals, filled = new_v, new_f
        vals[ids] = rows
        filled[ids] = True

    def done(self, round_: int, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids)] bool: which of ``ids`` already have a record for ``round_``."""
        filled = self._filled.get(round_)
        idx = ids.to(torch.int64).cpu().numpy()
        if filled is None:
            return torch.zeros(len(idx), dtype=torch.bool)
        ok = idx < filled.shape[0]
        out = np.zeros(len(idx), dtype=bool)
        out[ok] = filled[idx[ok]]
        return torch.from_numpy(out)

    def add(self, round_: int, ids: torch.Tensor, values: dict[str, torch.Tensor], persist: bool = True) -> None:
        """Record ``values`` ([len(ids)] each, for every key) of examples ``ids`` in ``round_``; with a folder
        and ``persist``, write them as one new shard (atomically) before returning."""
        ids_np = ids.to(torch.int64).cpu().numpy()
        vals = {k: values[k].detach().to(torch.float64).cpu().numpy().reshape(-1) for k in self.keys}
        if self.folder is not None and persist and len(ids_np):
            shard = {"ids": ids_np, "round": np.full(len(ids_np), round_, dtype=np.int64), **vals}
            name = self.folder / "shards" / f"r{self.rank:03d}-{self._seq:07d}.npz"
            atomic_write_bytes(name, _npz_bytes(shard))
            self._seq += 1
        self._put(round_, ids_np, np.stack([vals[k] for k in self.keys], axis=1))

    def table(self, round_: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The values of ``ids`` in ``round_`` as ``{key: [len(ids)] float64}``.

        Raises:
            StoreError: if a record is missing.
        """
        done = self.done(round_, ids)
        if not bool(done.all()):
            missing = ids[~done][:5].tolist()
            raise StoreError(f"no result for examples {missing} in round {round_}")
        if len(ids) == 0:
            return {k: torch.empty(0, dtype=torch.float64) for k in self.keys}
        rows = self._values[round_][ids.to(torch.int64).cpu().numpy()]
        return {k: torch.from_numpy(rows[:, j].copy()) for j, k in enumerate(self.keys)}

    def rounds(self) -> list[int]:
        """The rounds that hold at least one record."""
        return sorted(r for r, f in self._filled.items() if f.any())

    def finish(self, result: dict, n: int) -> None:
        """Rank 0 (with a folder): merge every record into ``results.npz`` and write ``result.json``."""
        if self.folder is None or self.rank != 0:
            return
        rounds = [r for r in self.rounds()]
        ids = torch.arange(n)
        merged: dict[str, list[np.ndarray]] = {"ids": [], "round": []}
        for r in rounds:
            if not bool(self.done(r, ids).all()):
                continue
            t = self.table(r, ids)
            merged["ids"].append(ids.numpy())
            merged["round"].append(np.full(n, r, dtype=np.int64))
            for k in self.keys:
                merged.setdefault(k, []).append(t[k].numpy())
        atomic_write_bytes(self.folder / "results.npz", _npz_bytes({k: np.concatenate(v) for k, v in merged.items()}))
        atomic_write_json(self.folder / "result.json", result)


def _barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


def gather_records(store: ResultStore, round_: int, ids: torch.Tensor) -> None:
    """Share the records of ``ids`` (computed by this process in ``round_``) with every process, so each one
    holds the whole round (one collective; no-op in one process). Shards are written by their own process
    only; the gathered copies stay in memory."""
    if store.world == 1:
        return
    mine = store.table(round_, ids)
    parts: list = [None] * store.world
    torch.distributed.all_gather_object(parts, (round_, ids, mine))
    for rank, (r, pids, vals) in enumerate(parts):
        if rank != store.rank:
            store.add(r, pids, vals, persist=False)


class ProgressLog:
    """Progress of a long evaluation: a tqdm bar on a terminal, else one plain line every ``every`` seconds
    (``done/total images, images/s, elapsed, ETA``) that stays readable in the log file of a multi-hour run.

    Only rank 0 reports. ``enabled=False`` says nothing."""

    def __init__(
        self,
        total: int,
        *,
        desc: str = "evaluate",
        unit: str = "images",
        every: float = 20.0,
        enabled: bool = True,
        stream: TextIO | None = None,
        already: int = 0,
        step: int = 1,
    ) -> None:
        self.total, self.desc, self.unit, self.every = int(total), desc, unit, float(every)
        self.stream = stream if stream is not None else sys.stderr
        self.done = int(already)
        self.step = int(step)  # items done per item this process reports (the number of processes)
        self._start_done = self.done
        self.enabled = enabled and rank_world()[0] == 0 and total > 0
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit[:-1] or unit, file=self.stream)

    def update(self, k: int) -> None:
        """``k`` more items are done."""
        k = min(int(k) * self.step, self.total - self.done)
        self.done += k
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(k)
            return
        now = time.monotonic()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """One progress line: ``evaluate: 1200/50000 images (2.4%), 35.2 images/s, elapsed 0:00:34, ETA 0:23:05``."""
        now = time.monotonic() if now is None else now
        el = max(now - self.t0, 1e-9)
        rate = (self.done - self._start_done) / el
        left = self.total - self.done
        eta = _hms(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / max(self.total, 1)
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.1f}%), {rate:.3g} {self.unit}/s, "
            f"elapsed {_hms(el)}, ETA {eta}"
        )

    def close(self) -> None:
        """Close the bar (on a terminal)."""
        if self._bar is not None:
            self._bar.close()


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_blocks(
    compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    ids: torch.Tensor,
    store: ResultStore,
    round_: int,
    block: int,
    progress: ProgressLog | None = None,
) -> None:
    """Compute the records of ``ids`` in ``round_`` that ``store`` lacks, ``block`` examples per call of
    ``compute(ids_block) -> {key: [len(ids_block)] float64}``, each block recorded (and written) as it is done."""
    todo = ids[~store.done(round_, ids)]
    for s in range(0, len(todo), block):
        b = todo[s : s + block]
        store.add(round_, b, compute(b))
        if progress is not None:
            progress.update(len(b))


__all__ += ["run_blocks"]


def evaluate_rounds(
    compute_round: Callable[[int], Callable[[torch.Tensor], dict[str, torch.Tensor]]],
    n: int,
    store: ResultStore,
    *,
    batch_size: int,
    se_of: Callable[[list[dict[str, torch.Tensor]]], float],
    target_se: float | None = None,
    max_rounds: int = 1,
    progress: bool = True,
    desc: str = "evaluate",
    unit: str = "examples",
) -> tuple[list[dict[str, torch.Tensor]], dict | None]:
    """Evaluate examples ``0..n-1`` in rounds of independent draws, streamed in blocks and sharded over processes.

    Each process computes the records of its examples (``index % world == rank``) that ``store`` lacks, with
    ``compute_round(r)(ids) -> {key: [len(ids)] float64}``, ``batch_size`` examples per call; then the round is
    shared by all processes. Without ``target_se`` one round is run. With it, rounds go on (at least two, at most
    ``max_rounds``) until ``se_of(tables) <= target_se``, where ``tables`` are the rounds so far (``{key: [n]}``).

    Returns:
        The per-round tables, and (with ``target_se``) ``{"target_bpd", "reached", "rounds", "max_rounds",
        "se_bpd"}``.
    """
    if n < store.world:
        raise ValueError(f"{n} examples cannot be sharded over {store.world} processes")
    all_ids = torch.arange(n)
    mine = all_ids[store.rank :: store.world]
    tables: list[dict[str, torch.Tensor]] = []
    se = float("inf")
    while True:
        r = len(tables)
        left = int((~store.done(r, all_ids)).sum())
        label = f"{desc} round {r}" if target_se is not None else desc
        bar = ProgressLog(n, desc=label, unit=unit, enabled=progress, already=n - left, step=store.world)
        run_blocks(compute_round(r), mine, store, r, batch_size, bar)
        bar.close()
        gather_records(store, r, mine)
        tables.append(store.table(r, all_ids))
        if target_se is None or len(tables) >= max_rounds:
            break
        if len(tables) >= 2:
            se = se_of(tables)
            if se <= target_se:
                break
    if target_se is None:
        return tables, None
    se = se_of(tables)
    return tables, {
        "target_bpd": float(target_se),
        "reached": bool(se <= target_se),
        "se_bpd": se,
        "rounds": len(tables),
        "max_rounds": int(max_rounds),
    }


def round_stats(values: list[torch.Tensor], stated_se: list[torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """Combine rounds of per-example estimates ``values`` (each [N]) with their stated standard errors.

    Returns:
        The per-example mean over rounds [N]; the standard error of the data-set mean due to the estimator (from
        the spread between rounds when there are two or more: honest whatever the estimator states, else from
        the stated errors); and that from the stated errors alone. Both in the units of ``values``.
    """
    v = torch.stack(values)  # [R, N]
    rounds, n = v.shape
    stated = float(torch.stack(stated_se).pow(2).sum() ** 0.5 / rounds / n)
    if rounds >= 2:
        return v.mean(0), float((v.var(0) / rounds).sum().sqrt() / n), stated
    return v.mean(0), stated, stated


__all__ += ["evaluate_rounds", "round_stats"]
