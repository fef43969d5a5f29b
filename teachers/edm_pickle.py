"""Read EDM `.pkl` network files as data, without running any of their code.

EDM (and SiD, GDD, ... which reuse its training code) save networks with NVIDIA's `torch_utils.persistence`:
each object of a persistent class pickles as the call `torch_utils.persistence._reconstruct_persistent_obj(meta)`,
meta = {type: 'class', version, module_src, class_name, state}, where `module_src` is the source of the class's
whole Python module and `state` the object's `__dict__` (parameters, buffers, sub-modules, and the constructor
arguments `_init_args` / `_init_kwargs`). EDM's own loader executes `module_src`, so `pickle.load` on such a
file runs whatever code the file carries.

`read_edm_pickle` unpickles with `SafeEdmUnpickler` instead, which resolves a fixed list of globals only:
- the persistence hook becomes `PickledObject(class_name, state)`: data; `module_src` is dropped unread;
- copyreg's object reconstructor and torch's container modules (ModuleDict, ModuleList, Sequential) also become
  `PickledObject`s, so no class of the file, torch's included, is ever instantiated;
- a tensor storage is read by `torch.load(weights_only=True)` (torch's own `_load_from_bytes` would call
  `torch.load` with weights_only=False), tensors and parameters are rebuilt from it once their arguments have the
  expected types;
- numpy scalars of numeric dtypes, `collections.OrderedDict`, set/frozenset, latin-1 bytes (protocol 2), and
  `dnnlib.util.EasyDict` (read as a plain dict).
Any other global (`posix.system`, `builtins.eval`, a class of the pickle's own code...) stops the load with a
`CheckpointError` naming it, before it could be called.
"""

from __future__ import annotations

import collections
import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimflow.checkpoint import CheckpointError

PERSISTENCE_HOOK = "torch_utils.persistence._reconstruct_persistent_obj"
DETECT_BYTES = 64 << 20  # how far into a raw pickle `is_edm_pickle` looks for the persistence hook
CONTAINER_MODULES = (  # torch modules a persistent network holds without pickling their source
    "torch.nn.modules.container.ModuleDict",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.Sequential",
)


class PickledObject:
    """An object of the pickle kept as data: its class name and its `__dict__` (`state`); no class code runs.

    `meta` holds the persistence record's other fields (type, version) and the length of the module source that
    was skipped, for reports.
    """

    class_name = "?"

    def __new__(cls, *args: Any) -> PickledObject:
        if args:  # NEWOBJ with arguments: not how torch modules pickle
            raise CheckpointError(f"{cls.class_name} is pickled with constructor arguments {args!r}; refused")
        obj = super().__new__(cls)
        obj.state, obj.meta = {}, {}
        return obj

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"the pickled state of a {self.class_name} is a {type(state).__name__}, not a dict")
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"PickledObject({self.class_name})"


def persistent_object(class_name: str, state: dict, meta: dict | None = None) -> PickledObject:
    obj = PickledObject.__new__(PickledObject)
    obj.class_name, obj.state, obj.meta = class_name, state, meta or {}
    return obj


