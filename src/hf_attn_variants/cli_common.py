"""The layer every `hf-attn-variants` command stands on (`convert`, `train`; `serve` for its errors).

* Exit status: 0 done; 2 bad input or a failure, explained in one line on stderr (`--debug` adds the traceback);
  130 Ctrl-C, 128 + N another signal N (SIGTERM: 143).
* Every argument and input is checked before anything is written or loaded at length (`CommandError`).
* Output goes to a hidden staging folder next to the output, renamed to the output when complete
  (`staging_folder`, `publish`); an existing output is refused unless the caller allows replacing it
  (`check_output_path`).
* SIGTERM/SIGHUP raise `Interrupted` (like Ctrl-C raises KeyboardInterrupt), so the same cleanup runs
  (`signals_raise`); a command that can stop more gracefully (training: save a checkpoint first) defers them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback


class CommandError(ValueError):
    """Bad input or a refusal, explained in one line (the command prints it and exits with status 2)."""


class OutputExistsError(CommandError, FileExistsError):
    """The output exists and replacing it was not asked for."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP (or a deferred Ctrl-C) arrived; raised like KeyboardInterrupt so cleanup code runs."""

    def __init__(self, signum: int, message: str | None = None):
        super().__init__(signum)
        self.signum = signum
        self.message = message

    def __str__(self):
        return self.message or f"interrupted by {signal_name(self.signum)}"


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover
        return f"signal {signum}"


