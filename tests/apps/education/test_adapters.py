"""Education adapters: canonical CSV/Parquet/SQL, pyKT, DKVMN and ASSISTments readers, rules, quarantine."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from apps.education import adapters, encode, formats
from apps.education.schema import INTERACTION_DTYPES, REJECT_REASON_COLUMN, Interaction, interactions_to_frame
from core.errors import AdapterError, ConfigError, InputValidationError

# Two students x six answers; alice's 4th answer (a two-skill item) is logged before her 3rd in time.
CANONICAL_CSV = """\
user_id,timestamp,item_id,skill_id,correct,skill_name,attempt_count,response_time_ms
alice,2024-01-01T10:00:00Z,q1,add,1,Addition,1,12000
alice,2024-01-01T10:01:00Z,q2,add,0,Addition,2,30000
alice,2024-01-01T10:03:00Z,q3,sub,1,Subtraction,1,9000
alice,2024-01-01T10:02:00Z,q4,add|sub,1,Addition|Subtraction,1,15000
alice,2024-01-02T09:00:00Z,q5,mul,0,Multiplication,3,
alice,2024-01-02T09:05:00Z,q1,add,1,Addition,1,8000
bob,2024-01-01T11:00:00Z,q1,add,0,Addition,2,21000
bob,2024-01-01T11:02:00Z,q3,sub,0,Subtraction,2,25000
bob,2024-01-01T11:04:00Z,q2,add,1,Addition,1,7000
bob,2024-01-01T11:05:00Z,q5,mul,1,Multiplication,1,11000
bob,2024-01-01T11:07:00Z,q4,add|sub,1,Addition|Subtraction,1,16000
bob,2024-01-01T11:09:00Z,q3,sub,1,Subtraction,1,6000
"""


def canonical_table() -> pd.DataFrame:
    return pd.read_csv(io.StringIO(CANONICAL_CSV), dtype="string", keep_default_na=False, na_values=[""])


def write_csv(tmp_path: Path, table: pd.DataFrame, name: str = "interactions.csv") -> Path:
    path = tmp_path / name
    table.to_csv(path, index=False)
    return path


def test_canonical_csv_reads_with_canonical_dtypes(tmp_path: Path) -> None:
    log = adapters.read_canonical(write_csv(tmp_path, canonical_table()))
    assert dict(log.frame.dtypes.astype(str)) == INTERACTION_DTYPES
    assert (log.n_students, log.n_interactions, log.skills) == (2, 12, ["add", "mul", "sub"])
    assert log.rejected.empty
    assert log.frame.loc[3, "skill_id"] == "add|sub"
    assert log.frame.loc[0, "timestamp"] == pd.Timestamp("2024-01-01T10:00:00Z")
    assert pd.isna(log.frame.loc[4, "response_time_ms"])
    assert log.frame["source_row"].tolist() == list(range(1, 13))


def test_canonical_parquet_round_trip(tmp_path: Path) -> None:
    first = adapters.read_canonical(write_csv(tmp_path, canonical_table())).frame
    path = tmp_path / "interactions.parquet"
    first.drop(columns="source_row").to_parquet(path)
    second = adapters.read_interactions(path).frame
    pd.testing.assert_frame_equal(first, second)


def test_canonical_sql_table_and_query(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tutor.db'}"
    engine = sa.create_engine(url)
    canonical_table().to_sql("answers", engine, index=False)
    engine.dispose()
    by_table = adapters.read_sql_interactions(url, table="answers")
    by_query = adapters.read_interactions(url, query="SELECT * FROM answers WHERE user_id = 'bob'")
    assert by_table.n_interactions == 12
    assert by_query.n_interactions == 6 and set(by_query.frame["user_id"]) == {"bob"}
    assert by_table.frame["timestamp"].dt.tz is not None


def test_sql_needs_exactly_one_of_table_and_query() -> None:
    with pytest.raises(ConfigError, match="exactly one of table"):
        adapters.read_sql_interactions("sqlite://", table="a", query="SELECT 1")


def test_sql_errors_become_adapter_errors(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="cannot read interactions"):
        adapters.read_sql_interactions(f"sqlite:///{tmp_path / 'empty.db'}", table="missing")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("user_id", "", r"row 3 .*column 'user_id': got <NA>; expected a non-empty user_id"),
        ("item_id", "", r"row 3 .*column 'item_id': got <NA>; expected a non-empty item_id"),
        ("skill_id", " ", r"row 3 .*column 'skill_id': got ' '; expected a non-empty skill_id"),
        ("correct", "2", r"row 3 \(user_id='alice'\), column 'correct': got '2'; expected 0 or 1"),
        ("correct", "yes", r"row 3 .*column 'correct': got 'yes'; expected 0 or 1"),
        ("timestamp", "yesterday", r"row 3 .*column 'timestamp': got 'yesterday'; expected a date-time"),
        ("attempt_count", "-1", r"row 3 .*column 'attempt_count': got '-1'; expected a non-negative integer"),
        ("response_time_ms", "fast", r"row 3 .*column 'response_time_ms': got 'fast'; expected a number"),
    ],
)
def test_each_rule_rejects_a_bad_row_naming_it(tmp_path: Path, column: str, value: str, message: str) -> None:
    table = canonical_table()
    table.loc[2, column] = value
    with pytest.raises(InputValidationError, match=message):
        adapters.read_canonical(write_csv(tmp_path, table))


def test_unparseable_order_is_rejected(tmp_path: Path) -> None:
    table = canonical_table().drop(columns="timestamp")
    table.insert(1, "order", [str(i) for i in range(12)])
    table.loc[4, "order"] = "5th"
    with pytest.raises(InputValidationError, match=r"row 5 .*column 'order': got '5th'; expected an integer"):
        adapters.read_canonical(write_csv(tmp_path, table))


def test_missing_columns_are_named(tmp_path: Path) -> None:
    table = canonical_table().drop(columns=["correct", "timestamp"])
    with pytest.raises(
        InputValidationError, match=r"missing column\(s\) \['correct', 'order or timestamp'\]"
    ):
        adapters.read_canonical(write_csv(tmp_path, table))


def test_quarantine_sets_bad_rows_aside_and_loses_nothing(tmp_path: Path) -> None:
    table = canonical_table()
    table.loc[1, "user_id"] = ""
    table.loc[4, "correct"] = "2"
    table.loc[7, ["timestamp", "correct"]] = ["soon", "-1"]
    log = adapters.read_canonical(write_csv(tmp_path, table), on_invalid="quarantine")
    assert log.n_interactions == 9 and len(log.rejected) == 3
    assert sorted([*log.frame["source_row"], *log.rejected["source_row"]]) == list(range(1, 13))
    assert log.rejected["source_row"].tolist() == [2, 5, 8]
    reasons = log.rejected[REJECT_REASON_COLUMN].tolist()
    assert reasons[0] == "user_id: expected a non-empty user_id"
    assert "correct: expected 0 or 1" in reasons[2] and "timestamp" in reasons[2]
    assert log.rejected.loc[1, "correct"] == "2"  # the value as the source wrote it
    for name in ("rejected.csv", "rejected.parquet"):
        path = adapters.write_quarantine(log.rejected, tmp_path / "out" / name)
        back = pd.read_csv(path) if name.endswith(".csv") else pd.read_parquet(path)
        assert len(back) == 3 and REJECT_REASON_COLUMN in back.columns


def test_negative_response_time_keeps_the_row_and_warns(tmp_path: Path) -> None:
    table = canonical_table()
    table.loc[0, "response_time_ms"] = "-5"
    with pytest.warns(adapters.InteractionDataWarning, match="1 negative response_time_ms"):
        log = adapters.read_canonical(write_csv(tmp_path, table))
    assert log.n_interactions == 12 and pd.isna(log.frame.loc[0, "response_time_ms"])


def test_bad_options_and_files_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown interaction format 'csv'"):
        adapters.read_interactions(tmp_path / "x.csv", format="csv")
    with pytest.raises(ConfigError, match="on_invalid must be"):
        adapters.validate_interactions(canonical_table(), on_invalid="drop")  # type: ignore[arg-type]
    with pytest.raises(AdapterError, match="file not found"):
        adapters.read_canonical(tmp_path / "absent.csv")
    with pytest.raises(AdapterError, match=r"unsupported file type '\.xlsx'"):
        adapters.read_canonical(tmp_path / "answers.xlsx")


def test_interaction_records_validate_like_files() -> None:
    records = [
        Interaction(user_id="new", item_id="q1", skill_id="add", correct=1, order=0),
        Interaction(user_id="new", item_id="q2", skill_id="add", correct=0, order=1),
    ]
    log = adapters.validate_interactions(interactions_to_frame(records))
    assert log.frame["correct"].tolist() == [1, 0] and log.frame["timestamp"].isna().all()


# --- pyKT -------------------------------------------------------------------------------------------

PYKT_TRAIN = """\
fold,uid,concepts,responses
0,101,"3,3,7,7,7","1,0,1,1,0"
1,102,"7,5,5,-1,-1","0,1,1,-1,-1"
"""


def test_pykt_rows_explode_into_interactions(tmp_path: Path) -> None:
    path = tmp_path / "train_valid.csv"
    path.write_text(PYKT_TRAIN)
    log = adapters.read_pykt(path)
    frame = log.frame
    assert (log.n_students, log.n_interactions) == (2, 8)  # the -1 padding is dropped
    assert frame["user_id"].tolist() == ["101"] * 5 + ["102"] * 3
    assert frame["order"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert frame["skill_id"].tolist() == ["3", "3", "7", "7", "7", "7", "5", "5"]
    assert (frame["item_id"] == frame["skill_id"]).all()  # no question ids in this file
    assert frame["correct"].tolist() == [1, 0, 1, 1, 0, 0, 1, 1]
    assert frame["fold"].tolist() == [0] * 5 + [1] * 3
    assert frame["source_row"].tolist() == [1] * 5 + [2] * 3


def test_pykt_test_file_with_cidxs(tmp_path: Path) -> None:
    path = tmp_path / "test.csv"
    path.write_text('fold,uid,concepts,responses,cidxs\n-1,6256,"54,54,54,3,3","1,1,1,1,0","0,1,2,3,4"\n')
    frame = adapters.read_interactions(path, format="pykt").frame
    assert frame["skill_id"].tolist() == ["54", "54", "54", "3", "3"] and frame["fold"].eq(-1).all()


def test_pykt_multi_concept_questions_are_one_interaction(tmp_path: Path) -> None:
    expanded = tmp_path / "expanded.csv"
    expanded.write_text(
        'fold,uid,questions,concepts,responses,is_repeat\n0,7,"q1,q2,q2,q3","c1,c2,c3,c1","1,0,0,1","0,0,1,0"\n'
    )
    joined = tmp_path / "joined.csv"
    joined.write_text('fold,uid,questions,concepts,responses\n0,7,"q1,q2,q3","c1,c2_c3,c1","1,0,1"\n')
    for path in (expanded, joined):
        frame = adapters.read_pykt(path).frame
        assert frame["item_id"].tolist() == ["q1", "q2", "q3"]
        assert frame["skill_id"].tolist() == ["c1", "c2|c3", "c1"]
        assert frame["correct"].tolist() == [1, 0, 1]


def test_pykt_chunks_of_one_student_continue_its_order(tmp_path: Path) -> None:
    path = tmp_path / "train_valid_sequences.csv"
    path.write_text('fold,uid,concepts,responses\n0,9,"1,1,1","1,0,1"\n0,9,"2,2,-1","0,1,-1"\n')
    frame = adapters.read_pykt(path).frame
    assert frame["order"].tolist() == [0, 1, 2, 3, 4]


def test_pykt_lists_of_unequal_length_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('fold,uid,concepts,responses\n0,1,"3,3","1,0"\n0,2,"3,3,3","1,0"\n')
    with pytest.raises(
        InputValidationError, match=r"row 2 \(uid='2'\): 'concepts' has 3 entries but 'responses' has 2"
    ):
        adapters.read_pykt(path)


def test_pykt_bad_response_names_row_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text('fold,uid,concepts,responses\n0,1,"3,3,4","1,0,2"\n')
    with pytest.raises(InputValidationError, match=r"row 1 \(user_id='1'\), column 'correct': got '2'"):
        adapters.read_pykt(path)
    log = adapters.read_pykt(path, on_invalid="quarantine")
    assert log.n_interactions == 2 and log.rejected["order"].tolist() == [2]


# --- DKVMN ------------------------------------------------------------------------------------------

DKVMN_TEXT = """\
5
4,5,8,4,5
1,1,0,0,0
2
4,5
1,0
"""
PAIRS = {("4", "5")}


def write_dkvmn(tmp_path: Path, text: str = DKVMN_TEXT) -> Path:
    path = tmp_path / "assist_train.csv"
    path.write_text(text)
    return path


def test_dkvmn_kc_level_rows(tmp_path: Path) -> None:
    log = adapters.read_dkvmn(write_dkvmn(tmp_path), regroup=False)
    frame = log.frame
    assert frame["user_id"].tolist() == ["assist_train:1"] * 5 + ["assist_train:2"] * 2
    assert frame["skill_id"].tolist() == ["4", "5", "8", "4", "5", "4", "5"]
    assert frame["source_row"].tolist() == [1] * 5 + [4] * 2


def test_dkvmn_multi_skill_rows_become_one_interaction_per_item(tmp_path: Path) -> None:
    log = adapters.read_dkvmn(write_dkvmn(tmp_path), multiskill_pairs=PAIRS)
    frame = log.frame
    # student 1: {4,5} correct, 8 wrong, {4,5} wrong; student 2: {4,5} with answers 1/0 -> first kept
    assert frame["skill_id"].tolist() == ["4|5", "8", "4|5", "4|5"]
    assert frame["item_id"].tolist() == frame["skill_id"].tolist()
    assert frame["correct"].tolist() == [1, 0, 0, 1]
    assert frame["n_expanded_rows"].tolist() == [2, 1, 2, 2]
    # one prediction per item: a window scores every interaction after the first, never a copied answer
    items, skills = encode.build_vocabularies(frame)
    windows = encode.make_windows(encode.to_sequences(frame, items, skills), min_length=1)
    assert int(windows.target_mask.sum()) == len(frame) - log.n_students


def test_dkvmn_split_policy_keeps_disagreeing_rows_apart(tmp_path: Path) -> None:
    frame = adapters.read_dkvmn(write_dkvmn(tmp_path), multiskill_pairs=PAIRS, conflict="split").frame
    assert frame["skill_id"].tolist() == ["4|5", "8", "4|5", "4", "5"]


def test_regrouping_never_puts_a_skill_twice_in_one_item() -> None:
    raw = formats.parse_dkvmn(["4", "4,5,4,5", "1,1,0,0"], user_prefix="u")
    frame = adapters.validate_interactions(raw).frame
    grouped = formats.regroup_multiskill(frame, {("4", "5"), ("5", "4")})
    assert grouped["skill_id"].tolist() == ["4|5", "4|5"]
    assert grouped["correct"].tolist() == [1, 0]


def test_multiskill_pairs_need_count_and_agreement() -> None:
    # (1, 2) always shares its answer; (2, 3) does half of the time; (4, 5) agrees but is rare.
    skills = ["1", "2", "3"] * 40 + ["4", "5"]
    correct = [1, 1, 0] * 20 + [0, 0, 0] * 20 + [1, 1]
    frame = pd.DataFrame(
        {"user_id": "u", "order": range(len(skills)), "skill_id": skills, "correct": correct}
    )
    assert formats.estimate_multiskill_pairs(frame, min_count=10, min_agreement=0.97) == {("1", "2")}


def test_dkvmn_broken_structure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(InputValidationError, match="expected 3 lines per student"):
        adapters.read_dkvmn(write_dkvmn(tmp_path, "2\n4,5\n"))
    with pytest.raises(InputValidationError, match=r"lines 1-3: count says 3 interactions but there are 2"):
        adapters.read_dkvmn(write_dkvmn(tmp_path, "3\n4,5\n1,1\n"))
    with pytest.raises(InputValidationError, match=r"row 1 .*column 'correct': got '7'"):
        adapters.read_dkvmn(write_dkvmn(tmp_path, "2\n4,5\n1,7\n"))


def test_dkvmn_skill_names(tmp_path: Path) -> None:
    mapping = tmp_path / "skill_mapping.txt"
    mapping.write_text('4\tArea Rectangle\n5\t"Parts of a Polyomial, Terms"\n8\tCircumference \n')
    names = adapters.read_dkvmn_skill_names(mapping)
    assert names == {"4": "Area Rectangle", "5": "Parts of a Polyomial, Terms", "8": "Circumference"}
    frame = adapters.read_dkvmn(write_dkvmn(tmp_path), skill_names=names, multiskill_pairs=PAIRS).frame
    assert frame.loc[0, "skill_name"] == "Area Rectangle|Parts of a Polyomial, Terms"
    assert frame.loc[1, "skill_name"] == "Circumference"


# --- raw ASSISTments --------------------------------------------------------------------------------

ASSIST_HEADER = (
    "order_id,assignment_id,user_id,assistment_id,problem_id,original,correct,attempt_count,"
    "ms_first_response,tutor_mode,answer_type,sequence_id,student_class_id,position,type,"
    "base_sequence_id,skill_id,skill_name,teacher_id,school_id,hint_count,hint_total,overlap_time,"
    "template_id,answer_id,answer_text,first_action,bottom_hint,opportunity,opportunity_original"
)


def assist_row(
    order: int, user: int, problem: int, correct: int, skill: str, name: str, ms: int = 5000
) -> str:
    return (
        f"{order},277618,{user},33139,{problem},1,{correct},1,{ms},tutor,algebra,5948,13241,126,"
        f'MasterySection,5948,{skill},"{name}",22763,73,0,3,{ms},30799,,26,0,,1,1'
    )


def assist_csv(tmp_path: Path, rows: list[str]) -> Path:
    path = tmp_path / "skill_builder_data.csv"
    path.write_text("\n".join([ASSIST_HEADER, *rows]) + "\n")
    return path


ASSIST_ROWS = [
    assist_row(33022537, 64525, 51424, 1, "1", "Box and Whisker"),
    assist_row(35450204, 70363, 51444, 0, "10", "Venn Diagram"),
    assist_row(35450204, 70363, 51444, 0, "13", "Equation Solving Two or Fewer Steps"),
    assist_row(35450204, 70363, 51444, 0, "13", "Equation Solving Two or Fewer Steps"),  # exact repeat
    assist_row(33022709, 64525, 51435, 1, "1", "Box and Whisker, Reading"),
]


def test_assistments_rows_sharing_order_id_become_one_interaction(tmp_path: Path) -> None:
    log = adapters.read_assistments(assist_csv(tmp_path, ASSIST_ROWS))
    frame = log.frame
    assert log.n_interactions == 3 and log.n_students == 2
    assert frame["skill_id"].tolist() == ["1", "10|13", "1"]
    assert frame.loc[1, "skill_name"] == "Venn Diagram|Equation Solving Two or Fewer Steps"
    assert frame["item_id"].tolist() == ["51424", "51444", "51435"]
    assert frame["order"].tolist() == [33022537, 35450204, 33022709]
    assert frame["response_time_ms"].tolist() == [5000.0] * 3
    assert frame["source_row"].tolist() == [1, 2, 5]
    assert {"original", "assignment_id", "template_id"} <= set(frame.columns)


def test_assistments_missing_skill_is_rejected_or_quarantined(tmp_path: Path) -> None:
    rows = [*ASSIST_ROWS, assist_row(35450311, 70363, 51455, 0, "", "")]
    path = assist_csv(tmp_path, rows)
    with pytest.raises(InputValidationError, match=r"row 6 \(user_id='70363'\), column 'skill_id'"):
        adapters.read_assistments(path)
    log = adapters.read_assistments(path, on_invalid="quarantine")
    assert log.n_interactions == 3 and log.rejected["source_row"].tolist() == [6]
    assert log.rejected.loc[0, "order_id"] == "35450311"  # original column names are kept


def test_assistments_rows_of_one_answer_must_agree(tmp_path: Path) -> None:
    rows = [*ASSIST_ROWS, assist_row(33022709, 64525, 51435, 0, "2", "Other")]
    path = assist_csv(tmp_path, rows)
    with pytest.raises(InputValidationError, match="row 5: rows sharing its order_id disagree"):
        adapters.read_assistments(path)
    log = adapters.read_assistments(path, on_invalid="quarantine")
    assert log.n_interactions == 2
    assert log.rejected["source_row"].tolist() == [5, 6]


def test_assistments_column_names_appear_in_messages(tmp_path: Path) -> None:
    rows = [assist_row(1, 5, 7, 1, "3", "x", ms=0).replace(",7,1,1,", ",,1,1,", 1)]
    with pytest.raises(InputValidationError, match="column 'problem_id'"):
        adapters.read_assistments(assist_csv(tmp_path, rows))


# --- the real datasets in ../shared/data (subsets, for speed) --------------------------------------


def head_lines(source: Path, target: Path, n_lines: int) -> Path:
    with source.open(encoding="utf-8") as handle:
        target.write_text("".join(line for _, line in zip(range(n_lines), handle, strict=False)))
    return target


@pytest.mark.shared_data
def test_real_pykt_assist2015_subset(shared_education: Path, tmp_path: Path) -> None:
    source = shared_education / "assist2015_pykt" / "test.csv"
    path = head_lines(source, tmp_path / "test.csv", 301)  # header + 300 students
    log = adapters.read_pykt(path)
    table = pd.read_csv(path)
    assert log.n_students == 300
    assert log.n_interactions == int(table["responses"].str.count(",").add(1).sum())
    assert log.frame["correct"].isin([0, 1]).all() and log.rejected.empty
    items, skills = encode.build_vocabularies(log.frame)
    sequences = encode.to_sequences(log.frame, items, skills)
    windows = encode.make_windows(sequences, mode="sliding")
    assert int(windows.target_mask.sum()) == sequences.n_interactions - len(sequences)


@pytest.mark.shared_data
def test_real_dkvmn_assist2009_subset_regroups(shared_education: Path, tmp_path: Path) -> None:
    folder = shared_education / "assist2009_dkvmn"
    path = head_lines(folder / "assist2009_updated_test.csv", tmp_path / "test.csv", 600)  # 200 students
    names = adapters.read_dkvmn_skill_names(folder / "assist2009_updated_skill_mapping.txt")
    assert len(names) == 110
    kc = adapters.read_dkvmn(path, regroup=False, skill_names=names)
    pairs = formats.estimate_multiskill_pairs(kc.frame, min_count=20)
    grouped = adapters.read_dkvmn(path, skill_names=names, multiskill_pairs=pairs)
    assert grouped.n_students == kc.n_students == 200
    assert grouped.n_interactions < kc.n_interactions
    assert grouped.frame["n_expanded_rows"].sum() == kc.n_interactions
    assert grouped.frame["skill_name"].notna().all()
    multi = grouped.frame.loc[grouped.frame["n_expanded_rows"] > 1, "skill_id"]
    assert multi.str.contains("|", regex=False).all() and len(multi) > 0
    # no two single-skill interactions of one student in a row form a listed pair any more
    ordered = grouped.frame.sort_values(["user_id", "order"], kind="stable")
    users = ordered["user_id"].to_numpy(dtype=object)
    skills = ordered["skill_id"].to_numpy(dtype=object)
    leaky = [(skills[t - 1], skills[t]) in pairs for t in range(1, len(ordered)) if users[t - 1] == users[t]]
    assert not any(leaky)
