"""TensorBoard scalars without TensorFlow: a minimal event-file writer.

An event file (`events.out.tfevents.<time>.<host>.<pid>`) is a sequence of
TFRecords: uint64 length, uint32 masked CRC-32C of the length, the bytes, and
their masked CRC-32C. Each record is a serialised `tensorflow.Event` protocol
buffer, hand-encoded here (the fields used: wall_time = 1 double, step = 2
int64, file_version = 3 string, summary = 5 { value = 1 { tag = 1 string,
simple_value = 2 float } }). The first record carries
file_version "brain.Event:2", as TensorBoard's own writers do.

  writer = EventWriter(logdir)                  # creates the file
  writer.scalars(step, {"rgb/loss": 0.12})      # appends and flushes
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE = []
for _n in range(256):
  _c = _n
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord uses: crc32c(b"123456789") = 0xE3069283."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, file_version: str = "",
                 scalars: dict | None = None) -> bytes:
  """A serialised `Event` proto with optional file_version or scalar values."""
  out = _field(1, 1) + struct.pack("<d", float(wall_time))
  out += _field(2, 0) + _varint(int(step))
  if file_version:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, str(tag).encode())
                     + _field(2, 5) + struct.pack("<f", float(value)))
        for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


def frame_record(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, its masked CRC."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc(length)) + data
          + struct.pack("<I", masked_crc(data)))


class EventWriter:
  """Appends scalar events to one new event file in `logdir` (TensorBoard
  merges the files of a directory, so each process start adds its own)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    self.path = os.path.join(
        logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}")
    with open(self.path, "ab") as f:
      f.write(frame_record(encode_event(now, 0, file_version="brain.Event:2")))

  def scalars(self, step: int, values: dict) -> None:
    """Appends one event with `values` {tag: float} at `step`."""
    if not self.enabled or not values:
      return
    if not os.path.exists(self.path):       # removed meanwhile: start it again
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      with open(self.path, "ab") as f:
        f.write(frame_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
    with open(self.path, "ab") as f:
      f.write(frame_record(encode_event(time.time(), step, scalars=values)))


def read_records(path: str) -> list:
  """The data of every record of a TFRecord file, CRCs checked (for tests and
  tools; raises ValueError on a corrupt record)."""
  out = []
  with open(path, "rb") as f:
    blob = f.read()
  pos = 0
  while pos < len(blob):
    (length,) = struct.unpack_from("<Q", blob, pos)
    (length_crc,) = struct.unpack_from("<I", blob, pos + 8)
    if length_crc != masked_crc(blob[pos:pos + 8]):
      raise ValueError(f"{path}: corrupt record length at byte {pos}")
    data = blob[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack_from("<I", blob, pos + 12 + length)
    if data_crc != masked_crc(data):
      raise ValueError(f"{path}: corrupt record data at byte {pos}")
    out.append(data)
    pos += 16 + length
  return out
