"""Swap a trained model's dense item table and full-catalogue scoring for PQ, in place.

``patch_item_scoring(model, num_splits)`` quantises the model's ``nn.Embedding`` item table
(``PQEmbedding.from_dense``), puts the ``PQEmbedding`` in its place (lookups keep working, same
ids, same padding row) and rebinds the scoring methods so they go through ``recjpq.ops`` instead
of ``seq_emb @ item_emb.weight.T``. Three shapes of model code are recognised:

- ``"recjpq"``: our own ``recjpq.models`` (``item_embedding``; their scorer dispatches on the
  embedding type, so swapping the table is enough);
- ``"recbole"``: RecBole-style ``item_embedding`` + ``forward(item_seq, item_seq_len)`` +
  ``full_sort_predict(interaction)`` reading ``interaction[model.ITEM_SEQ]`` and
  ``interaction[model.ITEM_SEQ_LEN]``; ``full_sort_predict`` becomes ``score_all`` and a
  ``full_sort_topk(interaction, k)`` is added;
- ``"sasrec.pytorch"``: pmixer-style ``item_emb`` + ``log2feats(log_seqs)`` +
  ``predict(user_ids, log_seqs, item_indices)``; ``predict`` scores the candidates from codes and
  a ``predict_topk(user_ids, log_seqs, k, exclude=None)`` is added.

Anything else is refused with a ``ValueError`` that says what was missing, before the model is
touched. ``save`` / ``load`` keep a patched model of any of these styles in one file; ``load``
patches a fresh dense instance of the user's class and loads the weights into it. Training code that reads ``.weight`` (e.g. a RecBole CE loss) still works: it decodes
the table, and gradients reach the sub-item embeddings.
"""
from __future__ import annotations

import inspect
import os
import types
from typing import Callable

import torch
from torch import nn

from recjpq.nn.pq_embedding import PQEmbedding

STYLES = ("recjpq", "recbole", "sasrec.pytorch")
FORMAT = "recjpq-patched-model"
VERSION = 1
_CHECKED_KEYS = ("style", "table", "config", "state_dict", "meta")  # what the checksum covers, in order


def _is_recjpq_model(model: nn.Module) -> bool:
    from recjpq.models.base import SequentialRecommender

    return isinstance(model, SequentialRecommender)


