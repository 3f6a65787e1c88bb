"""The one Ray Train path every trained model of the engine goes through.

The confusion evaluator (Deep SAD, method.md Eq. 5) and the detectors (SAD, SimpleNet,
ReContrast) all train with :func:`fit_torch`: a ``ray.train.torch.TorchTrainer`` (Ray Train
v2) over Ray Datasets, where ``"train"`` is split across the workers and every other dataset
(``"val"``: held-out normals + generated anomalies for checkpoint selection) is given whole to
each worker. The worker loops use the helpers below so they agree on how to sum across
workers, how often to report, and how the final checkpoint is written:

- :func:`global_sum`: a few floats summed over workers (identity on one worker);
- :class:`ReportThrottle`: every worker reports the same number of times (Train v2 needs it),
  at most every ``MIN_REPORT_INTERVAL_S`` (the controller polls every 2 s);
- :func:`report_final`: rank 0 writes its files into a temporary directory, every worker
  reports once more, and that report carries the checkpoint;
- :func:`worker_setup` (threads, seed, rank, device, the ``"train"`` shard) and
  :func:`shuffled_batches` (one seeded local shuffle per pass over the shard).

Arrays become Ray Datasets with :func:`arrays_to_dataset` (Arrow tensor blocks, seeded order);
:func:`labelled_datasets` builds a detector's ``"train"`` (normals 0, anomalies 1) and
``"val"`` datasets, and :func:`fit_section` runs :func:`fit_torch` with a config section's
placement (``num_workers``, ``use_gpu``, ``resources_per_worker``; torch threads = its CPUs).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

if TYPE_CHECKING:
    import ray.data
    import ray.train
    import torch

logger = logging.getLogger(__name__)

# ~16 MB Arrow blocks stream well and leave several blocks per worker for the equal split.
TARGET_BLOCK_BYTES = 16 * 1024**2
MIN_BLOCKS_PER_WORKER = 2
# Train v2's controller takes one result per worker per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
# 2 s) through a queue of size 1: reporting more often only blocks the workers.
MIN_REPORT_INTERVAL_S = 2.0
# A Ray Train worker that dies (OOM, a preempted node) is replaced and the fit restarts from its
# beginning, at most this many times; then the stage fails cleanly and `kka run --resume` reruns it.
TRAIN_MAX_FAILURES = 2
# Local shuffle buffer, in batches: enough to mix rows of neighbouring blocks (arrays_to_dataset
# already permutes the rows once) without holding the whole shard in memory.
SHUFFLE_BUFFER_BATCHES = 8


@dataclass
class Worker:
    """What a Ray Train worker loop starts from (:func:`worker_setup`)."""

    rank: int
    world: int
    device: "torch.device"
    shard: Any  # ray.train.get_dataset_shard("train")
    seed: int


def worker_setup(config: dict[str, Any]) -> Worker:
    """Apply ``config["torch_threads"]``, seed torch with ``config["seed"]`` (the same initial
    weights on every worker; DDP also broadcasts rank 0's), and read rank, device and shard."""
    import ray.train
    import ray.train.torch
    import torch

    seed = int(config.get("seed", 0))
    if config.get("torch_threads"):
        torch.set_num_threads(int(config["torch_threads"]))
    torch.manual_seed(seed)
    ctx = ray.train.get_context()
    device = torch.device("cpu") if _in_process_run_dir is not None else ray.train.torch.get_device()
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), device, ray.train.get_dataset_shard("train"), seed)


def shuffled_batches(w: Worker, batch_size: int, dtypes: dict, pass_index: int | None):
    """Torch batches of the worker's shard, locally shuffled with a seed of (seed, pass, rank);
    ``pass_index=None``: in order (a pass for statistics, not for training)."""
    shuffle = pass_index is not None
    return w.shard.iter_torch_batches(
        batch_size=batch_size, dtypes=dtypes,
        local_shuffle_buffer_size=batch_size * SHUFFLE_BUFFER_BATCHES if shuffle else None,
        local_shuffle_seed=(w.seed * 100_003 + pass_index * 1_009 + w.rank) if shuffle else None,
    )


