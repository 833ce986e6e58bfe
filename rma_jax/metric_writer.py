"""TensorBoard event files and metric log lines, without TensorFlow.

``clu.metric_writers`` writes TensorBoard files through ``tf.summary`` and imports TensorFlow
on import; TensorFlow is otherwise needed only for TFDS data (the ``[tfds]`` extra). This
writer frames ``Event`` protos (``tensorboard.compat.proto``) as TFRecords with the
``tensorboard`` package's own ``RecordWriter``, the way ``torch.utils.tensorboard`` does, and
writes them through ``etils.epath``, so the workdir may be a bucket. (``tensorboard``'s
``EventFileWriter`` is not used: it opens files with ``tf.io.gfile`` and so imports
TensorFlow whenever it is installed. tensorboardX was measured and not taken: it imports
PyTorch where installed, and its gs:// writer re-uploads the whole file at each flush;
docs/performance.md.)

    WORKDIR/events.out.tfevents.<time>.<host>.<pid>.<n>

Scalars are ``simple_value`` summaries (TensorBoard's scalar dashboard); hyperparameters a
markdown table under the text dashboard's ``hparams`` tag. On a local disk ``flush`` makes
the events readable at once; object stores (``gs://``) publish a file only when it is closed,
so there every ``flush`` closes the file and the next events go to a new one (TensorBoard
reads a folder's event files in name order, as one stream).

Every scalar is also logged (``[step] name = value``) at ``--verbosity=1``, as clu's
``LoggingWriter`` did; processes other than 0 only log (``create_writer``).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, types_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from rma_jax import paths

HPARAMS_TAG = "hparams"


class LoggingWriter:
  """Logs every scalar (``[step] name = value``) at ``--verbosity=1``; writes no files."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.vlog(1, "[%d] %s", step,
                 ", ".join(f"{k} = {float(v):.6g}" for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.vlog(1, "Hyperparameters: %s", dict(hparams))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class SummaryWriter(LoggingWriter):
  """Writes scalars and hyperparameters to TensorBoard event files in ``logdir`` (and logs
  them like ``LoggingWriter``).

  Args:
    logdir: the folder (local or a URL ``etils.epath`` opens, e.g. ``gs://...``).
    roll_on_flush: close the file at each ``flush`` and continue in a new one; default: on
      remote paths (module docstring).
  """

  def __init__(self, logdir: str | os.PathLike, *, roll_on_flush: bool | None = None):
    self._logdir = epath.Path(logdir)
    self._logdir.mkdir(parents=True, exist_ok=True)
    self._roll = paths.is_remote(logdir) if roll_on_flush is None else roll_on_flush
    self._count = 0
    self._file = None
    self._records: RecordWriter | None = None
    self._open()

  @property
  def path(self) -> epath.Path | None:
    """The event file written now (None between a rolled ``flush`` and the next event)."""
    return self._path if self._file is not None else None

  def _open(self) -> None:
    # %010d of the time keeps the names in write order (TensorBoard reads them sorted).
    self._path = self._logdir / (f"events.out.tfevents.{int(time.time()):010d}."
                                 f"{socket.gethostname()}.{os.getpid()}.{self._count}")
    self._count += 1
    self._file = self._path.open("wb")
    self._records = RecordWriter(self._file)
    self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _add(self, event: event_pb2.Event) -> None:
    if self._file is None:
      self._open()
    self._records.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    super().write_scalars(step, scalars)
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=values)))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    super().write_hparams(hparams)
    rows = "\n".join(f"| {k} | {v!r} |" for k, v in sorted(hparams.items()))
    text = f"| field | value |\n|---|---|\n{rows}"
    self.write_text(0, HPARAMS_TAG, text)

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A (markdown) text summary: TensorBoard's text dashboard."""
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
    tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                    string_val=[text.encode("utf-8")])
    value = summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
    self._add(event_pb2.Event(wall_time=time.time(), step=int(step),
                              summary=summary_pb2.Summary(value=[value])))

  def flush(self) -> None:
    if self._file is None:
      return
    if self._roll:
      self.close()
    else:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file, self._records = None, None


def create_writer(logdir: str | os.PathLike, *, just_logging: bool = False) -> LoggingWriter:
  """The run's writer: event files in ``logdir``, or only log lines (``just_logging``, for
  processes other than 0 of a multi-host run)."""
  return LoggingWriter() if just_logging else SummaryWriter(logdir)