def detect_style(model: nn.Module) -> str:
    """Which of ``STYLES`` the model's code follows; ``ValueError`` naming what is missing if none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _is_recjpq_model(model):
        return "recjpq"
    if hasattr(model, "item_embedding") and callable(getattr(model, "full_sort_predict", None)):
        missing = [a for a in ("ITEM_SEQ", "ITEM_SEQ_LEN") if not hasattr(model, a)]
        if missing:
            raise ValueError(f"{type(model).__name__} looks RecBole-style (item_embedding + full_sort_predict) but "
                             f"has no {' / '.join(missing)} attribute naming the interaction fields, so its "
                             "sequence encoder cannot be called; patch its scoring by hand with "
                             "PQEmbedding.from_dense + PQEmbedding.score_all/topk")
        return "recbole"
    if hasattr(model, "item_emb") and callable(getattr(model, "predict", None)):
        if not callable(getattr(model, "log2feats", None)):
            raise ValueError(f"{type(model).__name__} looks SASRec.pytorch-style (item_emb + predict) but has no "
                             "log2feats(log_seqs) to compute the sequence states; patch it by hand with "
                             "PQEmbedding.from_dense + PQEmbedding.score/topk")
        return "sasrec.pytorch"
    raise ValueError(f"cannot patch {type(model).__name__}: expected one of {STYLES}: a recjpq.models model, a "
                     "RecBole-style model (item_embedding, forward(item_seq, item_seq_len), full_sort_predict, "
                     "ITEM_SEQ, ITEM_SEQ_LEN) or a SASRec.pytorch-style model (item_emb, log2feats, predict)")


def _table_attr(style: str) -> str:
    return "item_emb" if style == "sasrec.pytorch" else "item_embedding"


def _check_table(model: nn.Module, attr: str) -> nn.Embedding:
    table = getattr(model, attr)
    if isinstance(table, PQEmbedding):
        raise ValueError(f"{type(model).__name__}.{attr} is already a PQEmbedding")
    if type(table) is not nn.Embedding:
        raise ValueError(f"{type(model).__name__}.{attr} must be a plain nn.Embedding to be quantised, "
                         f"got {type(table).__name__}")
    if table.max_norm is not None or table.sparse:
        raise ValueError(f"{type(model).__name__}.{attr} uses max_norm/sparse gradients, which PQEmbedding "
                         "does not reproduce")
    for name, module in model.named_modules():  # an untied output layer would keep scoring densely
        if module is not table and isinstance(module, (nn.Embedding, nn.Linear)) and \
                getattr(module, "weight", None) is not None and module.weight.shape == table.weight.shape:
            raise ValueError(f"{type(model).__name__} has a second item-sized table '{name}' (untied output "
                             f"embedding?); only models that score with {attr} itself can be patched")
    return table


def _recbole_full_sort_predict(self, interaction):
    seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
    return self.item_embedding.score_all(seq_output)


def _recbole_full_sort_topk(self, interaction, k: int, exclude: torch.Tensor | None = None):
    """The k best items ``(scores [B, k], ids [B, k])`` via the fused ``recjpq.ops.pq_topk``."""
    seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
    return self.item_embedding.topk(seq_output, k, exclude)


def _final_state(model, log_seqs) -> torch.Tensor:
    return model.log2feats(log_seqs)[:, -1, :]


def _as_ids(ids, device) -> torch.Tensor:
    return torch.as_tensor(ids, device=device).long()


def _sasrec_predict(self, user_ids, log_seqs, item_indices):
    del user_ids  # unused by SASRec, kept for the signature
    state = _final_state(self, log_seqs)
    return self.item_emb.score(state, _as_ids(item_indices, state.device))


def _sasrec_predict_topk(self, user_ids, log_seqs, k: int, exclude=None):
    """The k best items over the whole catalogue ``(scores [B, k], ids [B, k])`` (padding never
    returned); ``exclude`` int64 ``[B, E]``, -1 = none."""
    del user_ids
    state = _final_state(self, log_seqs)
    return self.item_emb.topk(state, k, None if exclude is None else _as_ids(exclude, state.device))


def _install(model: nn.Module, style: str, pq: PQEmbedding) -> None:
    """Put ``pq`` in place of the model's item table and rebind its scoring (``style``'s way)."""
    setattr(model, _table_attr(style), pq)
    if style == "recjpq":
        model.config.update(item_embedding="recjpq", num_codes=pq.num_codes)
    elif style == "recbole":
        model.full_sort_predict = types.MethodType(_recbole_full_sort_predict, model)
        model.full_sort_topk = types.MethodType(_recbole_full_sort_topk, model)
    else:
        model.predict = types.MethodType(_sasrec_predict, model)
        model.predict_topk = types.MethodType(_sasrec_predict_topk, model)


def _check_patchable(model: nn.Module) -> tuple[str, nn.Embedding]:
    """The model's style and its dense item table, or ``ValueError`` before anything changes."""
    style = detect_style(model)
    if style == "recbole":
        params = inspect.signature(model.forward).parameters
        if len(params) < 2:
            raise ValueError(f"{type(model).__name__}.forward must take (item_seq, item_seq_len), got "
                             f"({', '.join(params)})")
    return style, _check_table(model, _table_attr(style))


def patch_item_scoring(model: nn.Module, num_splits: int, num_codes: int = 256, **quantize_kwargs) -> PQEmbedding:
    """Quantise ``model``'s item table and route its full-catalogue scoring through PQ, in place.

    ``quantize_kwargs`` go to ``recjpq.convert.quantize`` (method, rotate, metric, iters, seed, progress...).
    Returns the installed ``PQEmbedding`` (its ``subitem_embeddings`` are what
    ``recjpq.convert.finetune`` and ``distill`` train). Raises ``ValueError`` for a model it cannot
    patch (with the valid M when d is not divisible by ``num_splits``).
    """
    style, table = _check_patchable(model)
    pq = PQEmbedding.from_dense(table, num_splits, num_codes, **quantize_kwargs)
    _install(model, style, pq)
    return pq


