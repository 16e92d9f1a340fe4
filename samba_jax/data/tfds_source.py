"""The "tfds:<name>[/<config>][:<split>]" source: a prepared TFDS dataset, read without TensorFlow.

`tfds.data_source` gives random access to datasets prepared in the ArrayRecord file format
(`download_and_prepare(file_format="array_record")`); reading needs tensorflow_datasets but
not TensorFlow. Datasets prepared as TFRecord must be re-prepared or converted first.
"""

from __future__ import annotations

import numpy as np

from samba_jax.data.text_decoding import CountingTextSource


class TfdsTextSource(CountingTextSource):
    """A prepared TFDS split (ArrayRecord); element i is its `feature` as text."""

    def __init__(self, name: str, split: str, data_dir: str | None, feature: str):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ImportError("Source 'tfds:...' needs the tensorflow_datasets package"
                              " (TensorFlow itself is not needed).") from e
        self._name, self._feature = name, feature
        self._init_stats()
        self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        example = self._source[index]
        if self._feature not in example:
            raise KeyError(f"TFDS dataset {self._name!r} has no feature {self._feature!r}"
                           f" (features: {sorted(example)}); set config.data.tfds_text_feature.")
        value = example[self._feature]
        value = value.item() if isinstance(value, np.ndarray) else value
        where = f"tfds:{self._name}[{index}]"
        text = self._decode(value, where) if isinstance(value, bytes) else str(value)
        return self._count_if_empty(text, where)

    def __repr__(self) -> str:
        return f"TfdsTextSource({self._name!r}, {len(self)} documents, feature={self._feature!r})"
