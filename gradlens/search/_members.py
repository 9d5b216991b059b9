"""The PBT members a host keeps (in this process, a worker process or a Ray actor): their live
trainers, trained to each checkpoint, exploited, finished (see :mod:`gradlens.search.pbt`)."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from gradlens._errors import GradlensWarning
from gradlens.search._common import plain_final

__all__: list[str] = []


class _Members:
    """The object each host keeps: some members' live trainers (runs on a worker or Ray actor)."""

    def __init__(self) -> None:
        self._trainers: dict[int, Any] = {}

    def start(
        self,
        k: int,
        train: dict[str, Any],
        run_dir: str,
        checkpoint: str | None,
        weights: dict[str, float],
        pbt_meta: dict[str, Any],
        yes: bool = False,
    ) -> None:
        import torch

        from gradlens.train import Trainer

        # with a checkpoint, the member's run continues (append) from the checkpoint's step; the
        # writer a killed PBT left is dead, and taking over its lock is what resuming means
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Taking over the stale writer lock", GradlensWarning)
            tr = Trainer(
                train, run_dir, progress=False, overwrite=checkpoint is None,
                append=checkpoint is not None, yes=yes,
            )  # fmt: skip
        try:
            if checkpoint is not None:
                tr.load_state_dict(torch.load(checkpoint, weights_only=True))
            if tr.weights != weights:
                tr.weights = weights
            if tr.store is not None:  # always: a member has a run directory
                tr.store.update_meta(pbt=pbt_meta)
        except BaseException:
            tr.close()
            raise
        self._trainers[k] = tr

    def train(self, ks: list[int], epochs: int, ckpt_dir: str) -> dict[int, dict[str, Any]]:
        import torch

        out = {}
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        for k in ks:
            c0 = time.process_time()
            tr = self._trainers[k]
            val = tr.fit_epochs(epochs)
            if tr.store is not None:  # every step before the checkpoint is on disk with it
                tr.store.flush()
            path = Path(ckpt_dir) / f"member-{k:03d}.pt"
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            torch.save(tr.state_dict(), tmp)
            os.replace(tmp, path)
            out[k] = {
                "val": plain_final({"val": val})["val"],
                "epoch": tr.epoch,
                "cpu_seconds": time.process_time() - c0,
            }
        return out

    def exploit(
        self, moves: dict[int, tuple[str, dict[str, float]]], metas: dict[int, dict[str, Any]]
    ) -> None:
        import torch

        for k, (checkpoint, weights) in moves.items():
            tr = self._trainers[k]
            tr.load_state_dict(torch.load(checkpoint, weights_only=True))
            tr.weights = weights
        for k, meta in metas.items():
            self._trainers[k].store.update_meta(pbt=meta)

    def finish(self, ks: list[int], metas: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        out = {}
        for k in ks:
            tr = self._trainers.pop(k)
            tr.store.update_meta(pbt=metas[k])
            out[k] = plain_final(tr.finish())
        return out

    def close(self) -> None:
        for tr in self._trainers.values():
            tr.close()
        self._trainers.clear()
