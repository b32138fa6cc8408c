"""Checkpoints: round trips, every class of damaged or crafted file, bit flips, pickled code, orphans."""
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import recjpq.checkpoint as ckpt
from recjpq.checkpoint import CheckpointError, CheckpointWarning, checksum, load_checkpoint, save_checkpoint
from recjpq.cli import main
from recjpq.models import build_model

NUM_ITEMS = 30
ITEM_IDS = [f"i{n}" for n in range(NUM_ITEMS)]


def _model(kind="sasrec"):
    torch.manual_seed(0)
    if kind == "sasrec":  # RecJPQ: the file carries codes
        codes = torch.randint(0, 8, (NUM_ITEMS + 1, 4), dtype=torch.uint8)
        return build_model("sasrec", NUM_ITEMS, codes=codes, dim=8, item_embedding="recjpq", num_codes=8,
                           num_layers=1, num_heads=2, dropout=0.0, max_len=5)
    return build_model(kind, NUM_ITEMS, dim=8, max_len=5)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    save_checkpoint(path, _model(), {"item_ids": ITEM_IDS, "metrics": {"ndcg@10": 0.5}})
    return path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", ["sasrec", "bert4rec", "gru4rec"])
def test_round_trip_is_exact_and_checksummed(tmp_path, kind):
    model = _model(kind)
    meta = {"item_ids": ITEM_IDS, "nested": {"t": torch.arange(3), "x": [1.5, None, True, 2 ** 70, "s"]}}
    save_checkpoint(tmp_path / "m.pt", model, meta)
    assert os.listdir(tmp_path) == ["m.pt"]
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    assert payload["version"] == 2 and payload["checksum"] == checksum(payload)
    loaded, got_meta = load_checkpoint(tmp_path / "m.pt")
    assert _same_weights(loaded, model) and loaded.config == model.config
    assert got_meta["nested"]["x"] == meta["nested"]["x"] and torch.equal(got_meta["nested"]["t"], torch.arange(3))


def _craft(path, payload, rehash=True):
    """Write ``payload`` as a checkpoint file, with a valid checksum unless ``rehash`` is False, so
    that the content checks, not the checksum, must catch it."""
    if rehash and isinstance(payload, dict) and all(k in payload for k in ckpt.PAYLOAD_KEYS):
        try:
            payload = {**payload, "checksum": checksum(payload)}
        except TypeError:  # content no save could write: the load must refuse it all the same
            pass
    torch.save(payload, path)
    return path


def _with(payload, section, **changes):
    return {**payload, section: {**payload[section], **changes}}


def _without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


def _state(payload, name, value):
    return {**payload, "state_dict": {**payload["state_dict"], name: value}}


