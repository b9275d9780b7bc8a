"""Draws the library's progress events as tqdm bars on stderr, with notes as plain lines."""

from __future__ import annotations

import sys

from dreamlora.progress import ProgressEvent

LABELS = {"priors": "class images", "cache": "caching", "train": "training", "validate": "validation",
          "sample": "sampling"}


class TerminalProgress:
    def __init__(self) -> None:
        self.bars: dict = {}  # stage -> tqdm bar

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm.auto import tqdm  # imported when the first event comes, not with the command line

        if event.message and (event.stage in ("note", "save") or event.step == 0):
            tqdm.write(event.message, file=sys.stderr)
        if event.stage not in LABELS or not event.total:
            return
        bar = self.bars.get(event.stage)
        if bar is None or bar.total != event.total:
            if bar is not None:
                bar.close()
            bar = self.bars[event.stage] = tqdm(total=event.total, desc=LABELS[event.stage], file=sys.stderr,
                                                dynamic_ncols=True, initial=event.step if event.step else 0)
        bar.update(event.step - bar.n)
        if event.metrics:
            bar.set_postfix({k: f"{v:.4g}" for k, v in event.metrics.items()}, refresh=False)
        if event.step >= event.total:
            bar.close()
            del self.bars[event.stage]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