def arrays_to_dataset(columns: dict[str, np.ndarray], num_workers: int = 1, seed: int | None = 0) -> "ray.data.Dataset":
    """Equal-length arrays as a Ray Dataset of Arrow tensor blocks, in a seeded random order.

    Permuting once here means every block mixes normals and anomalies, so the workers' local
    shuffle buffers see both kinds. ``seed=None`` keeps the given order.
    """
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    lengths = {name: len(a) for name, a in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns must have equal lengths, got {lengths}")
    n = next(iter(lengths.values()))
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    cols = {k: np.ascontiguousarray(np.asarray(v)[order]) for k, v in columns.items()}
    nbytes = sum(a.nbytes for a in cols.values())
    n_blocks = max(MIN_BLOCKS_PER_WORKER * num_workers, math.ceil(nbytes / TARGET_BLOCK_BYTES))
    rows = max(1, math.ceil(n / n_blocks))

    def column(a: np.ndarray):
        return ArrowTensorArray.from_numpy(a) if a.ndim > 1 else pa.array(a)

    tables = [pa.table({k: column(a[i : i + rows]) for k, a in cols.items()}) for i in range(0, n, rows)]
    return ray.data.from_arrow(tables)


def validation_dataset(x: np.ndarray, is_anomaly: np.ndarray) -> "ray.data.Dataset":
    """The ``"val"`` dataset: rows ``x`` in the given order, ``label`` float32 (1 = anomaly)."""
    return arrays_to_dataset({"x": x, "label": np.asarray(is_anomaly).astype(np.float32)}, 1, seed=None)


@dataclass
class LabelledRows:
    """A detector's training data as Ray Datasets (:func:`labelled_datasets`)."""

    datasets: dict[str, Any]  # "train" and, when validation has anomalies, "val"
    normal: np.ndarray  # the prepared normal rows
    n_rows: int
    n_anomalies: int


def labelled_datasets(prepare: Callable[[np.ndarray, str], np.ndarray], normal: np.ndarray,
                      anomalies: np.ndarray | None, validation: Any, num_workers: int, seed: int,
                      label_dtype: Any = np.int64) -> LabelledRows:
    """``"train"``: ``prepare(normal)`` labelled 0 and ``prepare(anomalies)`` labelled 1, in a
    seeded order over ``num_workers``; ``"val"``: held-out normals (0) and anomalies (1) when
    ``validation`` (a :class:`kka_ray.detectors.base.Validation`) has anomalies.
    ``prepare(rows, what)`` turns raw rows into the model's input (``what`` names them in errors)."""
    norm = prepare(normal, "normal")
    parts, labels = [norm], [np.zeros(len(norm), label_dtype)]
    if anomalies is not None and len(anomalies):
        parts.append(prepare(anomalies, "anomalies"))
        labels.append(np.ones(len(parts[-1]), label_dtype))
    x, y = np.concatenate(parts), np.concatenate(labels)
    datasets = {"train": arrays_to_dataset({"x": x, "label": y}, num_workers, seed)}
    if validation is not None and validation.has_anomalies:
        vn = prepare(validation.normal, "validation.normal")
        va = prepare(validation.anomalies, "validation.anomalies")
        datasets["val"] = validation_dataset(np.concatenate([vn, va]), np.r_[np.zeros(len(vn)), np.ones(len(va))])
    return LabelledRows(datasets, norm, len(x), len(x) - len(norm))


class Placement(Protocol):
    """The placement fields every trained section has (DeepSAD, SimpleNet, ReContrast)."""

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    in_process: bool


def fit_section(train_loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any],
                datasets: dict[str, "ray.data.Dataset"], section: Placement, storage_path: str,
                name: str) -> "ray.train.Result":
    """:func:`fit_torch` placed as ``section`` says; each worker uses as many torch threads as
    it holds CPUs (``loop_config["torch_threads"]``)."""
    threads = max(1, int(section.resources_per_worker.get("CPU", 1)))
    return fit_torch(train_loop, {**loop_config, "torch_threads": threads}, datasets,
                     num_workers=section.num_workers, use_gpu=section.use_gpu,
                     resources_per_worker=section.resources_per_worker, storage_path=storage_path, name=name,
                     in_process=getattr(section, "in_process", False))


def fit_torch(
    train_loop: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    datasets: dict[str, "ray.data.Dataset"],
    *,
    num_workers: int,
    use_gpu: bool,
    resources_per_worker: dict[str, float],
    storage_path: str,
    name: str,
    max_failures: int = TRAIN_MAX_FAILURES,
    in_process: bool = False,
) -> "ray.train.Result":
    """Run ``train_loop`` on ``num_workers`` Ray Train workers; return the result with its checkpoint.

    ``datasets["train"]`` is split across workers; the others (``"val"``) reach every worker
    whole. A run directory ``storage_path/name`` that already exists is refused: Ray Train v2
    would resume it instead of training anew. A worker that dies is replaced and the fit restarts
    (``max_failures`` times; the loops checkpoint only at their end, so a restart trains anew).

    ``in_process`` with one CPU worker on a local storage path: Ray Train's local mode
    (``num_workers=0``), the loop runs in this process with the same ``ray.train`` calls and no
    actor to start; its checkpoint is written to ``storage_path/name/<checkpoint_dir_name>`` as
    Ray Train would, and torch's thread count is restored afterwards. No worker restart.
    """
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kka_ray.cluster import ensure_ray

    ensure_ray()
    if "train" not in datasets:
        raise ValueError(f"datasets needs a 'train' entry; got {sorted(datasets)}")
    if "://" not in storage_path:
        storage_path = os.path.abspath(os.path.expanduser(storage_path))
        if os.path.exists(os.path.join(storage_path, name)):
            raise FileExistsError(
                f"run directory {os.path.join(storage_path, name)!r} exists; Ray Train would resume it. "
                "Use a new name or delete the directory"
            )
    local = in_process and num_workers == 1 and not use_gpu and "://" not in storage_path
    scaling = (ScalingConfig(num_workers=0) if local else
               ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=dict(resources_per_worker)))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=RunConfig(storage_path=storage_path, name=name, failure_config=FailureConfig(max_failures=max_failures)),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    if local:
        result = _fit_in_process(trainer, os.path.join(storage_path, name))
    else:
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} finished without a checkpoint (see the logs under {storage_path})")
    return result


