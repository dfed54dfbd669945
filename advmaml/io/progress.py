"""Progress lines for long loops: count, rate, elapsed time and time left.

At most one line per ``every_seconds`` (plus one when the loop ends, if any
line was written), so a loop of many short iterations does not flood the log,
and a short loop, such as training's validation, writes nothing.
"""

from __future__ import annotations

import time

from absl import logging

# Seconds between progress lines of an evaluation (module-level: tests set it to 0).
EVERY_SECONDS = 30.0


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class Progress:
  """``update(done)`` after each iteration; logs "<what>: done/total <unit> (..%) | rate | elapsed | left".

  done: the count already reached when the loop starts (a resumed loop's rate
  and time left count only this process's work).
  """

  def __init__(self, what: str, total: int, unit: str, every_seconds: float | None = None,
               done: int = 0):
    self.what, self.total, self.unit = what, total, unit
    self.every = EVERY_SECONDS if every_seconds is None else every_seconds
    self.start = self._last = time.time()
    self.lines = 0
    self.initial = done

  def update(self, done: int) -> None:
    now = time.time()
    finished = done >= self.total
    if now - self._last < self.every and not (finished and self.lines):
      return
    self._last, self.lines = now, self.lines + 1
    elapsed = now - self.start
    rate = (done - self.initial) / max(elapsed, 1e-9)
    logging.info("%s: %d/%d %s (%.0f%%) | %.2f %s/s | elapsed %s | left %s", self.what, done,
                 self.total, self.unit, 100 * done / max(self.total, 1), rate, self.unit,
                 format_duration(elapsed), format_duration((self.total - done) / max(rate, 1e-9)))
