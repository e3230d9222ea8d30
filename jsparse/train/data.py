"""Byte-level text data: real text with nothing to download, a deterministic split, and step-addressable batches.

Sources (``DataConfig.path``):

* ``None`` -- the Python standard library's own ``*.py`` files (``sysconfig.get_paths()["stdlib"]``, site-packages
  excluded): ~30 MB of real text on any machine that runs Python.
* a directory -- every non-hidden file below it; a glob -- every file it matches (``**`` recursive).
* a ``.npy`` file -- a pre-tokenised 1-D integer array (memory-mapped; tokens must be < the model's vocab size).

Files are read in sorted order and joined with a 0 byte (an end-of-document marker that text rarely contains). The
token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens; a seeded permutation of the windows puts
``val_fraction`` of them in the validation set. Training batches are a pure function of the step: the sequences of
step ``s`` are the ``[s*B, (s+1)*B)``-th entries of the concatenated per-epoch shuffles of the training windows.
Resuming at step ``s`` therefore needs nothing but ``s`` (the checkpoint also stores the data position and a
fingerprint of the token stream, to catch a changed dataset).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig
from typing import Iterator

import numpy as np

from jsparse.train.config import DataConfig

DOC_SEPARATOR = b"\x00"
_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_files() -> list[str]:
  """The standard library's ``*.py`` files in sorted order (no site-packages, no caches)."""
  root = sysconfig.get_paths()["stdlib"]
  files: list[str] = []
  for here, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
    files.extend(os.path.join(here, n) for n in sorted(names) if n.endswith(".py"))
  return files


def source_files(path: str | None) -> list[str]:
  """The text files a ``DataConfig.path`` names, in a deterministic order.

  Raises:
    ValueError: nothing matches.
  """
  if path is None:
    files = stdlib_files()
  elif os.path.isdir(path):
    files = []
    for here, dirs, names in os.walk(path):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      files.extend(os.path.join(here, n) for n in sorted(names) if not n.startswith("."))
  else:
    files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
  if not files:
    raise ValueError(f"data: no files found for data.path={path!r} (a directory, a glob or a .npy file)")
  return files


def load_tokens(config: DataConfig) -> np.ndarray:
  """The whole token stream as a 1-D integer array (uint8 for text; the ``.npy``'s own dtype otherwise).

  Raises:
    ValueError: missing/empty source, or a ``.npy`` that is not a 1-D integer array.
  """
  path = config.path
  if path is not None and path.endswith(".npy"):
    if not os.path.isfile(path):
      raise ValueError(f"data: data.path={path!r} does not exist")
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"data: {path} must hold a 1-D integer array of tokens, got {tokens.dtype}{tokens.shape}")
    return tokens if config.max_bytes is None else tokens[:config.max_bytes]
  if path is not None and not any(ch in path for ch in "*?[") and not os.path.exists(path):
    raise ValueError(f"data: data.path={path!r} does not exist")
  chunks, size = [], 0
  for name in source_files(path):
    with open(name, "rb") as f:
      blob = f.read()
    chunks.append(blob + DOC_SEPARATOR)
    size += len(chunks[-1])
    if config.max_bytes is not None and size >= config.max_bytes:
      break
  data = b"".join(chunks)
  if config.max_bytes is not None:
    data = data[:config.max_bytes]
  return np.frombuffer(data, dtype=np.uint8)


def fingerprint(tokens: np.ndarray) -> str:
  """A short hash of the token stream (stored in checkpoints to detect a changed dataset on resume)."""
  h = hashlib.sha1()
  h.update(str((tokens.dtype.str, tokens.shape)).encode())
  h.update(np.ascontiguousarray(tokens).view(np.uint8).data)
  return h.hexdigest()[:16]


class TokenBatches:
  """Deterministic train/validation batches over a token stream.

  Args:
    tokens: the 1-D token stream.
    seq_len: tokens per sequence (each window holds ``seq_len + 1``: inputs and shifted targets).
    batch_size: sequences per batch.
    val_fraction: fraction of windows held out.
    seed: seed of the split and of the shuffles.

  Raises:
    ValueError: too little data for one training and one validation batch.
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, val_fraction: float, seed: int):
    self.tokens = tokens
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.seed = seed
    window = seq_len + 1
    n_windows = len(tokens) // window
    n_val = max(batch_size, int(round(val_fraction * n_windows)))
    if n_windows - n_val < batch_size:
      raise ValueError(f"data: {len(tokens)} tokens make {n_windows} sequences of {window} tokens; need at least "
                       f"{n_val + batch_size} for one validation and one training batch of {batch_size} "
                       f"(lower data.seq_len or data.batch_size, or give more data)")
    order = np.random.default_rng([seed, 0x5B1]).permutation(n_windows)
    self.val_windows = np.sort(order[:n_val])
    self.train_windows = np.sort(order[n_val:])
    self.fingerprint = fingerprint(tokens)

  @property
  def n_train(self) -> int:
    return len(self.train_windows)

  @property
  def n_val(self) -> int:
    return len(self.val_windows)

  @functools.lru_cache(maxsize=4)
  def _epoch_order(self, epoch: int) -> np.ndarray:
    return self.train_windows[np.random.default_rng([self.seed, 0xE90C, epoch]).permutation(self.n_train)]

  def _gather(self, windows: np.ndarray) -> np.ndarray:
    window = self.seq_len + 1
    idx_BxW = windows[:, None] * window + np.arange(window)[None, :]
    return np.asarray(self.tokens[idx_BxW], dtype=np.int32)

  def position(self, step: int) -> int:
    """Training sequences consumed before ``step`` (the data position saved with checkpoints)."""
    return step * self.batch_size

  def train_batch(self, step: int) -> np.ndarray:
    """The int32 ``[batch_size, seq_len + 1]`` windows of training step ``step`` (a pure function of ``step``)."""
    flat = np.arange(self.position(step), self.position(step + 1))
    epochs, offsets = np.divmod(flat, self.n_train)
    windows = np.empty(self.batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      windows[sel] = self._epoch_order(int(epoch))[offsets[sel]]
    return self._gather(windows)

  def val_batches(self, max_batches: int) -> Iterator[np.ndarray]:
    """Up to ``max_batches`` fixed validation batches (the same ones at every evaluation)."""
    n = min(max_batches, self.n_val // self.batch_size)
    for i in range(n):
      yield self._gather(self.val_windows[i * self.batch_size:(i + 1) * self.batch_size])


def make_batches(config: DataConfig) -> TokenBatches:
  """Loads the tokens named by ``config`` and splits them (see the module docstring)."""
  return TokenBatches(load_tokens(config), seq_len=config.seq_len, batch_size=config.batch_size,
                      val_fraction=config.val_fraction, seed=config.seed)
