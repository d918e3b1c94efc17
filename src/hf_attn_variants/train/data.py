"""Training data: plain-text files cut into fixed-length token chunks, and the sequence-length curriculum."""

from __future__ import annotations

import glob
import os

from .config import TrainConfig

def read_texts(patterns: list[str], exclude: str | None = None) -> list[str]:
    """Paths matching `patterns` (globs), sorted, without `exclude`; raises if none match."""
    paths = sorted({p for pattern in patterns for p in (glob.glob(pattern) or ([pattern] if os.path.exists(pattern) else []))})
    if exclude is not None:
        paths = [p for p in paths if os.path.abspath(p) != os.path.abspath(exclude)]
    if not paths:
        raise FileNotFoundError(f"No training text matches {patterns} (held out: {exclude}).")
    return paths


def tokenize_chunks(tokenizer, paths: list[str], length: int) -> list[list[int]]:
    """Non-overlapping `length`-token chunks of each file (the tail shorter than `length` is dropped)."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            ids = tokenizer(f.read()).input_ids
        rows += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    return rows


def evenly_spaced(rows: list, n: int | None) -> list:
    """`n` rows spread evenly over `rows` (all of them when n is None or >= len)."""
    if n is None or n >= len(rows):
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]


def build_datasets(tokenizer, config: TrainConfig):
    from datasets import Dataset

    paths = read_texts(config.train_files, exclude=config.eval_file)
    rows = tokenize_chunks(tokenizer, paths, config.max_length)
    if config.max_train_chunks is not None:
        rows = evenly_spaced(rows, config.max_train_chunks)
    train = Dataset.from_dict({"input_ids": rows})
    evaluation = None
    if config.eval_file:
        eval_rows = evenly_spaced(tokenize_chunks(tokenizer, [config.eval_file], config.eval_length or config.max_length), config.eval_chunks)
        evaluation = Dataset.from_dict({"input_ids": eval_rows})
    return train, evaluation, paths


def parse_curriculum(spec: str | None, max_length: int) -> list[tuple[int, int]]:
    """`"128:200,256:100"` -> [(128, 200), (256, 300)]: length 128 until step 200, 256 until step 300, then
    `max_length`. Each length must divide `max_length` (a chunk is cut into max_length // length pieces, so every
    step sees the same tokens)."""
    if not spec:
        return []
    schedule, end = [], 0
    for item in spec.split(","):
        length, steps = (int(x) for x in item.split(":"))
        if length <= 0 or steps <= 0 or max_length % length:
            raise ValueError(f"curriculum entry {item!r}: length must divide max_length={max_length}, steps > 0")
        end += steps
        schedule.append((length, end))
    return schedule

