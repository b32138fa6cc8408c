"""Checkpoints: model weights, item codes, model config, item id map and free-form metadata.

A checkpoint is a ``torch.save`` dict tagged with a format name and version, holding a sha256 of
its content (config, codes, weights in state-dict order, meta). It is written to a temporary file
and renamed into place, so a crash never leaves half a file under the final name; temporaries
orphaned by a killed save are removed by the next save to the same directory.

Loading uses ``weights_only=True`` (no pickled code runs) and checks everything before the model
is built for real: checksum, structure and types, config types and ranges, tensor names, shapes
and dtypes against a model built on the meta device (an absurd config allocates nothing), finite
weights, ``meta["item_ids"]``. Every failure is a ``CheckpointError`` naming the file and problem.

Format versions: 2 added the checksum. Version 1 files (no checksum) still load, with a
``CheckpointWarning``; saving them again upgrades them.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
import socket
import tempfile
import time
import warnings

import torch

from recjpq.models import MODELS, SequentialRecommender, build_model

FORMAT = "recjpq-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
PAYLOAD_KEYS = ("config", "codes", "state_dict", "meta")  # what the checksum covers, in this order
#: a temporary untouched for this long is an orphan even if its writer's PID is alive (PID reuse,
#: another host on a shared filesystem); a live save keeps writing, so its mtime stays fresh
STALE_TEMP_SECONDS = 3600
_HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())
_TEMP = re.compile(r"\.tmp-(?:(?P<host>[A-Za-z0-9.-]*)\+(?P<pid>\d+)\+)?[a-z0-9_]+\.pt")
_MAX_REPORTED = 5  # tensor names quoted in an error message


class CheckpointError(ValueError):
    """A file that is not a readable recjpq checkpoint of a supported version."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads, but whose integrity cannot be verified (format version 1)."""


def nonfinite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors in ``state_dict`` holding NaN or inf."""
    return [name for name, t in state_dict.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _feed(h, value) -> None:
    """Hash ``value`` (nested dicts/lists/tuples of tensors and plain values) with types and sizes,
    so no two different values feed the same bytes."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            raise TypeError(f"a checkpoint holds dense tensors with data, not a {value.layout} "
                            f"{value.device.type} {value.dtype} tensor")
        flat = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"tensor {flat.dtype} {tuple(value.shape)}\n".encode())
        h.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}\n".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)) and all(type(item) is str for item in value):  # item ids: fast
        data = [item.encode("utf-8", "surrogatepass") for item in value]
        h.update(f"{type(value).__name__} of str {' '.join(map(str, map(len, data)))}\n".encode())
        h.update(b"".join(data))
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)}\n".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(f"str {len(data)}\n".encode() + data)
    elif isinstance(value, int) and not isinstance(value, bool):
        h.update(f"int {value:x}\n".encode())  # hex: repr() refuses ints over 4,300 digits
    else:  # None, bool, float and the few other types weights_only loads (dtype, device)
        h.update(f"{type(value).__name__} {value!r}\n".encode())


def checksum(payload: dict, keys=PAYLOAD_KEYS) -> str:
    """sha256 (hex) of a checkpoint's content: its ``keys`` values, tensors as raw bytes."""
    h = hashlib.sha256()
    for key in keys:
        _feed(h, key)
        _feed(h, payload[key])
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the ``.tmp-*.pt`` files in ``directory`` left by saves that died (their writer, on
    this host, is no longer running, or they are untouched for ``STALE_TEMP_SECONDS``). Temporaries
    of live saves are kept. Returns the paths removed."""
    directory = os.fspath(directory)
    now = time.time()
    removed = []
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _TEMP.fullmatch(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except OSError:  # its save finished meanwhile
                continue
            dead_writer = (match["pid"] is not None and match["host"] == _HOST and os.name == "posix"
                           and not _pid_alive(int(match["pid"])))
            if dead_writer or age > STALE_TEMP_SECONDS:
                try:
                    os.unlink(entry.path)
                except OSError:  # another save cleaned it first, or it is not ours to delete: best effort
                    continue
                removed.append(entry.path)
    return removed


def save_checkpoint(path: str | os.PathLike, model: SequentialRecommender, meta: dict | None = None) -> None:
    """Write ``model`` (and ``meta``: plain Python values and tensors) to ``path`` atomically."""
    codes = getattr(model.item_embedding, "codes", None)
    payload = {"format": FORMAT, "version": VERSION, "config": dict(model.config),
               "codes": None if codes is None else codes.cpu(),
               "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": meta or {}}
    payload["checksum"] = checksum(payload)
    write_atomic(path, payload)


def write_atomic(path: str | os.PathLike, payload: dict) -> None:
    """``torch.save(payload)`` to a temporary file in ``path``'s directory, renamed into place."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(directory)
    # the writer's host and PID in the name let a later save tell an orphan from a live save
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{_HOST}+{os.getpid()}+", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_config(config) -> str | None:
    """What is wrong with a saved model config (types, ranges, names), or None. Sizes are
    checked later against the saved tensors."""
    if not isinstance(config, dict):
        return f"config must be a dict, got {type(config).__name__}"
    model = config.get("model")
    if not isinstance(model, str) or model not in MODELS:
        return f"config['model'] must be one of {tuple(MODELS)}, got {model!r}"
    params = {name: p for name, p in inspect.signature(MODELS[model]).parameters.items() if name != "codes"}
    unknown = sorted(map(str, set(config) - set(params) - {"model"}))
    missing = sorted(name for name, p in params.items() if p.default is p.empty and name not in config)
    if unknown or missing:
        return f"config for {model} has unknown keys {unknown} / lacks {missing}"
    for name, value in config.items():
        default = params[name].default if name in params else None
        if name == "num_items" or isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                return f"config[{name!r}] must be a positive int, got {value!r}"
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                return f"config[{name!r}] must be a number in [0, 1), got {value!r}"
        elif isinstance(default, str) and not isinstance(value, str):
            return f"config[{name!r}] must be a string, got {value!r}"
    return None


