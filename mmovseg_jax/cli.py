"""Pieces shared by the command-line tools (predict, clouds, data packing and clouds):
one-line argument errors, atomic multi-file outputs, and a progress line with ETA."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Collection, TextIO


class UsageError(ValueError):
    """A bad argument or input: one `error:` line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line, no usage block)."""

    def error(self, message: str):
        raise UsageError(message)


def with_one_line_errors(argv: list[str], action: Callable[[], None]) -> int:
    """Runs `action`; a UsageError, OSError (missing or unwritable files) or ValueError
    becomes one `error:` line on stderr and exit code 2 (the traceback with --debug)."""
    try:
        action()
    except (UsageError, OSError, ValueError) as e:
        if "--debug" in argv:
            raise
        message = " ".join(str(e).split("\n")).strip() or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def check_output(path: Path, arg: str, suffixes: Collection[str]) -> Path:
    """An output path with a known suffix, in an existing folder, not itself a folder."""
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{arg} {path}: unsupported extension {path.suffix!r} (known: {', '.join(suffixes)})")
    if not path.parent.is_dir():
        raise UsageError(f"{arg} {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"{arg} {path}: is a folder")
    return path


def write_all(outputs: dict[Path, Callable]) -> None:
    """Writes each output through writer(file object) to a temporary file beside it, then
    renames all into place; on any error the temporary files are removed."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, writer in outputs.items():
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
            with open(tmp, "xb") as f:  # exclusive create; a named file object (tifffile needs the name)
                staged.append((tmp, path))
                writer(f)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def reading(arg: str, reader: Callable, path: Path, *rest):
    """reader(path, *rest), its errors (which name the file) prefixed with the argument
    (`--rgb FILE: ...`): FileNotFoundError stays one, ValueError becomes UsageError."""
    try:
        return reader(path, *rest)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{arg} {e}") from e
    except ValueError as e:
        raise UsageError(f"{arg} {e}") from e


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS ("?" for infinity)."""
    if seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def bar(fraction: float, width: int = 20) -> str:
    """A text progress bar: bar(0.25, 8) -> '[##------]'."""
    filled = int(round(max(0.0, min(1.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


class Progress:
    """Prints `label: [####----] done/total unit (%), rate, elapsed, ETA` to `stream` at most
    every `every` seconds, and at the end. The rate counts `made` items when given (work
    done in this run, skipped items being free), else `done`. With `quiet_below`, a job
    finished within that many seconds prints nothing."""

    def __init__(self, total: int, stream: TextIO, every: float = 1.0, label: str = "progress",
                 unit: str = "records", quiet_below: float = 0.0):
        self.total, self.stream, self.every, self.label, self.unit = total, stream, every, label, unit
        self.quiet_below = quiet_below
        self.start = self.last = time.monotonic()
        self.printed = False

    def update(self, done: int, made: int | None = None) -> None:
        now = time.monotonic()
        if done < self.total and now - self.last < self.every:
            return
        elapsed = max(now - self.start, 1e-9)
        if not self.printed and elapsed < self.quiet_below:
            return
        self.last, self.printed = now, True
        rate = (done if made is None else made) / elapsed
        left = self.total - done
        eta = 0.0 if left == 0 else (left / rate if rate > 0 else float("inf"))
        print(f"{self.label}: {bar(done / max(self.total, 1))} {done}/{self.total} {self.unit} "
              f"({100.0 * done / max(self.total, 1):.0f}%), {rate:.2f} {self.unit}/s, elapsed {clock(elapsed)}, "
              f"ETA {clock(eta)}", file=self.stream, flush=True)
