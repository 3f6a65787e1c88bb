"""Checks made before Ray starts, and the lock that keeps one driver per run directory.

``check_new_run`` and ``check_resume`` find the user's mistakes that need no cluster: the
dataset (path, format, class names and indices, enough images for the split) and the output
directory (already a run, or not writable). Each raises :class:`~kka_ray.config.ConfigError`
with one line that names the field and the fix, so ``kka run`` prints ``kka: error: ...`` and
exits 2 before any Ray process exists and before any run directory is made.

:class:`RunLock` is held by the driver for as long as it works on a run directory (an exclusive
``fcntl.flock`` on ``<run>/.kka.lock``): a second ``kka run --output X`` or ``--resume X`` is
refused with the process that holds it, and a driver that was killed leaves no lock behind (the
kernel drops it with the process), so resuming after a crash is never blocked.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kka_ray.config import ConfigError
from kka_ray.rundir import RunLayout

if TYPE_CHECKING:
    from kka_ray.config import KKAConfig

LOCK_NAME = ".kka.lock"


def check_dataset(cfg: "KKAConfig") -> None:
    """Build the one-class split the run will use (no Ray): a missing or malformed dataset, an
    unknown or out-of-range class, or too few images is one ``ConfigError`` naming ``data``."""
    from kka_ray.data.protocols import DEFAULT_NORMAL_CLASSES, dataset_key, load_dataset_sets, plan_one_class_split, resolve_classes

    d = cfg.data
    try:
        # the split's plan on labels alone: images of a folder dataset are decoded in prep, not here
        train, test = load_dataset_sets(d, cfg.run.seed)
        names = list(train.class_names)
        if names != list(test.class_names):
            raise ValueError("the train and test splits have different classes; point data.path at one dataset")
        try:
            normal = resolve_classes(d.normal_classes if d.normal_classes is not None
                                     else DEFAULT_NORMAL_CLASSES.get(dataset_key(d), [0]), names)
        except ValueError as err:
            raise ValueError(f"data.normal_classes: {err}") from None
        plan_one_class_split(train.labels, test.labels, normal, d.holdout_fraction, cfg.run.seed, d.max_normal_train,
                             d.max_test, names)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError) as err:
        text = str(err).strip("'\"") or type(err).__name__
        raise ConfigError(text if "data." in text else f"data: {text}") from None


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(run_dir: Path) -> None:
    """A new run's directory: not already a run, and creatable or writable."""
    if RunLayout(run_dir).state.is_file():
        raise ConfigError(f"{run_dir} already holds a run: continue it with `kka run --resume {run_dir}` "
                          "or pick another --output")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output {run_dir} is a file: give a directory")
    parent = _nearest_existing(run_dir)
    if not parent.is_dir():
        raise ConfigError(f"--output {run_dir}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {run_dir}: {parent} is not writable; pick a directory you can write to")


def check_new_run(cfg: "KKAConfig", run_dir: Path | None) -> None:
    """Everything a new ``kka run`` can check without Ray (``run_dir``: None when the run goes to
    a storage URI, whose access is checked where its location is made)."""
    if run_dir is not None:
        check_output(Path(run_dir))
    check_dataset(cfg)


def check_resume(cfg: "KKAConfig") -> None:
    """A run about to continue: its dataset is still where its config says."""
    check_dataset(cfg)


class RunLock:
    """Exclusive hold of a run directory by one driver (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            who = f"process {h.get('pid', '?')} on {h.get('host', '?')}" + (
                f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['since']))}" if "since" in h else "")
            raise FileExistsError(f"{self.path.parent} is being run by {who}: wait for it to finish or stop it, "
                                  "then resume with `kka run --resume`") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
