"""Loaders, leave-one-out split, padding and the synthetic generator."""
import os

import numpy as np
import pytest

from recjpq.data import (DataFormatError, batches, generate_sequences, leave_one_out, length_batches,
                         load_interactions, pad_left, train_interactions)
from recjpq.data.synthetic import item_vectors

ML1M = "/work/shared/data/ml-1m/ml-1m.txt"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_text_pairs_and_sequence_lines_agree(tmp_path):
    pairs = _write(tmp_path, "pairs.txt", "7 30\n7 10\n5 20\n7 20\n5 30\n")
    lines = _write(tmp_path, "lines.txt", "7 30 10 20\n5 20 30\n")
    a, b = load_interactions(pairs), load_interactions(lines)
    assert a.item_ids == b.item_ids == ["10", "20", "30"]  # numeric order, ids 1..3
    assert a.user_ids == b.user_ids == ["7", "5"]  # first-seen order
    for x, y in zip(a.sequences, b.sequences):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.sequences[0], [3, 1, 2])
    assert a.num_interactions == 5


def test_text_row_without_item_names_line(tmp_path):
    path = _write(tmp_path, "bad.txt", "1 2\n1 3\n\n2\n")
    with pytest.raises(DataFormatError, match=r"line 4: .*no item"):
        load_interactions(path)


def test_csv_sorted_by_time_with_aliases_and_rating_filter(tmp_path):
    path = _write(tmp_path, "r.csv", "userId,movieId,rating,timestamp\n"
                                     "u1,b,5,300\nu1,a,4,100\nu2,c,1,50\nu1,c,2,200\nu2,a,5,60\n")
    data = load_interactions(path)
    assert data.item_ids == ["a", "b", "c"]
    assert [list(s) for s in data.sequences] == [[1, 3, 2], [3, 1]]
    kept = load_interactions(path, min_rating=4)
    assert [[kept.item_ids[i - 1] for i in s] for s in kept.sequences] == [["a", "b"], ["a"]]


@pytest.mark.parametrize("text, match", [
    ("user,item\n1,2\n", "no 'timestamp' column"),
    ("user,item,timestamp\n1,2,10\n1,3\n", r"line 3: expected 3 fields"),
    ("user,item,timestamp\n1,2,yesterday\n", r"line 2: timestamp 'yesterday' is not a number"),
    ("user,item,timestamp\n1,,5\n", r"line 2: empty user or item"),
    ("", "empty"),
])
def test_csv_malformed_rows(tmp_path, text, match):
    with pytest.raises(DataFormatError, match=match):
        load_interactions(_write(tmp_path, "bad.csv", text))


def test_tsv_and_missing_file(tmp_path):
    data = load_interactions(_write(tmp_path, "r.tsv", "user\titem\ttime\n1\t9\t2\n1\t8\t1\n"))
    assert [data.item_ids[i - 1] for i in data.sequences[0]] == ["8", "9"]
    with pytest.raises(FileNotFoundError):
        load_interactions(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="format"):
        load_interactions(tmp_path / "r.tsv", format="parquet")


def test_leave_one_out():
    seqs = [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([7, 8, 9])]
    split = leave_one_out(seqs)
    assert [list(s) for s in split.train] == [[1, 2], [5, 6], [7]]
    assert list(split.valid.targets) == [3, 8] and list(split.test.targets) == [4, 9]
    assert [list(h) for h in split.test.histories] == [[1, 2, 3], [7, 8]]
    assert [list(h) for h in split.valid.histories] == [[1, 2], [7]]
    users, items = train_interactions(split.train)
    assert list(users) == [0, 0, 1, 1, 2] and list(items) == [1, 2, 5, 6, 7]


def test_pad_left_keeps_the_newest_items():
    out = pad_left([np.array([1, 2, 3, 4, 5]), np.array([9]), np.array([], dtype=np.int64)], 3)
    assert out.tolist() == [[3, 4, 5], [0, 0, 9], [0, 0, 0]]


@pytest.mark.parametrize("num, batch_size, pool", [(1, 4, 3), (257, 16, 3), (300, 7, 50)])
def test_length_batches_cover_every_index_once_with_similar_lengths(num, batch_size, pool):
    lengths = np.random.default_rng(1).integers(1, 60, num)
    out = length_batches(lengths, batch_size, np.random.default_rng(0), pool=pool)
    assert sorted(np.concatenate(out).tolist()) == list(range(num))
    assert all(1 <= len(b) <= batch_size for b in out)
    again = length_batches(lengths, batch_size, np.random.default_rng(0), pool=pool)
    assert all(np.array_equal(a, b) for a, b in zip(out, again))  # the seed fixes the order
    if num > pool * batch_size:  # several pools: batches mix them in a shuffled order
        firsts = [int(b[0]) for b in out]
        assert firsts != sorted(firsts)
    spread = np.mean([np.ptp(lengths[b]) for b in out])
    shuffled = np.mean([np.ptp(lengths[b]) for b in batches(num, batch_size, np.random.default_rng(0))])
    assert num == 1 or spread < shuffled / 2


