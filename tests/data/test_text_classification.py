"""Labelled texts through Hugging Face `datasets` (kdrun/data/text_classification.py): a hub name that cannot be
reached and a file without the named columns each say so in one line."""
import pytest

from kdrun.errors import DataError


def test_hub_dataset_without_network_fails_fast_naming_data_path(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from kdrun.data.text_classification import load

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # kdrun's reachability probe reads it per call
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"data.name=ag_news.*data.path="):
        load(name="ag_news", path=None, text_field="text", label_field="label", train_split="train", eval_split=None,
             eval_fraction=0.2, split_salt="s", seed=1, max_train=None, max_eval=None)
    assert time.perf_counter() - t0 < 15  # no half-minute of retries


def test_local_csv_through_datasets_names_missing_columns(tmp_path):
    from kdrun.data.text_classification import load

    f = tmp_path / "d.csv"
    f.write_text("sentence,label\nhello there,a\n")
    with pytest.raises(DataError, match=r"data.text_field=text: .* has columns \['sentence', 'label'\]"):
        load(name=None, path=str(f), text_field="text", label_field="label", train_split="train", eval_split=None,
             eval_fraction=0.2, split_salt="s", seed=1, max_train=None, max_eval=None)