CRAFTED = {  # name: (payload -> crafted payload, message)
    "not a dict": (lambda p: [p], "not a recjpq checkpoint"),
    "foreign dict": (lambda p: {"weights": torch.zeros(2)}, "not a recjpq checkpoint"),
    "format not a string": (lambda p: {**p, "format": torch.zeros(2)}, "not a recjpq checkpoint"),
    "future version": (lambda p: {**p, "version": 99}, "version 99"),
    "version as text": (lambda p: {**p, "version": "2"}, "version '2'"),
    "version as bool": (lambda p: {**p, "version": True}, "version True"),
    "version as tensor": (lambda p: {**p, "version": torch.tensor(2)}, "version tensor"),
    "no config": (lambda p: _without(p, "config"), r"missing \['config'\]"),
    "no state_dict": (lambda p: _without(p, "state_dict"), r"missing \['state_dict'\]"),
    "no meta": (lambda p: _without(p, "meta"), r"missing \['meta'\]"),
    "config a list": (lambda p: {**p, "config": [1, 2]}, "config must be a dict"),
    "unknown model": (lambda p: _with(p, "config", model="transformer-xl"), "config\\['model'\\] must be one of"),
    "model a list": (lambda p: _with(p, "config", model=["sasrec"]), "config\\['model'\\] must be one of"),
    "max_len 1e9": (lambda p: _with(p, "config", max_len=1e9), r"config\['max_len'\] must be a positive int"),
    "max_len 10**9": (lambda p: _with(p, "config", max_len=10 ** 9), "encoder.positions.weight is"),
    "dim 2**40": (lambda p: _with(p, "config", dim=2 ** 40), "do not build|weights do not match"),
    "num_items 10**12": (lambda p: _with(p, "config", num_items=10 ** 12), "do not build"),
    "negative dim": (lambda p: _with(p, "config", dim=-8), r"config\['dim'\] must be a positive int"),
    "num_layers 10**12": (lambda p: _with(p, "config", num_layers=10 ** 12), "num_layers.* exceeds"),
    "num_heads not dividing dim": (lambda p: _with(p, "config", num_heads=3), "do not build.*divisible"),
    "dropout text": (lambda p: _with(p, "config", dropout="0.1"), r"dropout'\] must be a number in \[0, 1\)"),
    "dropout 1.5": (lambda p: _with(p, "config", dropout=1.5), r"dropout'\] must be a number"),
    "unknown config key": (lambda p: _with(p, "config", flash=True), r"unknown keys \['flash'\]"),
    "no num_items": (lambda p: {**p, "config": _without(p["config"], "num_items")}, r"lacks \['num_items'\]"),
    "unknown embedding": (lambda p: _with(p, "config", item_embedding="pq"), "do not build.*item_embedding"),
    "float codes": (lambda p: {**p, "codes": p["codes"].float()}, "do not build.*dtype"),
    "codes a list": (lambda p: {**p, "codes": p["codes"].tolist()}, "codes must be a tensor"),
    "codes out of range": (lambda p: {**p, "codes": p["codes"] + 100}, "do not build.*num_codes"),
    "state_dict codes out of range": (lambda p: _state(p, "item_embedding.codes", p["codes"] + 100),
                                      "item_embedding.codes differs from the saved codes"),
    "state_dict a list": (lambda p: {**p, "state_dict": [1]}, "state_dict must map"),
    "weight not a tensor": (lambda p: _state(p, "encoder.norm.weight", [1.0] * 8), "state_dict must map"),
    "missing weight": (lambda p: {**p, "state_dict": _without(p["state_dict"], "encoder.norm.bias")},
                       r"missing \['encoder.norm.bias'\]"),
    "extra weight": (lambda p: _state(p, "head.weight", torch.zeros(2)), r"unexpected \['head.weight'\]"),
    "wrong shape": (lambda p: _state(p, "encoder.norm.weight", torch.ones(9)), r"encoder.norm.weight is \(9,\)"),
    "integer weight": (lambda p: _state(p, "encoder.norm.weight", torch.ones(8, dtype=torch.int64)),
                       "encoder.norm.weight is .* torch.int64"),
    "sparse weight": (lambda p: _state(p, "encoder.norm.weight", torch.ones(8).to_sparse()),
                      "cannot be verified: .* not a torch.sparse_coo"),
    "meta-device weight": (lambda p: _state(p, "encoder.norm.weight", torch.ones(8, device="meta")),
                           "cannot be verified: .* meta"),
    "NaN weight": (lambda p: _state(p, "encoder.norm.weight", torch.full((8,), float("nan"))), "non-finite"),
    "inf weight": (lambda p: _state(p, "item_embedding.subitem_embeddings",
                                    p["state_dict"]["item_embedding.subitem_embeddings"] / 0), "non-finite"),
    "meta a list": (lambda p: {**p, "meta": ["i0"]}, "meta must be a dict"),
    "item_ids a string": (lambda p: _with(p, "meta", item_ids="i0 i1"), "list of strings"),
    "item_ids ints": (lambda p: _with(p, "meta", item_ids=list(range(NUM_ITEMS))), "list of strings"),
    "item_ids too short": (lambda p: _with(p, "meta", item_ids=ITEM_IDS[:-1]), "has 29 ids, the model has 30"),
    "item_ids duplicated": (lambda p: _with(p, "meta", item_ids=["i0"] * NUM_ITEMS), "duplicate"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_files_are_checkpoint_errors(good, tmp_path, case):
    mutate, match = CRAFTED[case]
    path = _craft(tmp_path / "crafted.pt", mutate(torch.load(good, weights_only=True)))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)
    assert time.perf_counter() - start < 5  # absurd sizes are refused, not allocated


def test_checksum_presence_and_version_must_agree(good, tmp_path):
    payload = torch.load(good, weights_only=True)
    with pytest.raises(CheckpointError, match="no checksum"):
        load_checkpoint(_craft(tmp_path / "a.pt", _without(payload, "checksum"), rehash=False))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(_craft(tmp_path / "b.pt", {**payload, "checksum": "0" * 64}, rehash=False))
    with pytest.raises(CheckpointError, match="version field is damaged"):
        load_checkpoint(_craft(tmp_path / "c.pt", {**payload, "version": 1}, rehash=False))


def test_version_1_files_without_checksum_still_load_with_a_warning(good, tmp_path):
    old = _craft(tmp_path / "v1.pt", {**_without(torch.load(good, weights_only=True), "checksum"), "version": 1},
                 rehash=False)
    with pytest.warns(CheckpointWarning, match="version 1 checkpoint without a checksum"):
        model, meta = load_checkpoint(old)
    assert _same_weights(model, load_checkpoint(good)[0]) and meta["item_ids"] == ITEM_IDS


@pytest.mark.parametrize("cut", [0, 1, 200, 0.3, 0.6, -1])
def test_truncated_files_are_checkpoint_errors(good, tmp_path, cut):
    data = good.read_bytes()
    end = int(cut * len(data)) if isinstance(cut, float) else cut % len(data)
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[:end])
    with pytest.raises(CheckpointError, match="not a readable recjpq checkpoint"):
        load_checkpoint(path)