def save(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Write a patched (converted) model to ``path`` atomically: its style, the PQ table's layout
    (codes, sub-item embeddings, the rotation of OPQ or a query metric if any), the whole ``state_dict`` and ``meta``
    (plain values and tensors). ``load`` rebuilds it. A ``recjpq.models`` model's config is kept
    too, so it reloads without a factory, and ``recjpq.checkpoint.load_checkpoint`` (hence
    ``recjpq serve``) reads the file."""
    from recjpq.checkpoint import checksum, write_atomic

    style = detect_style(model)
    pq = getattr(model, _table_attr(style))
    if not isinstance(pq, PQEmbedding):
        raise ValueError(f"{type(model).__name__}.{_table_attr(style)} is not a PQEmbedding: patch the model "
                         "(patch_item_scoring / recjpq.convert.distill) before saving it here")
    layout = {"num_embeddings": pq.num_embeddings, "dim": pq.embedding_dim, "num_codes": pq.num_codes,
              "padding_idx": pq.padding_idx, "rotated": hasattr(pq, "rotation")}
    payload = {"format": FORMAT, "version": VERSION, "style": style, "table": layout,
               "config": dict(model.config) if style == "recjpq" else None,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta or {}}
    payload["checksum"] = checksum(payload, _CHECKED_KEYS)
    write_atomic(path, payload)


def load(path: str | os.PathLike, model_factory: Callable[[], nn.Module] | nn.Module | None = None,
         map_location="cpu") -> tuple[nn.Module, dict]:
    """``(model in eval mode, meta)`` from a file written by ``save``.

    ``model_factory`` gives a fresh DENSE model of the saved class (a callable returning one, or
    the instance itself): its item table is replaced by the saved PQ table, its scoring patched as
    ``patch_item_scoring`` does, then the saved weights are loaded (strictly). For a
    ``recjpq.models`` model it may be None (the model is rebuilt from the saved config).
    """
    from recjpq.checkpoint import CheckpointError, read_payload

    path = os.fspath(path)
    payload = read_payload(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} was not written by recjpq.patch.save (no '{FORMAT}' tag)")
    return from_payload(payload, path, model_factory)


def from_payload(payload: dict, path, model_factory: Callable[[], nn.Module] | nn.Module | None = None
                 ) -> tuple[nn.Module, dict]:
    """``load`` after the file is read (``recjpq.checkpoint.load_checkpoint`` comes here too).
    Anything wrong with the file itself (checksum, missing or ill-typed entries, a config that
    builds no model) is a ``CheckpointError``, as for ``recjpq.checkpoint`` files."""
    from recjpq.checkpoint import CheckpointError, check_config, checksum

    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has converted-model format version {payload.get('version')!r}; "
                              f"this recjpq reads version {VERSION}")
    try:
        stored, actual = payload.get("checksum"), checksum(payload, _CHECKED_KEYS)
    except (KeyError, RecursionError, TypeError) as e:
        raise CheckpointError(f"{path}: content cannot be verified ({type(e).__name__}: {e})") from None
    if stored != actual:
        raise CheckpointError(f"{path}: checksum mismatch: the file changed after it was written (bit flips, "
                              "a bad copy)")
    problem = None if payload["config"] is None else check_config(payload["config"])
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        return _rebuild(payload, path, model_factory)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: malformed converted-model file ({type(e).__name__}: {e})") from None


def _rebuild(payload: dict, path, model_factory) -> tuple[nn.Module, dict]:
    from recjpq.checkpoint import CheckpointError

    style, layout, state = payload["style"], payload["table"], payload["state_dict"]
    if model_factory is None:
        if payload["config"] is None:
            raise ValueError(f"{path} holds a {style}-style model: pass model_factory, a callable that builds a "
                             "fresh dense instance of its class")
        from recjpq.models import build_model

        config = dict(payload["config"], item_embedding="dense")
        model = build_model(config.pop("model"), config.pop("num_items"), **config)
    else:
        model = model_factory if isinstance(model_factory, nn.Module) else model_factory()
    got, table = _check_patchable(model)
    if got != style:
        raise ValueError(f"{path} holds a {style}-style model but model_factory gave a {got}-style "
                         f"{type(model).__name__}")
    attr = _table_attr(style)
    if (table.num_embeddings, table.embedding_dim) != (layout["num_embeddings"], layout["dim"]):
        raise ValueError(f"{type(model).__name__}.{attr} is [{table.num_embeddings}, {table.embedding_dim}] but the "
                         f"saved table is [{layout['num_embeddings']}, {layout['dim']}]")
    codes = state[f"{attr}.codes"]
    args = (codes, layout["dim"], layout["num_codes"], layout["padding_idx"])
    if layout["rotated"]:
        from recjpq.convert import RotatedPQEmbedding

        pq = RotatedPQEmbedding(*args, rotation=state[f"{attr}.rotation"])
    else:
        pq = PQEmbedding(*args)
    _install(model, style, pq.to(table.weight.device))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the saved weights do not fit {type(model).__name__}: {e}") from None
    return model.eval(), payload["meta"]
