"""The worker process that runs kernels in Triton's interpreter.

:mod:`jlowbit.triton_kernels.launch` starts it as ``python -c MAIN`` with
``TRITON_INTERPRET=1`` in its environment (Triton reads it when a kernel
module is imported). Requests arrive on the worker's stdin; replies leave on
a duplicate of its original stdout, while file descriptor 1 and
``sys.stdout`` point at stderr, so that nothing a kernel or a library prints
can corrupt them. Each message is a pickle preceded by its length
(:func:`write_message`, :func:`read_message`). A request is the tuple of
:func:`run`'s arguments; the reply is ``(True, outputs)``, or
``(False, describe_error(exception))`` where the request raised.

At import time this module needs only numpy and the standard library
(``launch`` imports it in every process); the kernel modules, and Triton with
them, are imported by the first request.
"""

from __future__ import annotations

import importlib
import pickle
import struct
import traceback
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

# Moves the replies off stdout before anything (jlowbit's imports included)
# can print; requests stay on stdin.
MAIN = ("import os, sys; replies = os.fdopen(os.dup(1), 'wb'); os.dup2(2, 1); "
        "sys.stdout = sys.stderr; "
        "from jlowbit.triton_kernels.interpreter_worker import serve; "
        "serve(sys.stdin.buffer, replies)")

_POISON_BYTE = 0xA5
_LENGTH = struct.Struct("<Q")


class _HostStorage:
  """Storage view Triton's interpreter copies to and from."""

  def __init__(self, array: np.ndarray):
    self.array = array

  def data_ptr(self) -> int:
    return self.array.ctypes.data

  def cpu(self) -> "_HostStorage":
    return self

  def copy_(self, other: "_HostStorage") -> None:
    if other.array is not self.array:
      self.array[...] = other.array


class HostTensor:
  """The few torch.Tensor methods Triton's interpreter uses, over numpy."""

  def __init__(self, array: np.ndarray):
    self.array = np.ascontiguousarray(array)
    self.dtype = "torch." + str(self.array.dtype)

  def data_ptr(self) -> int:
    return self.array.ctypes.data

  def untyped_storage(self) -> _HostStorage:
    return _HostStorage(self.array)

  def new_empty(self, *unused_args, **unused_kwargs) -> "HostTensor":
    return HostTensor(self.array)

  def set_(self, storage: _HostStorage, *unused_args) -> "HostTensor":
    self.array = storage.array
    return self

  def storage_offset(self) -> int:
    return 0

  def size(self) -> tuple[int, ...]:
    return self.array.shape

  def stride(self) -> tuple[int, ...]:
    return tuple(s // self.array.itemsize for s in self.array.strides)

  def copy_(self, other: "HostTensor") -> None:
    self.array[...] = other.array


def find_kernel(module_name: str, kernel_name: str, kernel_args: tuple | None):
  """``module.kernel_name``, or the kernel its factory makes of ``kernel_args``."""
  found = getattr(importlib.import_module(module_name), kernel_name)
  return found if kernel_args is None else found(*kernel_args)


def _poisoned(shape: Sequence[int], dtype) -> np.ndarray:
  out = np.empty(shape, dtype)
  out.reshape(-1).view(np.uint8)[...] = _POISON_BYTE
  return out


def run(module_name, kernel_name, kernel_args, args, arrays, out_shapes, grid,
        input_output_aliases, constexprs) -> tuple[np.ndarray, ...]:
  """The interpreted kernel over numpy buffers; returns the outputs.

  ``args`` holds the scalar arguments with ``None`` in place of each array,
  ``arrays`` the arrays in order; ``out_shapes`` is ``(shape, dtype)`` per
  output. Outputs not in ``input_output_aliases`` start poisoned.
  """
  kernel = find_kernel(module_name, kernel_name, kernel_args)
  outs = [_poisoned(shape, dtype) for shape, dtype in out_shapes]
  for array_index, out_index in input_output_aliases.items():
    outs[out_index][...] = arrays[array_index]
  arrays = iter(arrays)
  call_args = [HostTensor(next(arrays)) if a is None else a for a in args]
  # inf and NaN are ordinary values to a kernel (a GPU raises nothing):
  # numpy's floating-point warnings would only be noise.
  with np.errstate(all="ignore"):
    kernel[grid](*call_args, *[HostTensor(o) for o in outs], **constexprs)
  return tuple(outs)


def write_message(stream: BinaryIO, message: bytes) -> None:
  stream.write(_LENGTH.pack(len(message)))
  stream.write(message)
  stream.flush()


def read_message(stream: BinaryIO) -> bytes:
  """The next message; raises ``EOFError`` where the stream ends first."""
  header = stream.read(_LENGTH.size)
  if len(header) == _LENGTH.size:
    (length,) = _LENGTH.unpack(header)
    message = stream.read(length)
    if len(message) == length:
      return message
  raise EOFError("the stream ended")


def describe_error(error: Exception) -> tuple[bytes | None, str, str]:
  """``(the pickled error, or None where it does not pickle; its last line;
  its traceback)``."""
  try:
    pickled = pickle.dumps(error, pickle.HIGHEST_PROTOCOL)
  except Exception:  # pylint: disable=broad-except
    pickled = None
  return (pickled, traceback.format_exception_only(error)[-1].strip(),
          "".join(traceback.format_exception(error)))


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
  """Answers requests until ``requests`` closes."""
  while True:
    try:
      request = read_message(requests)
    except EOFError:
      return
    try:
      reply = (True, run(*pickle.loads(request)))
    except Exception as error:  # pylint: disable=broad-except
      reply = (False, describe_error(error))
    write_message(replies, pickle.dumps(reply, pickle.HIGHEST_PROTOCOL))