def _record_persistent(meta: Any) -> PickledObject:
    """Stands in for `_reconstruct_persistent_obj`: keeps class name and state, never looks at module_src."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise CheckpointError(f"a persistent object's record is not an EDM meta dict with a class_name: {meta!r:.200}")
    if meta.get("type") != "class":
        raise CheckpointError(f"persistent object {meta['class_name']!r} has type {meta.get('type')!r}, not 'class'")
    state = meta.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"persistent object {meta['class_name']!r} carries no state dict")
    source = meta.get("module_src")
    info = {"version": meta.get("version"), "module_src_chars": len(source) if isinstance(source, str) else None}
    return persistent_object(meta["class_name"], dict(state), info)


_CONTAINER_CLASSES: dict[str, type] = {}


def _container_class(name: str) -> type:
    """A PickledObject subclass standing for the torch container `name` (NEWOBJ needs a class object)."""
    if name not in _CONTAINER_CLASSES:
        _CONTAINER_CLASSES[name] = type(name.rpartition(".")[2], (PickledObject,), {"class_name": name})
    return _CONTAINER_CLASSES[name]


def _reconstruct_object(cls: Any, base: Any, state: Any) -> Any:
    """Stands in for `copyreg._reconstructor`, which protocol-0 reduction (object.__reduce__) emits."""
    if isinstance(cls, type) and issubclass(cls, PickledObject) and base is object and state is None:
        return cls.__new__(cls)
    if cls is dict and base is dict:  # a dict subclass such as EasyDict, read as a dict
        return dict(state or {})
    raise CheckpointError(f"copyreg._reconstructor({cls!r}, {base!r}, ...) is not an allowed reconstruction")


def _storage_from_bytes(data: Any) -> torch.storage.TypedStorage:
    """A tensor storage pickled by torch (`torch.storage._load_from_bytes`), read with weights only."""
    if not isinstance(data, bytes):
        raise CheckpointError(f"a tensor storage is pickled as {type(data).__name__}, not bytes")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError... for a storage that is not weights
        raise CheckpointError(
            f"a tensor storage could not be read with weights only ({type(err).__name__}: {str(err)[:200]})"
        ) from None
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise CheckpointError(f"a tensor storage holds a {type(storage).__name__}, not a storage")
    return storage


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple | list | torch.Size) and all(isinstance(v, int) for v in value)


def _no_hooks(hooks: Any, what: str) -> None:
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise CheckpointError(f"a {what} carries backward hooks ({hooks!r:.100}); hooks are code, refused")


def _rebuild_tensor(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """Stands in for `torch._utils._rebuild_tensor_v2`: a view of `storage` after checking every argument."""
    if not isinstance(storage, torch.storage.TypedStorage | torch.UntypedStorage):
        raise CheckpointError(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if not (isinstance(offset, int) and _int_tuple(size) and _int_tuple(stride) and len(size) == len(stride)):
        raise CheckpointError(f"a tensor has a malformed layout: offset {offset!r}, size {size!r}, stride {stride!r}")
    _no_hooks(hooks, "tensor")
    if metadata:
        raise CheckpointError(f"a tensor carries metadata {metadata!r:.100}, which this reader does not apply")
    if isinstance(storage, torch.storage.TypedStorage):
        with warnings.catch_warnings():  # torch.load returns the legacy TypedStorage the pickle holds
            warnings.simplefilter("ignore", UserWarning)
            dtype, storage = storage.dtype, storage.untyped()
    else:
        dtype = torch.uint8
    return torch.empty(0, dtype=dtype).set_(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> torch.nn.Parameter:
    """Stands in for `torch._utils._rebuild_parameter` (frozen: the network is loaded for inference)."""
    if not torch.is_tensor(data):
        raise CheckpointError(f"a parameter is rebuilt from a {type(data).__name__}, not a tensor")
    _no_hooks(hooks, "parameter")
    return torch.nn.Parameter(data, requires_grad=False)


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, str):
        raise CheckpointError(f"a numpy dtype is pickled from a {type(spec).__name__}, not a type string")
    return np.dtype(spec)


def _numpy_scalar(dtype: Any, data: Any) -> Any:
    """A numpy scalar (EDM keeps e.g. skip_scale = np.sqrt(0.5)); numeric dtypes only (object dtype is refused)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, bytes):
        raise CheckpointError(f"only numeric numpy scalars are read; got dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Protocol-2 pickles write bytes as `_codecs.encode(text, 'latin1')`."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not latin-1 bytes; refused")
    return text.encode("latin1")


SAFE_GLOBALS: dict[str, Any] = {
    PERSISTENCE_HOOK: _record_persistent,
    "copyreg._reconstructor": _reconstruct_object,
    "builtins.object": object,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "collections.OrderedDict": collections.OrderedDict,
    "_codecs.encode": _latin1_bytes,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch.storage._load_from_bytes": _storage_from_bytes,
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "dnnlib.util.EasyDict": dict,
}
# protocol-2 pickles name builtins and copyreg as Python 2 did (pickle's own find_class translates them)
SAFE_GLOBALS.update(
    {"__builtin__" + k.removeprefix("builtins"): v for k, v in SAFE_GLOBALS.items() if k.startswith("builtins.")}
)
SAFE_GLOBALS["copy_reg._reconstructor"] = _reconstruct_object


class SafeEdmUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `SAFE_GLOBALS` and torch's containers (see the module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified in SAFE_GLOBALS:
            return SAFE_GLOBALS[qualified]
        if qualified in CONTAINER_MODULES:
            return _container_class(qualified)
        raise CheckpointError(
            f"the pickle refers to the global {qualified}, which the EDM reader does not allow (it could run code); "
            "only EDM's persistence records, tensors, numpy scalars and plain containers are read"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"the pickle uses persistent ids ({pid!r:.80}): it is a torch.save file, not an EDM .pkl")


def is_edm_pickle(path: str | Path) -> bool:
    """Whether `path` is a raw pickle that calls EDM's persistence hook (checked on its bytes, nothing unpickled)."""
    with open(path, "rb") as handle:
        head = handle.read(DETECT_BYTES)
    module, _, function = PERSISTENCE_HOOK.rpartition(".")
    return head[:1] == b"\x80" and module.encode() in head and function.encode() in head


def read_edm_pickle(path: str | Path) -> Any:
    """The object an EDM `.pkl` holds, with persistent objects as `PickledObject`s; never runs the file's code."""
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            return SafeEdmUnpickler(handle).load()
        except CheckpointError as err:
            raise CheckpointError(f"{str(path)!r}: {err}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
            raise CheckpointError(
                f"{str(path)!r} is not a readable EDM pickle ({type(err).__name__}: {str(err)[:200]})"
            ) from None


# --------------------------------------------------------------------------------------- the module tree
def module_fields(obj: PickledObject) -> tuple[dict, dict, dict]:
    """(parameters, buffers, sub-modules) of a pickled torch module, None entries removed."""
    fields = []
    for key in ("_parameters", "_buffers", "_modules"):
        value = obj.state.get(key)
        if not isinstance(value, dict):
            raise CheckpointError(f"the pickled {obj.class_name} is not a torch module: its state has no {key} dict")
        fields.append({k: v for k, v in value.items() if v is not None})
    return fields[0], fields[1], fields[2]


def submodules(obj: PickledObject, name: str = "") -> dict[str, PickledObject]:
    """Every module of the tree by its dotted name ('' is `obj`), in definition order."""
    found = {name: obj}
    for key, child in module_fields(obj)[2].items():
        full = f"{name}.{key}" if name else key
        if not isinstance(child, PickledObject):
            raise CheckpointError(f"sub-module {full!r} is a {type(child).__name__}, not a module record")
        found.update(submodules(child, full))
    return found


def module_tensors(obj: PickledObject) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the tree under their state-dict names (as `nn.Module.state_dict` would name them)."""
    tensors = {}
    for name, module in submodules(obj).items():
        parameters, buffers, _ = module_fields(module)
        for key, value in {**parameters, **buffers}.items():
            if not torch.is_tensor(value):
                raise CheckpointError(f"{name}.{key} is a {type(value).__name__}, not a tensor")
            tensors[f"{name}.{key}" if name else key] = value
    return tensors


def parameter_count(obj: PickledObject) -> int:
    return sum(v.numel() for module in submodules(obj).values() for v in module_fields(module)[0].values())