def first_line(error) -> str:
    """`error` as one line (whitespace collapsed, at most 400 characters)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def is_main_process() -> bool:
    """Rank 0 of a launcher's processes (or not launched at all): the one that prints refusals."""
    return os.environ.get("RANK", "0") in ("", "0")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: ... (see --help)`) and exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def run_command(body, *, debug: bool = False, known=(CommandError, FileExistsError), interrupted_suffix: str = "",
                quiet_ranks: bool = True, hint_known: bool = True) -> int:
    """Run `body()` (returns an exit status or None for 0) as a command: exceptions become one line and a status.

    `known` errors print their message alone (with the `--debug` hint unless not `hint_known`); others print their
    type too, and the hint."""
    speak = is_main_process() or not quiet_ranks
    try:
        status = body()
        return 0 if status is None else int(status)
    except Interrupted as interrupted:
        if speak:
            print(f"error: {interrupted}{interrupted_suffix}", file=sys.stderr)
        return 128 + interrupted.signum
    except KeyboardInterrupt:
        if speak:
            print(f"error: interrupted{interrupted_suffix}", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the command's last word
        if debug:
            traceback.print_exc()
        if speak:
            is_known = isinstance(error, known)
            text = first_line(error) if is_known else f"{type(error).__name__}: {first_line(error)}"
            hint = "" if debug or (is_known and not hint_known) else " (--debug shows the traceback)"
            print(f"error: {text}{hint}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------------------------------
# Output folders
# --------------------------------------------------------------------------------------------------------------------


def check_output_path(output_dir, overwrite: bool = False, protect=(), *, error=CommandError,
                      exists_error=OutputExistsError, allow_existing: bool = False,
                      exists_hint: str = "pass --overwrite (overwrite=True) to replace it") -> str:
    """The absolute output path; refuses an empty path, the current folder, the home folder, `protect` (inputs) and
    their ancestors, a path that exists and is not a folder, and an existing folder unless `overwrite` or
    `allow_existing` (checked before anything slow happens)."""
    if output_dir is None or not str(os.fspath(output_dir)).strip():
        raise error("the output path is empty; name a new folder")
    output = os.path.abspath(os.path.expanduser(os.fspath(output_dir)))
    real = os.path.realpath(output)
    guarded = [("the current folder", os.getcwd()), ("the home folder", os.path.expanduser("~")),
               ("the filesystem root", os.path.abspath(os.sep))]
    guarded += [(f"the source {os.path.basename(os.path.normpath(p)) or p}", p) for p in protect if p]
    for what, path in guarded:
        path = os.path.realpath(path)
        if real == path or path.startswith(real.rstrip(os.sep) + os.sep):
            relation = "" if real == path else "an ancestor of "
            raise error(
                f"refusing to write to {os.fspath(output_dir)!r}: it is {relation}{what}"
                + (", which --overwrite would delete" if overwrite else "") + "; name a new folder"
            )
    if os.path.lexists(output):
        if os.path.islink(output) or not os.path.isdir(output):
            raise error(f"{os.fspath(output_dir)!r} exists and is not a folder; refusing to replace it")
        if not (overwrite or allow_existing):
            raise exists_error(f"{os.fspath(output_dir)!r} already exists; {exists_hint}")
    return output


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(folder: str):
    """Give everything in `folder` the mode new files and folders get from the umask (writers using mkstemp: 0600)."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def publish(staging: str, output: str, overwrite: bool, exists_error=OutputExistsError):
    """Rename the finished `staging` folder to `output`; an existing `output` (with `overwrite`) is replaced only
    now, and put back if the rename fails."""
    if not os.path.lexists(output):
        os.rename(staging, output)
        return
    if not overwrite:
        raise exists_error(f"{output!r} appeared while writing it; pass overwrite=True to replace it")
    old = tempfile.mkdtemp(prefix=".replaced-", dir=os.path.dirname(output))
    os.rmdir(old)
    os.rename(output, old)
    try:
        os.rename(staging, output)
    except BaseException:
        os.rename(old, output)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def signals_raise(exception=Interrupted, names=("SIGTERM", "SIGHUP")):
    """While active (main thread only), the signals `names` raise `exception(signum)` so cleanup code runs. A handler
    someone else installed is left alone; a second signal does not interrupt the cleanup."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        for sig in previous:  # a second signal must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        raise exception(signum)

    for name in names:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def staging_folder(output_dir: str, overwrite: bool = False, exists_error=OutputExistsError, interrupted=Interrupted):
    """Yield a hidden `.partial-*` sibling of `output_dir`; rename it to `output_dir` when the block succeeds.

    Any exception, Ctrl-C, SIGTERM or SIGHUP removes it. The folder and its files get the permissions the umask gives
    new ones (tempfile makes the folder 0700; safetensors writes its files 0600). An existing output (with
    `overwrite`) is replaced only once the new one is done.
    """
    output = os.path.abspath(output_dir)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    with signals_raise(interrupted):
        staging = tempfile.mkdtemp(prefix=".partial-", dir=parent)
        try:
            os.chmod(staging, 0o777 & ~umask())
            yield staging
            normal_permissions(staging)
            publish(staging, output, overwrite, exists_error)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


class SignalCatcher:
    """Ctrl-C, SIGTERM and SIGHUP for a command that can stop gracefully at safe points (training: save a checkpoint
    first). Outside `deferred()` they interrupt at once (KeyboardInterrupt for Ctrl-C, `Interrupted` for the others);
    inside, the first one is only recorded (`received`) for the command to act on at its next safe point. Signals
    in the next `grace` seconds are the same request arriving twice (a launcher forwarding the terminal's Ctrl-C);
    a later one interrupts at once. Main thread only; a handler someone else installed is left alone."""

    def __init__(self, names=("SIGINT", "SIGTERM", "SIGHUP"), grace: float = 3.0):
        self.names, self.grace = names, grace
        self.received: int | None = None
        self._at = 0.0
        self._deferring = False
        self._previous = {}

    def _handler(self, signum, frame):
        import time

        if self._deferring:
            if self.received is None:
                self.received, self._at = signum, time.monotonic()
                return
            if time.monotonic() - self._at < self.grace:
                return
        self._deferring = False
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name, None)
                if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler, None):
                    self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous = {}
        return False

    @contextlib.contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False
