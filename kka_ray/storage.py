"""Where run directories live: ``run.storage_path``, a local directory or a filesystem URI.

A run directory (kka_ray/loop.py) holds everything needed to inspect or resume a run. On a Ray
cluster the job driver's working directory is temporary, so jobs write their run directory to
``run.storage_path``:

- a local path (``/mnt/shared/kka``, ``~/kka_runs``): the run works there directly;
- a URI that ``pyarrow.fs.FileSystem.from_uri`` opens (``file:///...``, ``s3://bucket/prefix``,
  ``gs://bucket/prefix``, ``hdfs://...``): the run works in a local staging directory, and
  :meth:`RunLocation.push` uploads what changed after every completed stage (``state.json``
  last, so the stored state never names a stage whose files are not there yet). Resuming from a
  URI downloads the run first. Either way a crash loses at most the stage in flight.

The run directory is ``<storage_path>/<name>``; the name is ``--output`` or ``run.output_dir``
(a relative name then), else the Ray job's submission id inside a job, else a timestamp.
One job works on a run at a time (two would share its staging copy). Credentials for s3:// or
gs:// come from the node's own environment (instance role, workload
identity): ``kka submit`` never ships them (kka_ray/submit.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from kka_ray.config import ConfigError, KKAConfig
from kka_ray.rundir import STATE_FILE, RunLayout, is_run_dir

if TYPE_CHECKING:
    from kka_ray.loop import KKARun

logger = logging.getLogger(__name__)

# Inside a Ray job without run.storage_path: the job's working directory is deleted with the
# job, so the run goes to the driver node's home instead (like Ray Train's ~/ray_results).
DEFAULT_JOB_STORAGE = "~/kka_runs"
# Ray puts the job's metadata (submission id included) in this variable for the job driver.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (file://, s3://, gs://, ...), False for plain local paths."""
    return bool(_URI.match(str(path)))


def join(base: str, name: str) -> str:
    """``base/name`` for a URI or a local path (``~`` expanded)."""
    if is_uri(base):
        return base.rstrip("/") + "/" + name.strip("/")
    return str(Path(base).expanduser() / name)


def ray_job_submission_id() -> str | None:
    """The submission id of the Ray job this process is the driver of (None outside a job)."""
    try:
        meta = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV, "{}")).get("metadata") or {}
    except json.JSONDecodeError:
        return None
    return meta.get("job_submission_id") or None


def filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow filesystem, path inside it)`` for a URI, with an error that says what to fix."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        raise ConfigError(
            f"run.storage_path: pyarrow cannot open {uri!r} ({err}); use a local path or a URI "
            "pyarrow.fs.FileSystem.from_uri understands (file:///abs/path, s3://bucket/prefix, gs://bucket/prefix)"
        ) from None


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative posix path: (size, mtime_ns)}`` of the files under ``root`` (no temp files)."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.endswith(".tmp")]  # a stage in flight
        for f in filenames:
            if f.endswith(".tmp") or f == ".kka.lock":  # a stage in flight; the driver's lock (kka_ray/preflight.py)
                continue
            p = Path(dirpath) / f
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def staging_dir(remote: str) -> Path:
    """The local working copy of a remote run: the same path for the same URI on every node,
    because a run records absolute paths (the current LoRA adapter) in its state.json."""
    key = hashlib.sha1(remote.rstrip("/").encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / "kka-staging" / key / PurePosixPath(remote.rstrip("/")).name


class RunLocation:
    """A run directory: ``local`` is where the run works; ``remote`` (a URI) is where it is kept."""

    def __init__(self, local: str | os.PathLike, remote: str | None = None):
        self.local = Path(local)
        self.remote = remote
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._fs = None

    def _remote_fs(self):
        """``(filesystem, root)`` of the remote URI, opened once (s3/gs open a client each time)."""
        if self._fs is None:
            self._fs = filesystem(self.remote)
        return self._fs

    @property
    def uri(self) -> str:
        """Where the run is kept: the URI, or the local directory."""
        return self.remote or str(self.local)

    def pull(self) -> None:
        """Replace the staging copy with the remote run directory."""
        import pyarrow.fs as pafs

        fs, root = self._remote_fs()
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"{self.remote} does not exist: it is not a kka run directory")
        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        pafs.copy_files(root, str(self.local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        self._uploaded = _snapshot(self.local)
        logger.info("downloaded %s to %s (%d files)", self.remote, self.local, len(self._uploaded))

    def push(self) -> int:
        """Upload the files that changed since the last push (state.json last) and delete the
        remote copies of files deleted here; returns the number of files uploaded."""
        if self.remote is None:
            return 0
        import pyarrow.fs as pafs

        if not is_run_dir(self.local):  # uploading would delete the stored run
            raise FileNotFoundError(f"the staging copy {self.local} of {self.remote} has lost its config.yaml "
                                    "(deleted under the run?): nothing uploaded; resume from the stored run")
        fs, root = self._remote_fs()
        local_fs = pafs.LocalFileSystem()
        now = _snapshot(self.local)
        changed = sorted((rel for rel, sig in now.items() if self._uploaded.get(rel) != sig),
                         key=lambda rel: rel == STATE_FILE)
        made: set[str] = set()
        for rel in changed:
            dest = f"{root.rstrip('/')}/{rel}"
            parent = dest.rsplit("/", 1)[0]
            if parent not in made:
                fs.create_dir(parent, recursive=True)
                made.add(parent)
            pafs.copy_files(str(self.local / rel), dest, source_filesystem=local_fs, destination_filesystem=fs)
        for rel in sorted(self._uploaded.keys() - now.keys()):
            try:
                fs.delete_file(f"{root.rstrip('/')}/{rel}")
            except FileNotFoundError:
                pass
        self._uploaded = now
        logger.info("uploaded %d changed files of %s to %s", len(changed), self.local, self.remote)
        return len(changed)

    def exists(self) -> bool:
        """True when a run (its state.json) is already kept at this location."""
        if self.remote is None:
            return RunLayout(self.local).state.is_file()
        import pyarrow.fs as pafs

        fs, root = self._remote_fs()
        return fs.get_file_info(f"{root.rstrip('/')}/{STATE_FILE}").type != pafs.FileType.NotFound

    def cleanup(self) -> None:
        """Remove the staging copy of a remote run (its files are all uploaded)."""
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)
            try:
                self.local.parent.rmdir()  # the per-URI directory, when nothing else is staged there
            except OSError:
                pass

    def execute(self, run: "KKARun", stages: list[str] | None = None, cleanup: bool = True) -> str:
        """Run ``run`` (all stages, or only ``stages``), uploading after every stage and once at
        the end, also after a failure; returns where the run is kept (URI or absolute path).
        The staging copy is removed once uploaded, unless ``cleanup=False`` (to read results
        first; then call :meth:`cleanup`) or the last upload failed (it holds the only copy)."""
        body = run.execute if stages is None else (lambda: run.execute_stages(stages))
        if self.remote is None:
            body()
            return str(run.dir)
        run.on_stage_done = lambda _stage: self.push()
        run.staging_for = self.remote
        try:
            body()
        except BaseException:
            try:
                self.push()
            except Exception as err:  # keep the run's own error
                logger.error("could not upload %s to %s (the staging copy stays): %s", self.local, self.remote, err)
            else:
                self.cleanup()
            raise
        self.push()
        if cleanup:
            self.cleanup()
        return self.remote


def check_staging_cluster(uri: str, alive_nodes: int) -> None:
    """A run kept at a storage URI works in a staging copy on the driver's node; other nodes write
    into the run directory (Ray Data's Parquet, the DPO adapter, Ray Train checkpoints) and cannot
    reach that copy, so a URI is refused on a cluster of more than one node."""
    if alive_nodes > 1:
        raise ConfigError(
            f"run.storage_path {uri} is a URI, and the run works in a staging copy on the driver's node, which the "
            f"other {alive_nodes - 1} node(s) of this cluster cannot write to: set run.storage_path to a directory "
            "every node mounts (e.g. /mnt/shared/kka), or run on one node"
        )


def _run_name(cfg: KKAConfig, output: str | None, submission_id: str | None = None) -> str:
    name = output or cfg.run.output_dir
    if name is not None:
        p = PurePosixPath(str(name))
        if is_uri(name) or p.is_absolute() or ".." in p.parts or str(name).startswith("~"):
            raise ConfigError(
                f"run.output_dir / --output {name!r} must be a relative name when run.storage_path is set "
                f"(the run directory is <run.storage_path>/<name>): give a name, or unset run.storage_path"
            )
        return str(name)
    return submission_id or ray_job_submission_id() or datetime.now().strftime("%Y%m%d-%H%M%S")


def run_target(cfg: KKAConfig, output: str | None = None, submission_id: str | None = None) -> str | None:
    """Where a new run of a Ray job goes: ``<storage>/<name>`` (a path or a URI), or None for a
    plain directory (no storage path, outside a job or with an absolute name). Pure: the job
    driver and ``kka submit`` (which names the job ``submission_id`` before it exists) share it,
    so a name the driver would refuse is refused at submission."""
    storage = cfg.run.storage_path
    in_job = submission_id is not None or ray_job_submission_id() is not None
    if storage is None:
        explicit = output or cfg.run.output_dir
        if not in_job or (explicit and Path(explicit).expanduser().is_absolute()):
            return None
        storage = DEFAULT_JOB_STORAGE
    return join(storage, _run_name(cfg, output, submission_id))
