"""TensorBoard event files without TensorFlow: CRC, framing, and the Event
proto decoded by protobuf itself (a message built from a descriptor here)."""

import glob
import os

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from structvpr_jax import events, files

F = descriptor_pb2.FieldDescriptorProto


def event_class():
  fdp = descriptor_pb2.FileDescriptorProto(name="test_event.proto", package="t", syntax="proto3")
  value = fdp.message_type.add(name="Value")
  value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
  summary = fdp.message_type.add(name="Summary")
  summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, type_name=".t.Value",
                    label=F.LABEL_REPEATED)
  event = fdp.message_type.add(name="Event")
  event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
  event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
  event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
  event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, type_name=".t.Summary",
                  label=F.LABEL_OPTIONAL)
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.Event"))


def test_crc32c_known_vectors():
  assert events.crc32c(b"123456789") == 0xE3069283
  assert events.crc32c(b"") == 0
  assert events.crc32c(bytes(32)) == 0x8A9136AA        # RFC 3720 B.4: 32 zero bytes


def test_metrics_writer_writes_scalars_tensorboard_can_read(tmp_path):
  Event = event_class()
  metrics = files.MetricsWriter(str(tmp_path / "metrics.jsonl"), tensorboard=True)
  metrics.write({"stage": "rgb", "step": 10, "loss": 0.25, "lr": 1e-4, "event": "train"})
  metrics.write({"stage": "rgb", "step": 20, "val_R@5": 87.5, "event": "val"})
  metrics.write({"stage": "distill", "note": "no step: not a scalar"})
  # a second writer of the same workdir (the next stage) appends to the same file
  files.MetricsWriter(str(tmp_path / "metrics.jsonl"), tensorboard=True).write(
      {"stage": "seg", "step": 5, "loss": 0.5})
  (path,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
  records = [Event.FromString(r) for r in events.read_records(path)]
  assert records[0].file_version == "brain.Event:2"
  scalars = {(e.step, v.tag): v.simple_value for e in records[1:] for v in e.summary.value}
  assert scalars == {(10, "rgb/loss"): pytest.approx(0.25), (10, "rgb/lr"): pytest.approx(1e-4),
                     (20, "rgb/val_R@5"): pytest.approx(87.5), (5, "seg/loss"): pytest.approx(0.5)}
  assert all(e.wall_time > 1.6e9 for e in records)
  # a flipped byte is caught by the CRC
  blob = bytearray(open(path, "rb").read())
  blob[-6] ^= 1
  open(path, "wb").write(bytes(blob))
  with pytest.raises(ValueError, match="corrupt record"):
    events.read_records(path)
  # disabled writers (processes other than 0) write nothing
  quiet = files.MetricsWriter(str(tmp_path / "q" / "metrics.jsonl"), enabled=False,
                              tensorboard=True)
  quiet.write({"stage": "rgb", "step": 1, "loss": 1.0})
  assert not os.path.exists(tmp_path / "q")
