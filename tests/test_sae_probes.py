"""k-sparse probes: the k = 1 probe finds a planted neuron; task labels follow the text."""

from __future__ import annotations

import pytest
import torch

from sae.probe_tasks import line_start, speaker_name, task_labels, verse_reference, word_continuation
from sae.probes import rank_features, split_windows, sweep
from workbench.errors import ConfigError


@pytest.mark.parametrize("ranking", ["mean_diff", "f_stat"])
def test_the_k1_probe_finds_the_planted_neuron(ranking):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 48, generator=generator)
    y = x[:, 29] + 0.2 * torch.randn(6000, generator=generator) > 0.8  # rare positives: 20%
    rows = sweep(x[:4000], y[:4000], x[4000:], y[4000:], (1, 4), ranking)
    assert rows[0]["k"] == 1 and rows[0]["features_chosen"] == [29]
    assert rows[0]["balanced_accuracy"] > 0.9 and rows[0]["f1"] > 0.8
    assert rows[1]["k"] == 4 and 29 in rows[1]["features_chosen"]


def test_ranking_needs_both_classes():
    with pytest.raises(ConfigError, match="both classes"):
        rank_features(torch.randn(10, 3), torch.zeros(10, dtype=torch.bool))


def test_task_labels_follow_the_text():
    strings = ["", "\n", "BEN", "EDICK", ":", "\n", "A", " mir", "acle", "!", "\n", "9", ":", "29", " And"]
    assert speaker_name(strings) == [False, False, True, True, False, False] + [False] * 9
    assert line_start(strings) == [
        False,
        False,
        True,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    assert (
        word_continuation(strings)[8] and word_continuation(strings)[3] and not word_continuation(strings)[7]
    )
    assert verse_reference(strings) == [False] * 11 + [True, False, True, False]
    windows = torch.tensor([[0, 1, 2], [0, 2, 1]])
    labels = task_labels("line_start", windows, {0: "<bos>", 1: "\n", 2: "Hark"}.__getitem__)
    assert labels.tolist() == [[False, False, True], [False, False, False]]


def test_windows_split_without_overlap():
    train, test = split_windows(50, 0.2, seed=1)
    assert len(test) == 10 and len(train) == 40 and not set(train.tolist()) & set(test.tolist())