def test_synthetic_is_deterministic_and_sequential():
    a = generate_sequences(200, 500, num_clusters=5, mean_length=20, markov=0.8, hop=0.9, seed=3)
    b = generate_sequences(200, 500, num_clusters=5, mean_length=20, markov=0.8, hop=0.9, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences))
    items = np.concatenate(a.sequences)
    assert items.min() >= 1 and items.max() <= 500 and a.num_items == 500
    assert min(len(s) for s in a.sequences) >= 5
    # Markov structure: the most frequent successor of an item follows it far more often than chance
    nxt = {}
    for s in a.sequences:
        for x, y in zip(s[:-1], s[1:]):
            nxt.setdefault(x, []).append(y)
    top_share = np.mean([np.bincount(v).max() / len(v) for v in nxt.values() if len(v) >= 10])
    assert top_share > 0.2
    with pytest.raises(ValueError, match="num_clusters"):
        generate_sequences(10, 5, num_clusters=6)
    with pytest.raises(ValueError, match="taste"):
        generate_sequences(10, 20, num_clusters=2, taste=-1.0)
    with pytest.raises(ValueError, match="candidates"):
        generate_sequences(10, 20, num_clusters=2, candidates=0)


def test_synthetic_items_follow_their_own_vectors():
    """The signal a dense table keeps and shared sub-items lose: which item of a cluster comes
    next depends on that item's own latent vector, not only on its cluster and popularity."""
    def consecutive_cosine(taste):
        data = generate_sequences(300, 400, num_clusters=4, mean_length=30, taste=taste, seed=2)
        vectors = item_vectors(400, seed=2)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.mean(np.concatenate([np.sum(vectors[s[:-1] - 1] * vectors[s[1:] - 1], axis=1)
                                       for s in data.sequences]))

    assert consecutive_cosine(14.0) > 0.05  # measured 0.088; the vectors are independent of the clusters
    assert abs(consecutive_cosine(0.0)) < 0.02  # measured -0.004: without taste, vectors play no part


@pytest.mark.skipif(not os.path.isfile(ML1M), reason=f"dataset not present: {ML1M}")
def test_ml1m_counts():
    data = load_interactions(ML1M)
    assert (len(data.sequences), data.num_items, data.num_interactions) == (6040, 3416, 999611)


def test_binary_and_latin1_files_name_file_and_line(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("user,item,timestamp\n1,caf\u00e9,1\n".encode("utf-8") + "2,na\u00efve,2\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.csv, line 3: not UTF-8 text \(byte 0xef at column 5\)"):
        load_interactions(latin1)
    # far beyond the text decoder's read-ahead block, so its own error could not name the line
    text = tmp_path / "late.txt"
    text.write_bytes(b"1 2\n" * 5000 + b"3 \xe9t\xe9\n")
    with pytest.raises(DataFormatError, match=r"late\.txt, line 5001: not UTF-8"):
        load_interactions(text)
    binary = tmp_path / "model.pt"
    binary.write_bytes(bytes(range(256)) * 4)  # byte 10 ends line 1; 0x80 is the first non-UTF-8 byte
    with pytest.raises(DataFormatError, match=r"model\.pt, line 2: not UTF-8 text \(byte 0x80 .* binary file"):
        load_interactions(binary)


@pytest.mark.parametrize("name, text, line", [
    ("long.txt", "1 2\n1 " + "7" * 5000 + "\n", 2),
    ("long_seq.txt", "1 2 3\n2 4 5 " + "7" * 101 + " 6\n", 2),
    ("long.csv", "user,item,timestamp\n1,2,3\n1," + "7" * 5000 + ",4\n", 3),
])
def test_overlong_numeric_ids_name_file_and_line(tmp_path, name, text, line):
    with pytest.raises(DataFormatError, match=rf"{name}, line {line}: item id 777777777777\.\.\. has \d+ digits"):
        load_interactions(_write(tmp_path, name, text))


def test_long_non_numeric_ids_and_odd_digits_are_fine(tmp_path):
    long_id = "x" * 5000
    data = load_interactions(_write(tmp_path, "ok.txt", f"1 {long_id}\n1 \u00b2\n1 --5\n1 03\n1 3\n1 -2\n"))
    assert data.item_ids == ["-2", "03", "3", "--5", long_id, "\u00b2"]  # numbers first, then strings


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfuser,item,timestamp\n1,5,2\n1,4,1\n")
    data = load_interactions(path)
    assert data.user_ids == ["1"] and [data.item_ids[i - 1] for i in data.sequences[0]] == ["4", "5"]
    text = tmp_path / "bom.txt"  # without the skip, the first user would be '\ufeff1', not '1'
    text.write_bytes(b"\xef\xbb\xbf1 5\n1 4\n")
    assert load_interactions(text).user_ids == ["1"]


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "NaN"])
def test_non_finite_timestamps_and_ratings_name_file_and_line(tmp_path, value):
    path = _write(tmp_path, "t.csv", f"user,item,timestamp,rating\n1,2,3,5\n1,3,{value},5\n")
    with pytest.raises(DataFormatError, match=rf"t\.csv, line 3: timestamp '{value}' is not a finite number"):
        load_interactions(path)
    path = _write(tmp_path, "r.csv", f"user,item,timestamp,rating\n1,2,3,5\n1,3,4,{value}\n")
    with pytest.raises(DataFormatError, match=rf"r\.csv, line 3: rating '{value}' is not a finite number"):
        load_interactions(path, min_rating=3)


def test_csv_field_over_the_size_limit_names_the_line(tmp_path):
    path = _write(tmp_path, "big.csv", 'user,item,timestamp\n1,2,3\n1,"' + "x" * 200_000 + '",4\n')
    with pytest.raises(DataFormatError, match=r"big\.csv, line 3: field larger than field limit"):
        load_interactions(path)
