"""Checkpoint arrays that stay on disk until a slice of them is asked for.

A backbone is placed one shard at a time (`build.place_params` calls `source[index]` for each
device's `index`), so a loader that hands it these instead of numpy arrays never holds a whole
copy of the model in host memory: only the shards of the leaf being placed. Each class has
`.shape`, `.dtype`, `.ndim`, `source[index]` (a tuple of slices, one per dimension, or `()` for
everything; reads only that region) and `np.asarray(source)` (the whole array). Read errors
name the parameter and the file.

* `TensorStoreArray`: a zarr array of a T5X checkpoint, opened with TensorStore.
* `SafetensorsArray`: one tensor of a `.safetensors` file (opened, memory-mapped, per read).
* `TransposedArray`: a 2-D source read as its transpose (HF `nn.Linear` weights are [out, in]).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

SAFETENSORS_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
                      "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
                      "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class LazyArray:
  """Base class: subclasses set `shape`, `dtype` and implement `_read(slices)`."""

  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def _slices(self, index: Any) -> tuple[slice, ...]:
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > self.ndim or not all(isinstance(i, slice) for i in index):
      raise TypeError(f"{self!r}: index {index!r} must be up to {self.ndim} slices")
    return index + (slice(None),) * (self.ndim - len(index))

  def __getitem__(self, index: Any) -> np.ndarray:
    return self._read(self._slices(index))

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    array = self[()]
    return array if dtype is None else array.astype(dtype)

  def _read(self, slices: tuple[slice, ...]) -> np.ndarray:
    raise NotImplementedError


class TensorStoreArray(LazyArray):
  """An opened TensorStore array; `bits_as_bfloat16` reinterprets uint16 (t5x format 2)."""

  def __init__(self, store: Any, where: str, bits_as_bfloat16: bool = False):
    self.store, self.where = store, where
    self.bits_as_bfloat16 = bits_as_bfloat16 and store.dtype.numpy_dtype == np.uint16
    self.shape = tuple(int(d) for d in store.shape)
    self.dtype = np.dtype(ml_dtypes.bfloat16 if self.bits_as_bfloat16 else store.dtype.numpy_dtype)

  def _read(self, slices):
    try:
      array = np.asarray(self.store[slices].read().result())
    except ValueError as e:  # e.g. a missing or corrupt chunk file
      raise ValueError(f"{self.where}: cannot read its TensorStore array ({e})") from e
    return array.view(ml_dtypes.bfloat16) if self.bits_as_bfloat16 else array

  def __repr__(self):
    return f"TensorStoreArray({self.where}, {self.shape}, {self.dtype})"


def read_safetensors_raw(file: Path, key: str) -> np.ndarray:
  """One whole tensor, parsing the safetensors header ourselves (for builds that cannot make
  bfloat16 numpy arrays)."""
  with open(file, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    info = json.loads(f.read(header_len))[key]
    start, end = info["data_offsets"]
    f.seek(8 + header_len + start)
    data = f.read(end - start)
  dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
  return np.frombuffer(data, dtype=dtype).reshape(info["shape"]).astype(dtype.newbyteorder("="))


class SafetensorsArray(LazyArray):
  """Tensor `key` of the safetensors `file`, with its stored dtype (BF16 as ml_dtypes.bfloat16)."""

  def __init__(self, file: Path, key: str, shape: tuple[int, ...], stored_dtype: str):
    if stored_dtype not in SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {key!r} in {file}: unsupported dtype {stored_dtype}")
    self.file, self.key, self.shape = Path(file), key, tuple(shape)
    self.stored_dtype = stored_dtype
    self.dtype = np.dtype(SAFETENSORS_DTYPES[stored_dtype])

  def _read(self, slices):
    try:
      with safe_open(str(self.file), framework="np") as handle:
        array = handle.get_slice(self.key)[slices]
    except TypeError:  # "data type 'bfloat16' not understood" (no numpy bf16 in this build)
      return read_safetensors_raw(self.file, self.key)[slices]
    except Exception as e:  # safetensors raises its own error types for bad files
      raise ValueError(f"tensor {self.key!r} in {self.file}: cannot read it ({e})") from e
    if self.stored_dtype == "BF16" and array.dtype != ml_dtypes.bfloat16:
      array = array.view(ml_dtypes.bfloat16)  # raw uint16 bits
    return array

  def __repr__(self):
    return f"SafetensorsArray({self.key!r} in {self.file.name}, {self.shape}, {self.dtype})"


class TransposedArray(LazyArray):
  """`base` (2-D) read as its transpose, each slice made C-contiguous."""

  def __init__(self, base: LazyArray):
    if base.ndim != 2:
      raise ValueError(f"{base!r}: only 2-D arrays can be transposed")
    self.base, self.shape, self.dtype = base, base.shape[::-1], base.dtype

  def _read(self, slices):
    return np.ascontiguousarray(self.base[slices[::-1]].T)

  def __repr__(self):
    return f"TransposedArray({self.base!r})"