def _check_tensors(state_dict, expected: dict) -> str | None:
    """What is wrong with the saved tensors given the ``expected`` state dict, built on the meta
    device (its real tensors, the codes, are copies of the saved codes), or None."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        return (f"weights do not match the saved config: missing {missing[:_MAX_REPORTED]}, "
                f"unexpected {unexpected[:_MAX_REPORTED]}")
    for name, want in expected.items():
        got = state_dict[name]
        same_kind = got.is_floating_point() if want.is_floating_point() else got.dtype == want.dtype
        if got.shape != want.shape or not same_kind or got.layout != torch.strided or got.is_meta:
            return (f"weights do not match the saved config: {name} is {tuple(got.shape)} {got.dtype}, "
                    f"the config builds {tuple(want.shape)} {want.dtype}")
        if not want.is_meta and not torch.equal(got, want):
            return f"{name} differs from the saved codes"
    bad = nonfinite_tensors(state_dict)
    if bad:
        return (f"non-finite (NaN or inf) weights in {', '.join(bad[:_MAX_REPORTED])}: a diverged training "
                "run? Such a model cannot rank items")
    return None


def _check_item_ids(meta, num_items: int) -> str | None:
    if not isinstance(meta, dict):
        return f"meta must be a dict, got {type(meta).__name__}"
    if "item_ids" not in meta:
        return None
    ids = meta["item_ids"]
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
        return f"meta['item_ids'] must be a list of strings (raw item ids), got {type(ids).__name__}"
    if len(ids) != num_items:
        return f"meta['item_ids'] has {len(ids)} ids, the model has {num_items} items"
    if len(set(ids)) != len(ids):
        return "meta['item_ids'] has duplicate ids: raw ids must name one item each"
    return None


def read_payload(path: str, map_location="cpu"):
    """What ``torch.load(weights_only=True)`` reads from ``path``; ``FileNotFoundError`` /
    ``CheckpointError`` for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip, pickle, EOF, OS and weights_only refusals alike: the file is unusable
        raise CheckpointError(f"{path} is not a readable recjpq checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[SequentialRecommender, dict]:
    """``(model in eval mode, meta)`` from a file written by ``save_checkpoint``.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for anything else
    wrong with it: unreadable (truncated, not a checkpoint, pickled code), an unsupported
    version, a checksum mismatch (bit flips), or content that does not make a valid model.
    """
    path = os.fspath(path)
    payload = read_payload(path, map_location)
    if isinstance(payload, dict) and payload.get("format") == "recjpq-patched-model":
        from recjpq.patch import from_payload  # a converted model (recjpq.patch.save), OPQ rotation included

        return from_payload(payload, path)

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{path}: {problem}")

    if not isinstance(payload, dict) or not isinstance(payload.get("format"), str) or payload["format"] != FORMAT:
        raise CheckpointError(f"{path} is not a recjpq checkpoint (no '{FORMAT}' tag)")
    version = payload.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise fail(f"checkpoint format version {version!r}; this recjpq reads versions {READABLE_VERSIONS}")
    missing = [key for key in PAYLOAD_KEYS if key not in payload]
    if missing:
        raise fail(f"missing {missing} (a damaged or hand-made file)")
    if version == 1:
        if "checksum" in payload:
            raise fail("version 1 files have no checksum; this one has: its version field is damaged")
        warnings.warn(f"{path} is a version 1 checkpoint without a checksum, so damage cannot be detected; "
                      "save it again to add one", CheckpointWarning, stacklevel=2)
    else:
        try:
            stored, actual = payload.get("checksum"), checksum(payload)
        except (RecursionError, TypeError) as e:
            raise fail(f"content cannot be verified: {'nested too deeply' if isinstance(e, RecursionError) else e}"
                       ) from None
        if stored != actual:
            raise fail("checksum mismatch: the file changed after it was written (bit flips, a bad copy)"
                       if isinstance(stored, str) else "no checksum: version 2 files must have one")
    config, codes, state_dict, meta = (payload[key] for key in PAYLOAD_KEYS)
    problem = check_config(config)
    if problem is not None:
        raise fail(problem)
    if codes is not None and not isinstance(codes, torch.Tensor):
        raise fail(f"codes must be a tensor or None, got {type(codes).__name__}")
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in state_dict.items()):
        raise fail("state_dict must map parameter names to tensors")
    kwargs = dict(config)
    name, num_items = kwargs.pop("model"), kwargs.pop("num_items")
    if kwargs.get("num_layers", 1) > len(state_dict):  # each layer saves tensors: bounds the modules built
        raise fail(f"config['num_layers']={kwargs['num_layers']} exceeds the {len(state_dict)} saved tensors")
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, however large the config
            expected = build_model(name, num_items, codes=codes, **kwargs).state_dict()
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        raise fail(f"the saved config and codes do not build a model: {e}") from None
    problem = _check_tensors(state_dict, expected) or _check_item_ids(meta, num_items)
    if problem is not None:
        raise fail(problem)
    model = build_model(name, num_items, codes=codes, **kwargs)
    model.load_state_dict(state_dict)
    return model.eval(), meta
