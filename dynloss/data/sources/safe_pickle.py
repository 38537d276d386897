"""A restricted unpickler for the CIFAR python batches.

The CIFAR "python version" files (https://www.cs.toronto.edu/~kriz/cifar.html) are Python 2 cPickle dicts
of numpy arrays and lists. Unpickling runs whatever callables a file names, so a file from an untrusted
mirror could run code; this unpickler resolves only the numpy array reconstruction names and harmless
builtins those files need, and refuses anything else naming the file.

    python -c "from dynloss.data.sources.safe_pickle import load; print(load('cifar-10-batches-py/test_batch').keys())"
"""

from __future__ import annotations

import importlib
import io
import pickle

# (module, name) pairs a CIFAR batch (or numpy array pickled under any protocol) needs. `numpy.core` is
# numpy 1.x's name for `numpy._core`; both spellings appear in files written by different numpy versions.
_NUMPY = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
}
# Python 3 writes bytes under protocol 2 as _codecs.encode(str, "latin1"); the rest are plain constructors.
_BUILTINS = {"bytes", "bytearray", "list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str"}
_ALLOWED = _NUMPY | {("builtins", n) for n in _BUILTINS} | {("_codecs", "encode")}
# Python 2 module names, as the default Unpickler maps them for protocol < 3.
_PY2 = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class UnsafePickleError(ValueError):
    """The pickle names a callable outside the allowed numpy/builtin set."""


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        # encoding="bytes": Python 2 str (keys like b"data", pixel buffers) stays bytes, as the CIFAR docs load it.
        super().__init__(file, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str):
        module = _PY2.get(module, module)
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"{self.where}: refusing to unpickle {module}.{name}; a CIFAR batch holds only numpy arrays, "
                "lists and bytes. Get the file from the official archive."
            )
        if module.startswith("numpy.core."):
            # numpy 2 keeps numpy.core as a deprecated alias; load the real module without the warning.
            try:
                return getattr(importlib.import_module("numpy._core." + module.split(".", 2)[2]), name)
            except ImportError:
                pass
        return getattr(importlib.import_module(module), name)


def loads(data: bytes, where: str):
    """Unpickle `data` (read from `where`, named in errors) allowing only numpy arrays and builtins."""
    try:
        return SafeUnpickler(io.BytesIO(data), where).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"{where}: not a readable CIFAR pickle batch ({type(e).__name__}: {e})") from e


def load(path: str):
    with open(path, "rb") as f:
        return loads(f.read(), path)