def _records(path):
    """(name, first byte, size) of every stored record of a torch.save zip file."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        out = []
        for info in z.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            out.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
        return out


def _flip(path, out, position, bit=0):
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    out.write_bytes(bytes(data))
    return out


def test_bit_flips_in_tensor_data_are_detected(good, tmp_path):
    tensors = [(name, start, size) for name, start, size in _records(good) if "/data/" in name]
    assert len(tensors) >= 10
    for name, start, size in tensors:
        for offset in {0, size // 2, size - 1}:
            with pytest.raises(CheckpointError, match="checksum mismatch"):
                load_checkpoint(_flip(good, tmp_path / "flipped.pt", start + offset, bit=offset % 8))


def test_random_bit_flips_never_load_different_weights(good, tmp_path):
    # anywhere in the file: an error, or (a flip in bytes the reader skips) the very same model
    original, _ = load_checkpoint(good)
    rng = random.Random(0)
    size = good.stat().st_size
    outcomes = {"error": 0, "same": 0}
    for _ in range(60):
        path = _flip(good, tmp_path / "flipped.pt", rng.randrange(size), rng.randrange(8))
        try:
            model, meta = load_checkpoint(path)
        except CheckpointError:
            outcomes["error"] += 1
            continue
        assert _same_weights(model, original) and meta["item_ids"] == ITEM_IDS
        outcomes["same"] += 1
    assert outcomes["error"] > 30, outcomes


class _Exploit:
    """Unpickling this runs code: it writes the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on the legacy-format file
def test_pickled_code_never_runs(good, tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Exploit(marker)))  # the payload is live...
    assert marker.exists()
    marker.unlink()
    payload = torch.load(good, weights_only=True)
    zipped = tmp_path / "zipped.pt"
    torch.save({**payload, "meta": {"item_ids": ITEM_IDS, "x": _Exploit(marker)}}, zipped)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(_Exploit(marker)))
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError, match="not a readable"):
            load_checkpoint(path)
    assert not marker.exists()  # ...but never from a checkpoint


@pytest.mark.parametrize("case", ["truncated", "max_len 10**9", "float codes", "item_ids too short", "NaN weight"])
def test_cli_reports_bad_checkpoints_as_messages(good, tmp_path, case):
    path = tmp_path / "bad.pt"
    if case == "truncated":
        path.write_bytes(good.read_bytes()[:300])
    else:
        _craft(path, CRAFTED[case][0](torch.load(good, weights_only=True)))
    data = tmp_path / "data.txt"
    data.write_text("u1 i1\nu1 i2\nu1 i3\n")
    for argv in (["recommend", str(path), "--history", "i1"], ["evaluate", str(path), "--data", str(data)]):
        with pytest.raises(SystemExit, match=f"recjpq {argv[0]}: error: {path}"):
            main(argv)


def test_cli_recommend_without_item_ids_uses_model_ids(tmp_path, capsys):
    path = tmp_path / "m.pt"
    save_checkpoint(path, _model())  # saved from Python: no id map
    main(["recommend", str(path), "--history", "1,2", "-k", "3"])
    items = [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()]
    assert len(items) == 3 and all(1 <= int(i) <= NUM_ITEMS and i not in ("1", "2") for i in items)


def test_next_save_removes_temporaries_of_dead_saves_only(tmp_path):
    target = tmp_path / "model.pt"
    # a save killed between writing its temporary and renaming it
    child = ("import os, signal, recjpq.checkpoint as c; from recjpq.models import build_model\n"
             "os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)\n"
             f"c.save_checkpoint({str(target)!r}, build_model('gru4rec', 30, dim=8))\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    (killed,) = [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    host = ckpt._HOST
    assert killed.startswith(f".tmp-{host}+") and os.path.getsize(tmp_path / killed) > 0
    live = f".tmp-{host}+{os.getpid()}+abcd1234.pt"  # this process: a concurrent save in progress
    other_host_fresh = ".tmp-elsewhere+1+abcd1234.pt"  # PIDs of other hosts mean nothing here
    other_host_old = ".tmp-elsewhere+2+abcd1234.pt"
    legacy_fresh, legacy_old = ".tmp-k2j4_x9a.pt", ".tmp-zz81q0pm.pt"  # written before the PID was in the name
    unrelated = ["notes.tmp-1.txt", ".tmp-notes.txt", "other.pt"]
    for name in [live, other_host_fresh, other_host_old, legacy_fresh, legacy_old, *unrelated]:
        (tmp_path / name).write_bytes(b"x")
    two_hours_ago = time.time() - 2 * ckpt.STALE_TEMP_SECONDS
    for name in (other_host_old, legacy_old, *unrelated):
        os.utime(tmp_path / name, (two_hours_ago, two_hours_ago))
    save_checkpoint(target, _model("gru4rec"))
    assert sorted(os.listdir(tmp_path)) == sorted([live, other_host_fresh, legacy_fresh, *unrelated, "model.pt"])
    assert killed not in os.listdir(tmp_path)
    load_checkpoint(target)
