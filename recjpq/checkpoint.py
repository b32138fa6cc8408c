"""Checkpoints: model weights, item codes, model config, item id map and free-form metadata.

A checkpoint is a ``torch.save`` dict tagged with a format name and version, written to a
temporary file and renamed into place, so a crash never leaves half a file under the final
name. Loading uses ``weights_only=True`` (no arbitrary pickled code).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile

import torch

from recjpq.models import SequentialRecommender, build_model

FORMAT = "recjpq-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable recjpq checkpoint of a supported version."""


def save_checkpoint(path: str | os.PathLike, model: SequentialRecommender, meta: dict | None = None) -> None:
    """Write ``model`` (and ``meta``: plain Python values and tensors) to ``path`` atomically."""
    codes = getattr(model.item_embedding, "codes", None)
    payload = {"format": FORMAT, "version": VERSION, "config": dict(model.config),
               "codes": None if codes is None else codes.cpu(),
               "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": meta or {}}
    write_atomic(path, payload)


def write_atomic(path: str | os.PathLike, payload: dict) -> None:
    """``torch.save(payload)`` to a temporary file in ``path``'s directory, renamed into place."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_payload(path: str, map_location="cpu"):
    """What ``torch.load(weights_only=True)`` reads from ``path``; ``FileNotFoundError`` /
    ``CheckpointError`` for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable recjpq checkpoint (truncated or corrupt?): {e}") from None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> tuple[SequentialRecommender, dict]:
    """``(model in eval mode, meta)`` from a file written by ``save_checkpoint``.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` for a truncated,
    corrupt or foreign file or an unsupported format version.
    """
    path = os.fspath(path)
    payload = read_payload(path, map_location)
    if isinstance(payload, dict) and payload.get("format") == "recjpq-patched-model":
        from recjpq.patch import from_payload  # a converted model (recjpq.patch.save), OPQ rotation included

        return from_payload(payload, path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a recjpq checkpoint (no '{FORMAT}' tag)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {payload.get('version')!r}; "
                              f"this recjpq reads version {VERSION}")
    config = dict(payload["config"])
    model = build_model(config.pop("model"), config.pop("num_items"), codes=payload["codes"], **config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the saved config: {e}") from None
    return model.eval(), payload["meta"]
