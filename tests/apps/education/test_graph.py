"""Prerequisite graphs: edge readers (CSV, Junyi), validation (unknown skills, cycles) and queries."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from apps.education import graph
from apps.education.graph import GraphCycleWarning, PrerequisiteGraph
from core.errors import AdapterError, InputValidationError

EDGES_CSV = """\
prerequisite_skill,skill
counting,addition
addition,subtraction
addition,multiplication
multiplication,division
subtraction,division
division,fractions
"""
SKILLS = ["counting", "addition", "subtraction", "multiplication", "division", "fractions", "geometry"]

# The Junyi exercise table layout: UTF-8 BOM, quoted prerequisite lists, a repeated exercise row.
JUNYI_CSV = (
    "\ufeffname,live,prerequisites,h_position,v_position,creation_date,seconds_per_fast_problem,"
    "pretty_display_name,short_display_name,topic,area\n"
    "addition_1,TRUE,,10,1,2012-10-11 17:55:24.8056 UTC,5,加法 1,加法1,addition-subtraction,arithmetic\n"
    'multiplication_1,TRUE,"addition_1,addition_1",12,2,2012-10-11 17:55:24.8056 UTC,5,乘法 1,乘法1,'
    "multiplication-division,arithmetic\n"
    'division_1,FALSE,"multiplication_1,addition_1",14,3,2012-10-11 17:55:24.8056 UTC,7,除法 1,除法1,'
    "multiplication-division,arithmetic\n"
    'division_1,FALSE,"multiplication_1,addition_1",14,3,2014-06-20 03:42:01.7206 UTC,7,除法 1,除法1,'
    "multiplication-division,arithmetic\n"
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_edges_build_a_graph_with_queries(tmp_path: Path) -> None:
    edges = graph.read_prerequisite_csv(write(tmp_path, "edges.csv", EDGES_CSV))
    assert edges["source_row"].tolist() == [1, 2, 3, 4, 5, 6]
    g = PrerequisiteGraph.from_edges(edges, skills=SKILLS)
    assert len(g) == 7 and "geometry" in g  # an isolated known skill is kept
    order = g.topological_order()
    for prerequisite, skill in edges[["prerequisite_skill", "skill"]].itertuples(index=False):
        assert order.index(prerequisite) < order.index(skill)
    assert g.prerequisites("division") == ["multiplication", "subtraction"]
    assert g.ancestors("fractions") == ["counting", "addition", "multiplication", "subtraction", "division"]
    assert g.dependents("addition") == ["multiplication", "subtraction"]
    assert g.descendants("subtraction") == ["division", "fractions"]
    assert g.depth()["fractions"] == 4 and g.depth()["geometry"] == 0
    assert g.unmet_prerequisites("division", mastered={"subtraction"}) == ["multiplication"]


def test_unknown_skills_are_rejected_with_their_row(tmp_path: Path) -> None:
    edges = graph.read_prerequisite_csv(write(tmp_path, "edges.csv", EDGES_CSV + "fractions,algebra\n"))
    with pytest.raises(InputValidationError, match=r"row 7, column 'skill': got 'algebra'.*\['algebra'\]"):
        PrerequisiteGraph.from_edges(edges, skills=SKILLS)


def test_a_cycle_is_reported_by_name_and_rows() -> None:
    edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
    with pytest.raises(
        InputValidationError, match=r"prerequisite cycle a -> b -> c -> a \(rows \[1, 2, 3\]\)"
    ):
        PrerequisiteGraph.from_edges(edges)


def test_a_self_loop_is_a_cycle() -> None:
    with pytest.raises(InputValidationError, match="prerequisite cycle x -> x"):
        PrerequisiteGraph.from_edges([("w", "x"), ("x", "x")])


def test_breaking_cycles_is_opt_in_and_warns() -> None:
    edges = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "d")]
    with pytest.warns(GraphCycleWarning, match=r"removed 2 edge\(s\).*\('c', 'a'\).*\('d', 'd'\)"):
        g = PrerequisiteGraph.from_edges(edges, break_cycles=True)
    assert g.topological_order() == ["a", "b", "c", "d"]
    assert len(g.edges()) == 2


def test_missing_columns_and_empty_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputValidationError, match=r"missing column\(s\) \['prerequisite_skill'\]"):
        graph.read_prerequisite_csv(write(tmp_path, "bad.csv", "before,skill\na,b\n"))
    edges = graph.read_prerequisite_csv(write(tmp_path, "blank.csv", "prerequisite_skill,skill\na,b\n,c\n"))
    with pytest.raises(InputValidationError, match="row 2, column 'prerequisite_skill': got an empty value"):
        PrerequisiteGraph.from_edges(edges)
    with pytest.raises(AdapterError):
        graph.read_prerequisite_csv(tmp_path / "absent.csv")


def test_graph_round_trips_through_json() -> None:
    g = PrerequisiteGraph.from_edges([("a", "b"), ("a", "c"), ("b", "d")], skills=["a", "b", "c", "d", "e"])
    again = PrerequisiteGraph.from_dict(json.loads(json.dumps(g.to_dict())))
    assert again.topological_order() == g.topological_order()
    pd.testing.assert_frame_equal(again.edges(), g.edges())


def test_subgraph_keeps_only_edges_inside() -> None:
    g = PrerequisiteGraph.from_edges([("a", "b"), ("b", "c")])
    sub = g.subgraph(["a", "c"])
    assert sub.skills == ["a", "c"] and sub.edges().empty
    with pytest.raises(InputValidationError, match="'z' is not in the prerequisite graph"):
        g.ancestors("z")


def test_junyi_exercise_table_yields_edges(tmp_path: Path) -> None:
    exercises = graph.read_junyi_exercises(write(tmp_path, "junyi_Exercise_table.csv", JUNYI_CSV))
    assert exercises["name"].tolist() == ["addition_1", "multiplication_1", "division_1"]
    assert exercises["live"].tolist() == [True, True, False]
    assert exercises["prerequisites"].tolist() == [[], ["addition_1"], ["multiplication_1", "addition_1"]]
    edges = graph.junyi_prerequisite_edges(exercises)
    assert list(map(tuple, edges[["prerequisite_skill", "skill"]].to_numpy())) == [
        ("addition_1", "multiplication_1"),
        ("multiplication_1", "division_1"),
        ("addition_1", "division_1"),
    ]
    g = PrerequisiteGraph.from_edges(edges, skills=exercises["name"])
    assert g.ancestors("division_1") == ["addition_1", "multiplication_1"]


@pytest.mark.shared_data
def test_real_junyi_graph_has_the_documented_cycle(shared_education: Path) -> None:
    exercises = graph.read_junyi_exercises(
        shared_education / "junyi2015_prereq_graph" / "junyi_Exercise_table.csv"
    )
    edges = graph.junyi_prerequisite_edges(exercises)
    assert len(exercises) == 835 and len(edges) == 981  # 988 listed, 7 repeats within a cell or row
    with pytest.raises(InputValidationError, match="simplifying_radicals"):
        PrerequisiteGraph.from_edges(edges, skills=exercises["name"])
    with pytest.warns(GraphCycleWarning, match=r"removed 3 edge\(s\)"):
        g = PrerequisiteGraph.from_edges(edges, skills=exercises["name"], break_cycles=True)
    assert len(g) == 835 and len(g.edges()) == 978
