"""User labels beside a store: round trip, atomic writes, a corrupt file refused and kept, search."""

from __future__ import annotations

import json
import shutil

import pytest

from workbench.labels import LABELS_SUFFIX, Labels, LabelsError
from workbench.store import STORE_FILE, FeatureStore


def test_labels_round_trip_beside_the_store(tmp_path):
    store_path = tmp_path / "run-a.duckdb"
    labels = Labels(store_path)
    assert labels.path == tmp_path / ("run-a" + LABELS_SUFFIX)
    assert labels.get(3) == {"label": "", "notes": ""} and labels.all() == {}
    labels.set(3, "KING\nspeaker  tag ", "fires on the\nspeaker's name")
    labels.set(10, "", "only notes")
    assert labels.get(3) == {"label": "KING speaker tag", "notes": "fires on the\nspeaker's name"}
    again = Labels(store_path)  # a second reader (another explorer session) sees the file
    assert again.all() == {3: labels.get(3), 10: {"label": "", "notes": "only notes"}}
    on_disk = json.loads(labels.path.read_text())
    assert sorted(on_disk["labels"]) == ["10", "3"] and on_disk["version"] == 1
    again.set(3, "renamed")  # the first instance sees the change on its next read
    assert labels.get(3)["label"] == "renamed"
    labels.set(10, "", "")  # both empty: the entry goes
    assert 10 not in Labels(store_path).all()
    assert [p.name for p in tmp_path.iterdir()] == [labels.path.name]  # no temporaries left
    with pytest.raises(LabelsError, match=">= 0"):
        labels.set(-1, "x")
    with pytest.raises(LabelsError, match="integer"):
        labels.set("7", "x")


def test_a_corrupt_labels_file_is_refused_in_one_line_and_never_overwritten(tmp_path):
    labels = Labels(tmp_path / "features.duckdb")
    for bad in ("{not json", '{"labels": {"x": {"label": "a"}}}', '{"labels": {"1": {"label": 5}}}', "[]"):
        labels.path.write_text(bad)
        with pytest.raises(LabelsError, match="not a readable labels file") as caught:
            labels.get(1)
        assert "\n" not in str(caught.value)
        with pytest.raises(LabelsError):
            labels.set(1, "would overwrite")
        assert labels.path.read_text() == bad


def test_search_text_covers_labels_notes_and_summaries(tiny_run, tmp_path):
    shutil.copy(tiny_run / STORE_FILE, tmp_path / STORE_FILE)  # labels written beside a copy
    store = FeatureStore(tmp_path)
    summaries = store.summaries()
    feature, summary = next((f, s) for f, s in summaries.items() if s and "×" in s)
    word = summary.split(" ×")[0]
    found = store.search_text(word.upper(), limit=1000)  # case-insensitive
    expected = {f for f, s in summaries.items() if word.casefold() in s.casefold()}
    assert set(found.feature) == expected and found.attrs["total"] == len(expected)
    assert (found["where"] == "summary").all()
    store.labels.set(5, "Zebra crossing", "")
    store.labels.set(6, "", "notes about zebras")
    hits = store.search_text("zebra")
    assert hits.feature.tolist() == [5, 6] and hits["where"].tolist() == ["label", "notes"]
    assert hits.label.tolist() == ["Zebra crossing", ""] and hits.summary[0] == summaries[5]
    limited = store.search_text(word, limit=1)
    assert len(limited) == min(1, len(expected)) and limited.attrs["total"] == len(expected)
    assert store.search_text("   ").empty
