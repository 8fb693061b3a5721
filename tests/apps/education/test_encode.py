"""Education encoding: vocabularies, per-student sequences and pyKT windows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from apps.education import adapters, encode
from apps.education.schema import PAD_INDEX, UNKNOWN_INDEX, Vocabulary
from core.errors import ConfigError, InputValidationError


def interactions(
    rows: list[tuple[str, int, str, str, int]], *, timestamps: list[str] | None = None
) -> pd.DataFrame:
    """Canonical frame from (user_id, order, item_id, skill_id, correct) rows."""
    raw = pd.DataFrame(rows, columns=["user_id", "order", "item_id", "skill_id", "correct"])
    if timestamps is not None:
        raw["timestamp"] = timestamps
    return adapters.validate_interactions(raw).frame


def long_student(n: int, user: str = "u") -> pd.DataFrame:
    return interactions([(user, i, f"q{i % 5}", f"s{i % 3}", i % 2) for i in range(n)])


def test_vocabulary_round_trips_through_json() -> None:
    vocab = Vocabulary.build(pd.Series(["b", "a", "c", "a"]), name="item_id")
    again = Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert again == vocab and len(again) == 5
    assert again.encode(["a", "b", "c"]).tolist() == [2, 3, 4]
    assert again.decode([PAD_INDEX, UNKNOWN_INDEX, 2]) == ["<pad>", "<unk>", "a"]


def test_vocabulary_min_count_and_unknown_bucket() -> None:
    vocab = Vocabulary.build(["a", "a", "b"], name="skill_id", min_count=2)
    assert vocab.tokens == ("a",)
    assert vocab.encode(["a", "b"], on_unknown="unknown").tolist() == [2, UNKNOWN_INDEX]
    with pytest.raises(InputValidationError, match=r"column 'skill_id'.*first at row 8: got 'b'"):
        vocab.encode(["a", "b"], row_labels=[7, 8])


def test_vocabulary_from_incompatible_dict_is_rejected() -> None:
    with pytest.raises(ConfigError, match="missing key"):
        Vocabulary.from_dict({"name": "x"})
    with pytest.raises(ConfigError, match="incompatible version"):
        Vocabulary.from_dict({"name": "x", "pad_index": 1, "unknown_index": 0, "tokens": []})


def test_sequences_sort_by_time_stably_and_pad_skills() -> None:
    frame = interactions(
        [
            ("alice", 0, "q1", "add", 1),
            ("bob", 0, "q2", "sub", 0),
            ("alice", 1, "q3", "add|sub", 0),
            ("alice", 2, "q2", "sub", 1),
        ],
        timestamps=[
            "2024-01-01T10:00:00Z",
            "2024-01-01T09:00:00Z",
            "2024-01-01T10:05:00Z",
            "2024-01-01T10:05:00Z",
        ],
    )
    items, skills = encode.build_vocabularies(frame)
    sequences = encode.to_sequences(frame, items, skills)
    assert sequences.user_ids.tolist() == ["alice", "bob"]
    assert sequences.offsets.tolist() == [0, 3, 4]
    alice = sequences.student(0)
    assert items.decode(alice["items"]) == ["q1", "q3", "q2"]  # equal timestamps keep source order
    assert alice["skills"].shape == (3, 2)
    assert [skills.decode(row) for row in alice["skills"]] == [
        ["add", "<pad>"],
        ["add", "sub"],
        ["sub", "<pad>"],
    ]
    assert alice["elapsed_s"].tolist() == [0.0, 300.0, 0.0]
    assert alice["correct"].tolist() == [1, 0, 1]


def test_sequences_without_timestamps_sort_by_order() -> None:
    frame = interactions([("u", 2, "c", "s", 1), ("u", 0, "a", "s", 0), ("u", 1, "b", "s", 1)])
    items, skills = encode.build_vocabularies(frame)
    sequences = encode.to_sequences(frame, items, skills)
    assert items.decode(sequences.items) == ["a", "b", "c"]
    assert np.isnan(sequences.elapsed_s).all()


def test_unknown_ids_at_prediction_time_name_the_row() -> None:
    train = interactions([("u", 0, "q1", "s1", 1), ("u", 1, "q2", "s1", 0)])
    items, skills = encode.build_vocabularies(train)
    new = interactions([("v", 0, "q1", "s1", 1), ("v", 1, "q9", "s1", 1), ("v", 2, "q2", "s7|s1", 0)])
    with pytest.raises(InputValidationError, match=r"column 'item_id'.*first at row 2: got 'q9'"):
        encode.to_sequences(new, items, skills)
    sequences = encode.to_sequences(new, items, skills, on_unknown="unknown")
    assert sequences.items.tolist() == [2, UNKNOWN_INDEX, 3]
    assert sequences.skills[2].tolist() == [UNKNOWN_INDEX, 2]


def test_sliding_windows_score_every_answer_once_from_the_previous_maxlen_minus_one() -> None:
    frame = pd.concat([long_student(7, "long"), long_student(3, "short"), long_student(2, "tiny")])
    items, skills = encode.build_vocabularies(frame)
    sequences = encode.to_sequences(frame, items, skills)
    windows = encode.make_windows(sequences, maxlen=4, mode="sliding", min_length=3)
    # long: [0..3] scoring 1..3, then [1..4], [2..5], [3..6] scoring only 4, 5, 6; short: one window; tiny: dropped
    assert windows.student.tolist() == [0, 0, 0, 0, 1]
    assert windows.position[:4].tolist() == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]]
    assert windows.target_mask.tolist() == [
        [False, True, True, True],
        [False, False, False, True],
        [False, False, False, True],
        [False, False, False, True],
        [False, True, True, False],
    ]
    assert windows.attention_mask[4].tolist() == [True, True, True, False]
    scored = windows.position[windows.target_mask]
    owners = np.broadcast_to(windows.student[:, None], windows.position.shape)[windows.target_mask]
    assert sorted(zip(owners.tolist(), scored.tolist(), strict=True)) == [(0, p) for p in range(1, 7)] + [
        (1, 1),
        (1, 2),
    ]
    # the gathered values are the student's own answers at those positions
    long_seq = sequences.student(0)
    assert windows.correct[3].tolist() == long_seq["correct"][3:7].tolist()
    assert windows.items[4, 3] == PAD_INDEX and windows.skills.shape == (5, 4, 1)


def test_chunks_follow_pykt_training_split() -> None:
    frame = pd.concat([long_student(n, f"u{n}") for n in (9, 10, 11, 2)])
    items, skills = encode.build_vocabularies(frame)
    windows = encode.make_windows(encode.to_sequences(frame, items, skills), maxlen=4, mode="chunks")
    # 9 -> 4+4 (remainder 1 dropped); 10 -> 4+4 (remainder 2 dropped); 11 -> 4+4+3; 2 -> dropped
    assert windows.student.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert windows.attention_mask.sum(axis=1).tolist() == [4, 4, 4, 4, 4, 4, 3]
    assert windows.position[6, :3].tolist() == [8, 9, 10]
    assert windows.target_mask[:, 0].sum() == 0 and windows.target_mask.sum() == 7 * 3 - 1


def test_window_options_are_checked() -> None:
    frame = long_student(5)
    items, skills = encode.build_vocabularies(frame)
    sequences = encode.to_sequences(frame, items, skills)
    with pytest.raises(ConfigError, match="mode must be"):
        encode.make_windows(sequences, mode="overlap")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="maxlen must be at least 2"):
        encode.make_windows(sequences, maxlen=1)
