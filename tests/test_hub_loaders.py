"""The ``hf:`` loaders (text classification, MLM pool, public reference texts) on a local dataset built with ``datasets``, offline."""

from __future__ import annotations

import pytest

from mia_lightning.errors import MiaError


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory):
    """A Hugging Face dataset folder (train and test parquet files) that ``datasets.load_dataset(<folder>)`` reads offline."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
    datasets = pytest.importorskip("datasets")
    folder = tmp_path_factory.mktemp("hub") / "reviews"
    folder.mkdir()
    train = {
        "text": ["A moving, <br />well acted film.", "Dull and far too long.", "A moving, well acted film.", "I laughed all the way through it.",
                 "The plot made no sense at all.", "Wonderful music and a clever script."],
        "label": [1, 0, 1, 1, 0, 1],
        "author": ["ann", "bob", "cid", "ann", "bob", "dee"],
    }
    datasets.Dataset.from_dict(train).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_dict({"text": ["Public text one.", "Another public sentence."], "label": [0, 1], "author": ["x", "y"]}).to_parquet(
        str(folder / "test.parquet"))
    yield folder
    mp.undo()


def test_text_classification_loader_reads_the_hub_dataset(local_dataset):
    from mia_lightning.data.text import load_texts

    texts = load_texts(f"hf:{local_dataset}", "text", "label", "train")
    assert texts.class_names == ("0", "1")
    assert texts.texts[0] == "A moving, well acted film."  # <br /> cleaned, and the repeated review dropped before any split
    assert len(texts.texts) == 5 and texts.labels.tolist() == [1, 0, 1, 0, 1]
    assert load_texts(f"hf:{local_dataset}", "text", "label", "test").texts == ("Public text one.", "Another public sentence.")


def test_mlm_pool_and_public_texts_read_the_hub_dataset(local_dataset):
    from mia_lightning.data.mlm import load_text_pool, public_texts

    pool = load_text_pool(f"hf:{local_dataset}", "text", "author")
    assert sorted(set(pool.users)) == ["ann", "bob", "cid", "dee"] and len(pool.texts) == len(pool.users)
    assert pool.groups.max() == 3
    assert public_texts(f"hf:{local_dataset}", "text") == ["A moving, <br />well acted film.", "Dull and far too long.", "A moving, well acted film.",
                                                            "I laughed all the way through it.", "The plot made no sense at all.",
                                                            "Wonderful music and a clever script."]


def test_hub_errors_are_one_line(local_dataset):
    from mia_lightning.data.text import load_texts

    with pytest.raises(MiaError, match=r"no column 'sentiment' \(columns: text, label, author\)"):
        load_texts(f"hf:{local_dataset}", "text", "sentiment", "train")
    with pytest.raises(MiaError, match=r"cannot load split 'validation'"):
        load_texts(f"hf:{local_dataset}", "text", "label", "validation")