# The run directory of the fit running in this process (local mode), else None: report_final writes
# its checkpoint there and worker_setup trains on the CPU.
_in_process_run_dir: str | None = None


def _fit_in_process(trainer: Any, run_dir: str) -> "ray.train.Result":
    """``trainer.fit()`` in Ray Train's local mode, its checkpoint kept under ``run_dir``."""
    import torch

    global _in_process_run_dir
    threads = torch.get_num_threads()
    os.makedirs(run_dir)
    _in_process_run_dir = run_dir
    try:
        return trainer.fit()
    finally:
        _in_process_run_dir = None
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------
# worker-side helpers


def global_sum(values: list[float], device: "torch.device", world_size: int) -> list[float]:
    """Sum a few floats over all workers (identity on one worker)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t.tolist()


def unwrap(model: "torch.nn.Module") -> "torch.nn.Module":
    """The module inside a DDP wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


class ReportThrottle:
    """Intermediate ``ray.train.report`` calls, equally many on every worker, at most every 2 s.

    Rank 0 decides whether a report is due; the flag is summed over workers, so all of them
    report together. Call :meth:`maybe_report` after every epoch but the last.
    """

    def __init__(self, rank: int, world_size: int, device: "torch.device") -> None:
        self.rank, self.world, self.device = rank, world_size, device
        self.last = time.perf_counter()

    def maybe_report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        due = float(self.rank == 0 and time.perf_counter() - self.last >= MIN_REPORT_INTERVAL_S)
        if global_sum([due], self.device, self.world)[0] > 0:
            ray.train.report(metrics)
            self.last = time.perf_counter()


class EpochSelector:
    """The epoch with the best validation AUROC and a CPU copy of its weights (the first best wins).

    Every worker loop calls :meth:`update` after each epoch that has a validation AUROC, then
    :meth:`states` for what to write (the chosen weights, and the last epoch's when they differ)
    and :meth:`meta` for the checkpoint's ``selected_epoch`` / ``selected_val_auroc`` /
    ``last_val_auroc``. Without validation anomalies nothing is chosen and the last epoch is kept.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.auroc: float | None = None
        self.state: dict[str, Any] | None = None

    def update(self, epoch: int, auroc: float | None, state_dict: Callable[[], dict[str, Any]]) -> None:
        if auroc is not None and (self.auroc is None or auroc > self.auroc):
            self.epoch, self.auroc = epoch, auroc
            self.state = {k: v.detach().cpu().clone() for k, v in state_dict().items()}

    def states(self, last_epoch: int, last_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(weights to use, the last epoch's weights or None when they are the ones chosen)."""
        if self.state is not None and self.epoch != last_epoch:
            return self.state, last_state
        return last_state, None

    def meta(self, last_epoch: int, last_auroc: float | None) -> dict[str, Any]:
        return {"selected_epoch": self.epoch or last_epoch, "selected_val_auroc": self.auroc,
                "last_val_auroc": last_auroc}


def report_final(metrics: dict[str, Any], rank: int, write_files: Callable[[str], None], checkpoint_dir_name: str) -> None:
    """Rank 0 writes the checkpoint files with ``write_files(directory)``; every worker reports once."""
    import ray.train

    if _in_process_run_dir is not None:  # local mode: nothing copies a temporary directory into place
        final = os.path.join(_in_process_run_dir, checkpoint_dir_name)
        os.makedirs(final, exist_ok=True)
        write_files(final)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(final), checkpoint_dir_name=checkpoint_dir_name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            write_files(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)


def read_val(name: str = "val", dtypes: dict[str, "torch.dtype"] | None = None) -> dict[str, "torch.Tensor"] | None:
    """The whole (unsplit) validation dataset on this worker as tensors, or None when absent."""
    import ray.train
    import torch

    try:
        shard = ray.train.get_dataset_shard(name)
    except (KeyError, ValueError, AssertionError):  # local mode asserts the name is there
        return None
    if shard is None:
        return None
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in shard.iter_torch_batches(batch_size=1024, dtypes=dtypes):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()} if parts else None


def validation_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """AUROC of ``scores`` (higher = more anomalous) against ``labels`` (1 = anomaly); None if one class."""
    labels = np.asarray(labels).astype(int)
    if labels.min(initial=0) == labels.max(initial=0) or len(np.unique(labels)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))
