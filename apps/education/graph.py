"""Prerequisite graphs over skills: edge-list readers (CSV, Junyi exercise table), validation and queries.

An edge `(prerequisite_skill, skill)` means `prerequisite_skill` should be mastered before `skill`. A
valid graph is a DAG over known skills; `PrerequisiteGraph.from_edges` rejects unknown skills and cycles
with an `InputValidationError` that names them (or, only when asked, breaks cycles and warns).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Optional, Union

import networkx as nx
import pandas as pd

from core.errors import AdapterError, ConfigError, InputValidationError

logger = logging.getLogger(__name__)

EDGE_COLUMNS: tuple[str, str] = ("prerequisite_skill", "skill")
"""Columns of an edge list: the prerequisite, then the skill that depends on it."""

JUNYI_COLUMNS: tuple[str, ...] = (
    "name",
    "live",
    "prerequisites",
    "h_position",
    "v_position",
    "creation_date",
    "seconds_per_fast_problem",
    "pretty_display_name",
    "short_display_name",
    "topic",
    "area",
)
"""Header of the Junyi Academy exercise table (`junyi_Exercise_table.csv`)."""


class GraphCycleWarning(UserWarning):
    """Edges were removed to break prerequisite cycles (only with `break_cycles=True`)."""


def read_prerequisite_csv(path: Union[str, Path], *, encoding: str = "utf-8-sig") -> pd.DataFrame:
    """Read a CSV of prerequisite edges with header `prerequisite_skill,skill` (other columns kept).

    Args:
        path: The CSV file.
        encoding: Text encoding (`utf-8-sig` also accepts a leading byte-order mark).

    Returns:
        Edges with string columns `prerequisite_skill`, `skill` and `source_row` (1-based data row);
        values are not yet validated (see `PrerequisiteGraph.from_edges`).

    Raises:
        AdapterError: The file is missing or not CSV.
        InputValidationError: A required column is missing.
    """
    try:
        edges = pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""], encoding=encoding)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise AdapterError(f"{path}: cannot read the prerequisite CSV: {error}") from error
    missing = [column for column in EDGE_COLUMNS if column not in edges.columns]
    if missing:
        raise InputValidationError(
            f"{path}: missing column(s) {missing}; found {list(edges.columns)}. Expected a header "
            "'prerequisite_skill,skill' (one edge per row, prerequisite first)."
        )
    edges["source_row"] = range(1, len(edges) + 1)
    return edges


def read_junyi_exercises(path: Union[str, Path]) -> pd.DataFrame:
    """Read the Junyi Academy exercise table (with its expert prerequisite map).

    Exercises listed twice (the 2015 release has two, differing only in `creation_date`) keep their
    first row. Repeated names inside one `prerequisites` cell are removed.

    Args:
        path: `junyi_Exercise_table.csv` (UTF-8 with BOM; `prerequisites` a quoted comma-separated list).

    Returns:
        One row per exercise: `name` (the slug id), `live` (bool), `prerequisites` (list of slugs),
        `pretty_display_name`, `topic`, `area`, ... as strings, plus `source_row` (1-based data row).

    Raises:
        AdapterError: The file is missing or unreadable.
        InputValidationError: A Junyi column is missing.
    """
    try:
        table = pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""], encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise AdapterError(f"{path}: cannot read the Junyi exercise table: {error}") from error
    missing = [column for column in ("name", "live", "prerequisites") if column not in table.columns]
    if missing:
        raise InputValidationError(
            f"{path}: missing column(s) {missing}; found {list(table.columns)}. Expected the Junyi "
            f"exercise table header {list(JUNYI_COLUMNS)}."
        )
    table["source_row"] = range(1, len(table) + 1)
    duplicated = table["name"].duplicated()
    if duplicated.any():
        logger.info("%s: %d repeated exercise row(s) ignored", path, int(duplicated.sum()))
        table = table.loc[~duplicated].reset_index(drop=True)
    table["live"] = table["live"].str.upper().eq("TRUE").fillna(False).astype(bool)
    table["prerequisites"] = [
        list(dict.fromkeys(p.strip() for p in cell.split(",") if p.strip())) if isinstance(cell, str) else []
        for cell in table["prerequisites"]
    ]
    return table


def junyi_prerequisite_edges(exercises: pd.DataFrame) -> pd.DataFrame:
    """The edge list of a Junyi exercise table (`read_junyi_exercises`), one row per prerequisite.

    Self-loops and cycles present in the data are kept: `PrerequisiteGraph.from_edges` reports them (or
    breaks them with `break_cycles=True`).

    Args:
        exercises: Output of `read_junyi_exercises`.

    Returns:
        Edges `prerequisite_skill, skill, source_row` (the exercise's row).
    """
    exploded = exercises[["name", "prerequisites", "source_row"]].explode("prerequisites").dropna()
    edges = pd.DataFrame(
        {
            "prerequisite_skill": exploded["prerequisites"].astype("string"),
            "skill": exploded["name"].astype("string"),
            "source_row": exploded["source_row"].astype("int64"),
        }
    )
    return edges.reset_index(drop=True)


class PrerequisiteGraph:
    """A validated prerequisite DAG over skills, with the queries the recommender needs.

    Build it with `from_edges` (validation) or `from_dict` (a saved graph). Methods return skills in a
    deterministic order (topological order, ties broken by id).
    """

    def __init__(self, graph: nx.DiGraph) -> None:
        """Wrap an already-validated acyclic `networkx.DiGraph` (use `from_edges` for raw input)."""
        if not nx.is_directed_acyclic_graph(graph):
            raise InputValidationError("PrerequisiteGraph: the graph has a cycle; build it with from_edges.")
        self._graph = graph
        self._order = list(nx.lexicographical_topological_sort(graph))
        self._rank = {skill: i for i, skill in enumerate(self._order)}

    @classmethod
    def from_edges(
        cls,
        edges: pd.DataFrame | Iterable[tuple[str, str]],
        *,
        skills: Optional[Collection[str]] = None,
        break_cycles: bool = False,
        source: str = "<edges>",
    ) -> PrerequisiteGraph:
        """Validate an edge list and build the graph.

        Args:
            edges: A frame with `prerequisite_skill`, `skill` (and optionally `source_row`) or an iterable
                of `(prerequisite_skill, skill)` pairs.
            skills: The known skills (e.g. the data's skill vocabulary). When given, an edge naming any
                other skill is rejected, and skills without edges become isolated nodes.
            break_cycles: False (default) rejects cycles. True removes, for each cycle found, the edge
                that closes it (the last edge of networkx's depth-first cycle; self-loops included) and
                warns with `GraphCycleWarning` listing the removed edges.
            source: Name for messages.

        Returns:
            The graph.

        Raises:
            InputValidationError: A column or value is missing, an edge names an unknown skill, or the
                edges form a cycle (message names the cycle and its rows) and `break_cycles` is False.
        """
        frame = _edge_frame(edges, source)
        for column in EDGE_COLUMNS:
            blank = frame[column].isna() | frame[column].str.strip().eq("")
            if blank.any():
                row = int(frame.loc[blank, "source_row"].iloc[0])
                raise InputValidationError(
                    f"{source}: row {row}, column '{column}': got an empty value; expected a skill id."
                )
            frame[column] = frame[column].str.strip()
        known = {str(skill) for skill in skills} if skills is not None else set()
        if skills is not None:
            for column in EDGE_COLUMNS:
                unknown = ~frame[column].isin(known)
                if unknown.any():
                    names = frame.loc[unknown, column].unique().tolist()
                    row = int(frame.loc[unknown, "source_row"].iloc[0])
                    raise InputValidationError(
                        f"{source}: row {row}, column '{column}': got {frame.loc[unknown, column].iloc[0]!r}; "
                        f"expected one of the {len(known)} known skills. {len(names)} unknown skill(s): "
                        f"{names[:10]}. Map the graph's ids to the data's skill ids, or drop these edges."
                    )
        graph = nx.DiGraph()
        graph.add_nodes_from(sorted(known))
        for prerequisite, skill, row in frame[[*EDGE_COLUMNS, "source_row"]].itertuples(index=False):
            if graph.has_edge(prerequisite, skill):
                continue
            graph.add_edge(prerequisite, skill, source_row=int(row))
        removed: list[tuple[str, str]] = []
        while True:
            try:
                cycle = nx.find_cycle(graph)
            except nx.NetworkXNoCycle:
                break
            if not break_cycles:
                path = " -> ".join([str(u) for u, _ in cycle] + [str(cycle[0][0])])
                rows = [graph.edges[u, v]["source_row"] for u, v in cycle]
                raise InputValidationError(
                    f"{source}: prerequisite cycle {path} (rows {rows}); expected an acyclic graph. Remove "
                    "one of these edges, or pass break_cycles=True to drop the edge closing each cycle."
                )
            graph.remove_edge(*cycle[-1][:2])
            removed.append((str(cycle[-1][0]), str(cycle[-1][1])))
        if removed:
            warnings.warn(
                f"{source}: removed {len(removed)} edge(s) to break prerequisite cycles: {removed}",
                GraphCycleWarning,
                stacklevel=2,
            )
        logger.info(
            "%s: prerequisite graph with %d skills, %d edges",
            source,
            graph.number_of_nodes(),
            graph.number_of_edges(),
        )
        return cls(graph)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrerequisiteGraph:
        """Rebuild a graph saved with `to_dict`.

        Raises:
            ConfigError: A key is missing.
            InputValidationError: The saved edges are invalid.
        """
        if "skills" not in data or "edges" not in data:
            raise ConfigError(
                "prerequisite graph: expected keys 'skills' and 'edges' (PrerequisiteGraph.to_dict)."
            )
        return cls.from_edges(
            [tuple(edge) for edge in data["edges"]], skills=data["skills"], source="<saved graph>"
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form: `{"skills": [...], "edges": [[prerequisite, skill], ...]}`."""
        return {
            "skills": list(self._order),
            "edges": [list(edge) for edge in self.edges().itertuples(index=False)],
        }

    def __len__(self) -> int:
        return self._graph.number_of_nodes()

    def __contains__(self, skill: object) -> bool:
        return skill in self._graph

    @property
    def skills(self) -> list[str]:
        """Every skill, in topological order (prerequisites first, ties by id)."""
        return list(self._order)

    def edges(self) -> pd.DataFrame:
        """The edges as a frame `prerequisite_skill, skill`, sorted by the skills' topological ranks."""
        pairs = sorted(self._graph.edges(), key=lambda edge: (self._rank[edge[1]], self._rank[edge[0]]))
        return pd.DataFrame(pairs, columns=list(EDGE_COLUMNS), dtype="string")

    def topological_order(self) -> list[str]:
        """Skills ordered so every prerequisite comes before the skills that need it (ties by id)."""
        return list(self._order)

    def _check(self, skill: str) -> None:
        if skill not in self._graph:
            raise InputValidationError(
                f"skill {skill!r} is not in the prerequisite graph ({len(self)} skills, e.g. {self._order[:5]})."
            )

    def _sorted(self, skills: Iterable[str]) -> list[str]:
        return sorted(skills, key=self._rank.__getitem__)

    def prerequisites(self, skill: str) -> list[str]:
        """Direct prerequisites of `skill`, in topological order."""
        self._check(skill)
        return self._sorted(self._graph.predecessors(skill))

    def dependents(self, skill: str) -> list[str]:
        """Skills that list `skill` as a direct prerequisite, in topological order."""
        self._check(skill)
        return self._sorted(self._graph.successors(skill))

    def ancestors(self, skill: str) -> list[str]:
        """Every direct or indirect prerequisite of `skill`, in topological order."""
        self._check(skill)
        return self._sorted(nx.ancestors(self._graph, skill))

    def descendants(self, skill: str) -> list[str]:
        """Every skill that depends on `skill` directly or indirectly, in topological order."""
        self._check(skill)
        return self._sorted(nx.descendants(self._graph, skill))

    def depth(self) -> dict[str, int]:
        """Longest prerequisite chain below each skill (0 for skills without prerequisites)."""
        depth: dict[str, int] = {}
        for skill in self._order:
            depth[skill] = max((depth[p] + 1 for p in self._graph.predecessors(skill)), default=0)
        return depth

    def unmet_prerequisites(self, skill: str, mastered: Collection[str]) -> list[str]:
        """Direct prerequisites of `skill` that are not in `mastered`, in topological order."""
        return [p for p in self.prerequisites(skill) if p not in mastered]

    def subgraph(self, skills: Collection[str]) -> PrerequisiteGraph:
        """The graph induced on `skills` (edges through left-out skills are not bridged)."""
        for skill in skills:
            self._check(skill)
        return PrerequisiteGraph(self._graph.subgraph(skills).copy())

    def to_networkx(self) -> nx.DiGraph:
        """A copy of the underlying `networkx.DiGraph` (edge attribute `source_row`)."""
        return self._graph.copy()


def _edge_frame(edges: pd.DataFrame | Iterable[tuple[str, str]], source: str) -> pd.DataFrame:
    if isinstance(edges, pd.DataFrame):
        missing = [column for column in EDGE_COLUMNS if column not in edges.columns]
        if missing:
            raise InputValidationError(
                f"{source}: missing column(s) {missing}; found {list(edges.columns)}. Expected "
                f"{list(EDGE_COLUMNS)}."
            )
        frame = edges.reset_index(drop=True).copy()
    else:
        frame = pd.DataFrame(list(edges), columns=list(EDGE_COLUMNS))
    if "source_row" not in frame.columns:
        frame["source_row"] = range(1, len(frame) + 1)
    frame[list(EDGE_COLUMNS)] = frame[list(EDGE_COLUMNS)].astype("string")
    return frame
