"""The "tfds:" source on a tiny TFDS dataset prepared offline as ArrayRecord (no TensorFlow)."""

import itertools

import numpy as np
import pytest

from samba_jax.data import pipeline, sources

tfds = pytest.importorskip("tensorflow_datasets")


class SambaTinyText(tfds.core.GeneratorBasedBuilder):
    """Registered as "samba_tiny_text": 6 train and 2 validation documents."""

    VERSION = tfds.core.Version("1.0.0")

    # TFDS derives the builder's code path from its package; for a test module that
    # needs the (uninstalled) importlib_resources backport. The path is unused here.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"body": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples("train", 6),
                "validation": self._generate_examples("validation", 2)}

    def _generate_examples(self, split, count):
        for i in range(count):
            yield i, {"body": f"{split} document {i}: caf\u00e9 " * (i + 1)}


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    SambaTinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_source_reads_text_and_splits(tfds_data_dir):
    train = sources.make_document_source("tfds:samba_tiny_text", "train",
                                         tfds_data_dir=tfds_data_dir, tfds_text_feature="body")
    assert sorted(train[i] for i in range(len(train))) == sorted(
        f"train document {i}: caf\u00e9 " * (i + 1) for i in range(6))
    # ":validation" in the spec wins over the `split` argument.
    validation = sources.make_document_source("tfds:samba_tiny_text:validation", "train",
                                              tfds_data_dir=tfds_data_dir,
                                              tfds_text_feature="body")
    assert len(validation) == 2 and validation[0].startswith("validation document")


def test_tfds_source_in_the_pipeline(tiny_tokenizer, tfds_data_dir):
    ds = pipeline.make_dataset("tfds:samba_tiny_text", tiny_tokenizer, 7, 2, seed=0,
                               tfds_data_dir=tfds_data_dir, tfds_text_feature="body",
                               process_index=0, process_count=1)
    stream = np.concatenate([b["tokens"].reshape(-1) for b in itertools.islice(ds, 20)])
    text = tiny_tokenizer.decode(stream[stream != tiny_tokenizer.eos_id])
    assert "train document" in text and "validation" not in text


def test_tfds_wrong_feature_names_the_config_field(tfds_data_dir):
    source = sources.make_document_source("tfds:samba_tiny_text", "train",
                                          tfds_data_dir=tfds_data_dir)
    with pytest.raises(KeyError, match="tfds_text_feature"):
        source[0]
