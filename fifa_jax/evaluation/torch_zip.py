"""Read `torch.save` zip checkpoints without torch (and without running their pickle's code).

A torch zip (the format since torch 1.6) holds `<prefix>/data.pkl`, a pickle whose tensors are
`persistent_id` references ("storage", storage type, key, location, numel), and
`<prefix>/data/<key>`, each storage's raw bytes. `load(path)` unpickles data.pkl with an
allow-list of globals (collections.OrderedDict, torch's tensor/parameter rebuild functions, the
storage type names); any other global - whatever code a plain `pickle.load` would import and
call - raises UnsafePickleError naming it. Storage locations ("cuda:0", ...) are ignored.

Tensors come back as `TensorRef`s (shape and dtype known, bytes read - memory-mapped for the
usual uncompressed members - only on `.numpy()`), so a lazy `TorchTensors` mapping over a state
dict works with `torch_names.fill_params` like `LazySafetensors` does.

    load(path) -> the unpickled object (dicts / lists / tuples / scalars / TensorRef)
    read_state_dict(path, key=None) -> TorchTensors {name: array}; key e.g. "state_dict"
    read_tensors(path, key=None) -> a lazy mapping from a torch zip or a .safetensors file
"""
from __future__ import annotations

import collections
import os
import pickle
import struct
import zipfile
from typing import Iterator, Mapping, Optional

import numpy as np

from fifa_jax.errors import InputError

# torch storage type name -> numpy dtype of its elements (bfloat16 read as raw uint16)
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(InputError):
    """A checkpoint's pickle asks for something outside the allow-list."""


class _StorageType:
    __slots__ = ("name", "dtype")

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """One storage: a zip member of `numel` elements of `dtype`."""
    __slots__ = ("archive", "member", "dtype", "numel", "bf16")

    def __init__(self, archive, member, stype: _StorageType, numel: int):
        self.archive, self.member, self.numel = archive, member, int(numel)
        self.dtype, self.bf16 = stype.dtype, stype.name == "BFloat16Storage"


class TensorRef:
    """A tensor in a torch zip: `shape`, `dtype` (float32 for bfloat16), `numpy()`."""
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape, stride):
        self.storage, self.offset = storage, int(offset)
        self.shape, self.stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)
        if len(self.shape) != len(self.stride) or any(s < 0 for s in self.shape + self.stride):
            raise UnsafePickleError(f"{storage.archive.path}: bad tensor size/stride "
                                    f"{self.shape}/{self.stride}")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        if self.offset < 0 or (0 not in self.shape and last >= storage.numel):
            raise UnsafePickleError(f"{storage.archive.path}: tensor of size {self.shape} at "
                                    f"offset {self.offset} overruns its storage "
                                    f"({storage.numel} elements)")

    def __setstate__(self, state):  # a pickle BUILD on a tensor: not something torch writes
        raise UnsafePickleError("pickle tries to set state on a tensor")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.storage.bf16 else self.storage.dtype

    def numpy(self) -> np.ndarray:
        st = self.storage
        flat = st.archive.storage_array(st.member, st.dtype, st.numel)
        if 0 in self.shape:
            out = np.zeros(self.shape, st.dtype)
        else:
            item = st.dtype.itemsize
            out = np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape,
                                                  [s * item for s in self.stride])
            out = np.array(out)   # own the bytes (the view may point into a memory map)
        if st.bf16:
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuild got a {type(storage).__name__}, not a storage")
    return TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not isinstance(data, TensorRef):
        raise UnsafePickleError(f"parameter rebuild got a {type(data).__name__}")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Archive:
    """The open zip: member lookup and storage bytes (memory-mapped when stored)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise InputError(f"{path}: not a torch zip checkpoint (a legacy pre-1.6 torch.save "
                             f"file or not a checkpoint at all); re-save it with a recent torch "
                             f"or convert it to .safetensors") from e
        pkls = [n for n in self.zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise InputError(f"{path}: expected one data.pkl in the torch zip, found {pkls}")
        self.prefix = pkls[0][:-len("data.pkl")]
        order = self._read_opt("byteorder")
        self.big_endian = order is not None and order.strip() == b"big"

    def _read_opt(self, name: str) -> Optional[bytes]:
        try:
            return self.zip.read(self.prefix + name)
        except KeyError:
            return None

    def storage_array(self, member: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{self.prefix}data/{member}"
        try:
            info = self.zip.getinfo(name)
        except KeyError as e:
            raise InputError(f"{self.path}: storage {name} is missing") from e
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes:
            raise InputError(f"{self.path}: storage {name} has {info.file_size} bytes, "
                             f"needs {nbytes}")
        dt = dtype.newbyteorder(">") if self.big_endian and dtype.itemsize > 1 else dtype
        if info.compress_type == zipfile.ZIP_STORED and nbytes:
            with open(self.path, "rb") as f:   # local header: fixed 30 bytes + name + extra
                f.seek(info.header_offset)
                head = f.read(30)
            if head[:4] != b"PK\x03\x04":
                raise InputError(f"{self.path}: bad zip local header for {name}")
            n_name, n_extra = struct.unpack("<HH", head[26:30])
            start = info.header_offset + 30 + n_name + n_extra
            raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(nbytes,))
            arr = np.frombuffer(raw, dtype=dt, count=numel)
        else:
            arr = np.frombuffer(self.zip.read(name)[:nbytes], dtype=dt, count=numel)
        return arr.astype(dtype) if dt != dtype else arr


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: _Archive):
        super().__init__(file)
        self.archive = archive
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise UnsafePickleError(f"{self.archive.path}: the pickle needs global {module}.{name}, "
                                f"which this torch-free reader does not allow (only state dicts "
                                f"of tensors are read); convert the file to .safetensors")

    def persistent_load(self, pid):
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise UnsafePickleError(f"{self.archive.path}: unexpected persistent id {pid!r:.80}")
        _, stype, key, _location, numel = pid
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(self.archive, key, stype, numel)
        return self.storages[key]


def load(path: str):
    """The object a `torch.save` zip holds, tensors as TensorRef (see module docstring)."""
    archive = _Archive(path)
    import io
    data = archive.zip.read(archive.prefix + "data.pkl")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), archive).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError) as e:
        raise InputError(f"{path}: cannot read data.pkl ({type(e).__name__}: {e})") from e


class TorchTensors(Mapping):
    """A flat {name: tensor} state dict of TensorRefs as a lazy mapping (`shapes()`, arrays on
    item access, float32 for bfloat16)."""

    def __init__(self, refs: Mapping[str, TensorRef], path: str):
        self.refs, self.path = dict(refs), path

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: r.shape for k, r in self.refs.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self.refs[key].numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


def read_state_dict(path: str, key: Optional[str] = None) -> TorchTensors:
    """The state dict in a torch zip: the top-level dict, or `obj[key]` (e.g. "state_dict").

    Every value must be a tensor; anything else raises InputError naming its key.
    """
    obj = load(path)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            have = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise InputError(f"{path}: expected a dict with a {key!r} entry, got {have}")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, TensorRef)]
    if bad:
        raise InputError(f"{path}: state dict entries that are not tensors: {bad[:10]}")
    return TorchTensors(obj, path)


def read_tensors(path: str, key: Optional[str] = None) -> Mapping[str, np.ndarray]:
    """A lazy {name: array} mapping from a `.safetensors` file or a torch zip (`key` selects a
    nested state dict in the torch file; a safetensors file is flat and ignores it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from fifa_jax.models.safetensors_io import LazySafetensors
        return LazySafetensors(path)
    return read_state_dict(path, key)
