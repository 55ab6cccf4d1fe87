"""The finished subsets of an evaluation run, kept on disk so that an interrupted run resumes (both suites).

A full `pymerge eval` (make bench-quality) runs for hours on a small machine. run_evaluation / run_lm_evaluation
with checkpoint=PATH append one JSON line per subset as soon as its rows are done; a later run with the same
settings reads them back and computes only the subsets that are missing. The first line records the run's key:
its settings (seed, sizes, limits, grids, rows) and the experts' reference scores and sources, so rows are reused
only by a run with the same settings and experts; a file of another run is replaced. A changed pymerge is not
detected: after changing a method, start again (`pymerge eval --fresh`). A line cut short by an interruption is
dropped (that subset runs again).
"""
import dataclasses
import json
import logging
import os
from pathlib import Path

from .report import atomic_write

logger = logging.getLogger("pymerge.eval")


def _jsonable(value):
    """The value as JSON gives it back: tuples as lists, non-JSON leaves as their str (the logs' convention)."""
    return json.loads(json.dumps(value, default=str))


def run_key(config: dict, experts: dict) -> dict:
    """What decides a run's rows: its settings (all but the thread count) and its experts' reference scores and
    sources."""
    return {"config": {k: v for k, v in config.items() if k != "torch_threads"}, "experts": experts}


def run_subsets(pairs, compute, log=None, on_row=None) -> list:
    """The rows of each (size, subset) of pairs, in order: read back from the log (a SubsetLog or None) when a
    previous run finished that subset, else compute(size, subset) and logged; on_row(row) is called for each."""
    out = []
    for size, subset in pairs:
        rows = None if log is None else log.done(size, subset)
        if rows is None:
            rows = compute(size, subset)
            if log is not None:
                log.add(size, subset, rows)
        for r in rows:
            if on_row is not None:
                on_row(r)
        out += rows
    return out


class SubsetLog:
    """done(size, subset) -> the rows a previous run finished for that subset, or None; add(size, subset, rows)
    appends them. row_type: the suite's row dataclass (harness.Row, lm_harness.LMRow)."""

    def __init__(self, path, key: dict, row_type):
        self.path, self.key, self.row_type = Path(path), _jsonable(key), row_type
        self.rows = {}
        lines, intact = self._read()
        if not intact:   # no file of this run, or a line cut short: the next line must start on its own
            atomic_write(self.path, "".join(line + "\n" for line in [json.dumps({"key": self.key}), *lines])
                         .encode("utf-8"))
        if self.rows:
            logger.info("resuming from %s: %d subset(s) already done", self.path, len(self.rows))

    def _read(self):
        """(the file's good subset lines, whether the file is whole and of this run); ([], False) when there is no
        file of this run (absent, unreadable, another run's key)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], False
        except (OSError, UnicodeDecodeError) as e:
            logger.warning("%s is unreadable (%s): starting afresh", self.path, e)
            return [], False
        raw, intact = text.splitlines(), text.endswith("\n")
        try:
            head = json.loads(raw[0]) if raw else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("key") != self.key:
            logger.info("%s holds another run's subsets (other settings or experts): starting afresh", self.path)
            return [], False
        good = []
        for line in raw[1:]:
            try:
                entry = json.loads(line)
                rows = [self._row(r) for r in entry["rows"]]
                subset = (int(entry["size"]), tuple(entry["subset"]))
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("%s: dropping a damaged line and what follows it (%s)", self.path, e)
                intact = False
                break
            self.rows[subset] = rows
            good.append(line)
        return good, intact

    def _row(self, fields):
        names = {f.name for f in dataclasses.fields(self.row_type)}
        if set(fields) != names:
            raise KeyError(f"row fields {sorted(set(fields) ^ names)}")
        return self.row_type(**{**fields, "subset": tuple(fields["subset"])})

    def done(self, size, subset):
        return self.rows.get((size, tuple(subset)))

    def add(self, size, subset, rows):
        entry = {"size": size, "subset": list(subset), "rows": [_jsonable(dataclasses.asdict(r)) for r in rows]}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[size, tuple(subset)] = rows
