"""The data pipeline: sources, the deterministic split, step-addressable shuffled batches."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jsparse.train import data
from jsparse.train.config import DataConfig


def _batches(tokens, seed=0, batch_size=4, seq_len=7, val_fraction=0.1):
  return data.TokenBatches(tokens, seq_len=seq_len, batch_size=batch_size, val_fraction=val_fraction, seed=seed)


def test_default_source_is_the_stdlib():
  files = data.stdlib_files()
  assert len(files) > 200
  assert files == sorted(files, key=lambda f: (os.path.dirname(f), os.path.basename(f))) or files
  assert all(f.endswith(".py") and "site-packages" not in f for f in files)
  assert any(f.endswith(os.sep + "os.py") for f in files)
  tokens = data.load_tokens(DataConfig(max_bytes=50_000))
  assert tokens.dtype == np.uint8 and len(tokens) == 50_000


def test_split_is_deterministic_and_disjoint():
  tokens = np.arange(20_000, dtype=np.int32) % 251
  a, b = _batches(tokens), _batches(tokens)
  assert np.array_equal(a.val_windows, b.val_windows) and np.array_equal(a.train_windows, b.train_windows)
  assert not set(a.val_windows) & set(a.train_windows)
  assert len(a.val_windows) + len(a.train_windows) == len(tokens) // 8
  assert a.n_val == round(0.1 * (len(tokens) // 8))
  c = _batches(tokens, seed=1)
  assert not np.array_equal(a.val_windows, c.val_windows)


def test_batches_are_a_pure_function_of_the_step():
  tokens = np.random.default_rng(0).integers(0, 256, 30_000).astype(np.uint8)
  a, b = _batches(tokens), _batches(tokens)
  steps = [0, 5, 3, 1000, 5, 2]
  first = [a.train_batch(s) for s in steps]
  later = [b.train_batch(s) for s in reversed(steps)][::-1]
  for x, y in zip(first, later):
    assert x.dtype == np.int32 and x.shape == (4, 8)
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.train_batch(0), a.train_batch(1))
  assert not np.array_equal(a.train_batch(0), _batches(tokens, seed=3).train_batch(0))
  assert a.position(7) == 28
  vals = [list(map(np.ndarray.tolist, a.val_batches(3))) for _ in range(2)]
  assert vals[0] == vals[1] and len(vals[0]) == 3


def test_each_epoch_visits_every_training_window_once():
  tokens = np.arange(4 * 8 * 50, dtype=np.int32)  # windows of 8 tokens; token i // 8 identifies the window
  b = _batches(tokens, batch_size=4)
  per_epoch = b.n_train // 4 * 4
  seen = np.concatenate([b.train_batch(s)[:, 0] // 8 for s in range(per_epoch // 4)])
  assert len(set(seen.tolist())) == len(seen)
  assert set(seen.tolist()) <= set(b.train_windows.tolist())
  for s in range(3):  # windows are contiguous runs of the stream: inputs and shifted targets line up
    x = b.train_batch(s)
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)


def test_directory_glob_and_npy_sources(tmp_path):
  (tmp_path / "b.txt").write_bytes(b"bbbb")
  (tmp_path / "a.txt").write_bytes(b"aa")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "c.md").write_bytes(b"c")
  (tmp_path / ".hidden").write_bytes(b"zz")
  tokens = data.load_tokens(DataConfig(path=str(tmp_path)))
  assert bytes(tokens) == b"aa\x00bbbb\x00c\x00"
  tokens = data.load_tokens(DataConfig(path=str(tmp_path / "**" / "*.md")))
  assert bytes(tokens) == b"c\x00"
  np.save(tmp_path / "toks.npy", np.arange(1000, dtype=np.uint16))
  tokens = data.load_tokens(DataConfig(path=str(tmp_path / "toks.npy")))
  assert tokens.dtype == np.uint16 and tokens[999] == 999
  np.save(tmp_path / "bad.npy", np.ones((4, 4), np.float32))
  with pytest.raises(ValueError, match="1-D integer array"):
    data.load_tokens(DataConfig(path=str(tmp_path / "bad.npy")))
  with pytest.raises(ValueError, match="no files found"):
    data.load_tokens(DataConfig(path=str(tmp_path / "*.nothing")))
  with pytest.raises(ValueError, match="need at least"):
    data.make_batches(DataConfig(path=str(tmp_path / "sub"), seq_len=8, batch_size=2))


def test_fingerprint_tracks_content():
  tokens = np.arange(100, dtype=np.uint8)
  other = tokens.copy()
  other[50] = 0
  assert data.fingerprint(tokens) == data.fingerprint(tokens.copy())
  assert data.fingerprint(tokens) != data.fingerprint(other)
