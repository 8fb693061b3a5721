"""Education use cases: knowledge gaps, exercise recommendations, what changed after a session, the demo.

Gaps are skills of low predicted mastery that a student's target skills depend on (through the
prerequisite graph), ranked by how low the mastery is and by how much of the model's attention, at the
student's latest state, falls on recent wrong answers tied to the skill. Recommendations are items whose
predicted success lies in a target band (the zone of proximal development), never on a skill whose
prerequisites are unmastered (by predicted mastery, or demonstrated by the student's own recent answers),
each with a reason a tutor can read.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd

from apps.education.config import (
    MASTERY_EVIDENCE,
    MASTERY_THRESHOLD,
    PREREQUISITE_THRESHOLD,
    RECENT_PRACTICE,
    TARGET_BAND,
)
from apps.education.graph import PrerequisiteGraph, read_prerequisite_csv
from apps.education.recommender import SkillIndex, mastery_evidence, rank_items, recent_practice
from core.errors import ConfigError, InputValidationError

if TYPE_CHECKING:
    from rich.console import Console
    from sqlalchemy.orm import Session, sessionmaker

    from apps.education.predictor import KnowledgeTracer, StudentState

logger = logging.getLogger(__name__)

RECENT_ANSWERS = 10
"""Answers that count as "recent" for targets and attention-weighted gaps."""

SESSION_GAP_S = 3600.0
"""A pause longer than this (seconds) starts a new session."""


@dataclass(frozen=True)
class KnowledgeGap:
    """A low-mastery skill that blocks a target skill.

    Attributes:
        skill_id: The weak skill.
        skill_name: Its name (the id when unnamed).
        mastery: Predicted mastery in [0, 1].
        blocks: Target skills that depend on it (itself when it is a target).
        attention: Share of the latest state's attention on recent wrong answers tied to this skill.
        score: Ranking score, `(threshold - mastery) * (1 + 4 * attention)`.
        reason: One sentence for the tutor.
    """

    skill_id: str
    skill_name: str
    mastery: float
    blocks: tuple[str, ...]
    attention: float
    score: float
    reason: str


@dataclass(frozen=True)
class Recommendation:
    """One recommended exercise.

    Attributes:
        item_id: The item.
        skill_id: Its skill.
        skill_name: The skill's name (the id when unnamed).
        p_correct: Predicted success now.
        mastery: Predicted mastery of the skill.
        is_gap: True when the skill is a knowledge gap.
        reason: Why it was chosen, for the tutor.
    """

    item_id: str
    skill_id: str
    skill_name: str
    p_correct: float
    mastery: float
    is_gap: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def load_graph(path: str | Path, skills: Optional[list[str]] = None) -> PrerequisiteGraph:
    """Read and validate a prerequisite CSV (`prerequisite_skill,skill`).

    Args:
        path: The CSV file.
        skills: Known skills (the model's vocabulary); edges naming other skills are rejected.

    Raises:
        AdapterError, InputValidationError: Unreadable file, unknown skills, cycles.
    """
    edges = read_prerequisite_csv(path)
    return PrerequisiteGraph.from_edges(edges, skills=skills, source=str(path))


def _name(tracer: KnowledgeTracer, skill: str) -> str:
    return tracer.skill_names_.get(skill, skill)


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def _check_band(band: tuple[float, float]) -> None:
    if not 0.0 <= band[0] < band[1] <= 1.0:
        raise ConfigError(f"band: expected 0 <= low < high <= 1; got {band}.")


def _recent_skills(state: StudentState) -> list[str]:
    cells = state.history["skill_id"].to_numpy()[-RECENT_ANSWERS:][::-1]  # newest first
    return list(dict.fromkeys(skill for cell in cells for skill in str(cell).split("|")))


def knowledge_gaps(
    tracer: KnowledgeTracer,
    state: StudentState,
    graph: Optional[PrerequisiteGraph] = None,
    *,
    targets: Optional[list[str]] = None,
    threshold: float = MASTERY_THRESHOLD,
) -> list[KnowledgeGap]:
    """Skills below `threshold` mastery that the target skills depend on, most urgent first.

    Args:
        tracer: The fitted model (for skill names).
        state: The student's state (`KnowledgeTracer.student_state`).
        graph: Prerequisite graph; None treats skills as independent (only the targets can be gaps).
        targets: Skills the student works towards; default the skills of their recent answers.
        threshold: Mastery below which a skill is a gap.

    Returns:
        Gaps sorted by `score`, descending.
    """
    mastery = state.mastery
    targets = list(targets) if targets is not None else _recent_skills(state)
    unknown = [t for t in targets if t not in mastery.index]
    if unknown:
        raise InputValidationError(f"targets: skills {unknown[:5]} are not in the model's skill vocabulary.")
    # Skill -> target skills it blocks (itself, or a target depending on it through the graph).
    blocks: dict[str, list[str]] = {}
    for target in targets:
        related = [target]
        if graph is not None and target in graph:
            related += [s for s in graph.ancestors(target) if s in mastery.index]
        for skill in related:
            blocks.setdefault(skill, []).append(target)
    # Attention of the latest state on recent wrong answers, credited to their skill and its prerequisites.
    tie: dict[str, float] = {}
    n = len(state.history)
    cells = state.history["skill_id"].to_numpy()
    correct = state.history["correct"].to_numpy()
    for index in range(max(n - RECENT_ANSWERS, 0), n):
        if int(correct[index]) == 1 or index >= len(state.attention):
            continue
        weight = float(state.attention[index])
        for skill in str(cells[index]).split("|"):
            credited = [skill]
            if graph is not None and skill in graph:
                credited += graph.ancestors(skill)
            for s in credited:
                tie[s] = tie.get(s, 0.0) + weight
    gaps = []
    for skill, blocked in blocks.items():
        value = float(mastery[skill])
        if value >= threshold:
            continue
        attention = tie.get(skill, 0.0)
        name = _name(tracer, skill)
        dependents = [t for t in blocked if t != skill]
        reason = f"{name}: mastery {_pct(value)} (below {_pct(threshold)})"
        if dependents:
            reason += f"; needed for {', '.join(_name(tracer, t) for t in dependents[:3])}"
        if attention > 0:
            reason += f"; {_pct(attention)} of the model's attention is on recent errors tied to it"
        gaps.append(
            KnowledgeGap(
                skill_id=skill,
                skill_name=name,
                mastery=value,
                blocks=tuple(dict.fromkeys(blocked)),
                attention=attention,
                score=(threshold - value) * (1.0 + 4.0 * attention),
                reason=reason + ".",
            )
        )
    return sorted(gaps, key=lambda g: (-g.score, g.skill_id))


def recommend(
    tracer: KnowledgeTracer,
    state: StudentState,
    graph: Optional[PrerequisiteGraph] = None,
    *,
    k: int = 5,
    band: tuple[float, float] = TARGET_BAND,
    threshold: float = MASTERY_THRESHOLD,
    gaps: Optional[list[KnowledgeGap]] = None,
    index: Optional[SkillIndex] = None,
    prerequisite_threshold: float = PREREQUISITE_THRESHOLD,
    evidence: Optional[tuple[int, int]] = MASTERY_EVIDENCE,
) -> list[Recommendation]:
    """The next `k` exercises for a student.

    Candidates are items with predicted success inside `band` whose skill has every prerequisite
    mastered: predicted mastery >= `prerequisite_threshold` (at least `threshold`), or demonstrated by
    the student (`evidence`: N of their last M answers on it correct). Gap skills not yet demonstrated
    come first, then other skills tied to the gaps' targets, then demonstrated skills, then the rest;
    within each, skills practised less in the last answers, the most urgent gap or least mastered skill,
    and items closest to the band's centre; at most two items per skill, and the student's last item is
    not repeated. Fewer than `k` come back when fewer items qualify (`recommender.rank_items` holds the
    rule).

    Args:
        tracer: The fitted model.
        state: The student's state (`KnowledgeTracer.student_state`).
        graph: Prerequisite graph; None applies no prerequisite rule.
        k: How many exercises.
        band: (low, high) predicted success.
        threshold: Mastery below which a skill is a gap; prerequisites need at least this.
        gaps: Precomputed `knowledge_gaps` (computed when None).
        index: `SkillIndex.build(tracer, graph)`, to reuse across students (built when None).
        prerequisite_threshold: Predicted mastery that makes a prerequisite count as mastered.
        evidence: (N, M) of the N-of-M rule; None: predicted mastery alone decides.

    Returns:
        Up to `k` recommendations, best first.

    Raises:
        ConfigError: `k < 1`, an invalid band, or an invalid `evidence`.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1; got {k}.")
    _check_band(band)
    gaps = knowledge_gaps(tracer, state, graph, threshold=threshold) if gaps is None else gaps
    index = SkillIndex.build(tracer, graph) if index is None else index
    mastery = state.mastery.reindex(index.skills).to_numpy(dtype=np.float64)[None]  # (1, K)
    urgency = np.full(mastery.shape, np.nan)
    positions = index.skills.get_indexer([g.skill_id for g in gaps])
    urgency[0, positions[positions >= 0]] = [g.score for g, p in zip(gaps, positions, strict=True) if p >= 0]
    last = -1
    if not state.history.empty:
        last = int(index.items.get_indexer([str(state.history["item_id"].iloc[-1])])[0])
    targets = np.zeros(mastery.shape, dtype=bool)
    blocked = index.skills.get_indexer([t for g in gaps for t in g.blocks])
    targets[0, blocked[blocked >= 0]] = True
    # Each answer counts for its first skill, as in the recent-practice count.
    answered = index.skills.get_indexer(state.history["skill_id"].astype(str).str.split("|").str[0])[None]
    demonstrated = None
    if evidence is not None:
        demonstrated = mastery_evidence(
            answered,
            state.history["correct"].to_numpy(dtype=np.int64)[None],
            len(index.skills),
            required=evidence[0],
            window=evidence[1],
        )
    item_p = state.item_p.reindex(index.items).to_numpy(dtype=np.float64)  # (I,)
    chosen = rank_items(
        item_p[None],
        mastery,
        index,
        gaps=urgency,
        band=band,
        prerequisite_threshold=max(threshold, prerequisite_threshold),
        k=k,
        last_item=np.array([last]),
        relevant=index.relevant(targets) if targets.any() else None,
        recent=recent_practice(answered[:, -RECENT_PRACTICE:], len(index.skills), RECENT_PRACTICE),
        demonstrated=demonstrated,
    )[0]
    shown = set(index.skills[demonstrated[0]]) if demonstrated is not None else set()
    return [
        _recommendation(
            tracer,
            str(index.items[i]),
            str(index.skills[index.item_skill[i]]),
            float(item_p[i]),
            state,
            graph,
            gaps,
            band,
            shown,
            evidence,
        )
        for i in chosen[chosen >= 0]
    ]


def _recommendation(
    tracer: KnowledgeTracer,
    item_id: str,
    skill: str,
    p: float,
    state: StudentState,
    graph: Optional[PrerequisiteGraph],
    gaps: list[KnowledgeGap],
    band: tuple[float, float],
    shown: set[str],
    evidence: Optional[tuple[int, int]],
) -> Recommendation:
    name = _name(tracer, skill)
    value = float(state.mastery[skill])
    gap = next((g for g in gaps if g.skill_id == skill), None)
    proof = f"{evidence[0]} of the last {evidence[1]} answers on it correct" if evidence else ""
    parts = [f"predicted success {_pct(p)} (target {_pct(band[0])}-{_pct(band[1])})"]
    if gap is not None and skill not in shown:
        blocked = [t for t in gap.blocks if t != skill]
        parts.append(
            f"closes a gap in {name} (mastery {_pct(value)})"
            + (f" that blocks {', '.join(_name(tracer, t) for t in blocked[:2])}" if blocked else "")
        )
    elif skill in shown:
        parts.append(f"reinforces {name} (mastery {_pct(value)}; at least {proof})")
    else:
        parts.append(f"practises {name} (mastery {_pct(value)})")
    prerequisites = graph.prerequisites(skill) if graph is not None and skill in graph else []
    if prerequisites:
        parts.append(
            "prerequisites mastered: "
            + ", ".join(
                f"{_name(tracer, s)} {_pct(float(state.mastery.get(s, 0.0)))}"
                + (f" (at least {proof})" if s in shown else "")
                for s in prerequisites[:3]
            )
        )
    reason = "; ".join(parts)
    return Recommendation(
        item_id=item_id,
        skill_id=skill,
        skill_name=name,
        p_correct=p,
        mastery=value,
        is_gap=gap is not None,
        reason=reason[0].upper() + reason[1:] + ".",
    )


def session_change(tracer: KnowledgeTracer, frame: pd.DataFrame, user_id: str) -> pd.DataFrame:
    """Mastery before and after the student's last session (a pause > `SESSION_GAP_S` starts a session).

    Without timestamps the last 10 answers count as the last session.

    Returns:
        One row per skill: `skill_id, skill_name, before, after, change, answers` (answers in the last
        session on that skill), sorted by |change| descending.
    """
    rows = frame[frame["user_id"] == user_id].sort_values(["timestamp", "order"], kind="stable")
    if rows.empty:
        raise InputValidationError(f"student {user_id!r}: no answers in the data.")
    if rows["timestamp"].notna().all():
        gaps = rows["timestamp"].diff().dt.total_seconds().fillna(0.0).to_numpy()
        starts = np.flatnonzero(gaps > SESSION_GAP_S)
        cut = int(starts[-1]) if len(starts) else 0
    else:
        cut = max(len(rows) - RECENT_ANSWERS, 0)
    before = tracer.student_state(rows.iloc[:cut], user_id).mastery
    after = tracer.student_state(rows, user_id).mastery
    counts = rows.iloc[cut:]["skill_id"].astype(str).str.split("|").explode().value_counts()
    table = pd.DataFrame(
        {
            "skill_id": after.index,
            "skill_name": [_name(tracer, s) for s in after.index],
            "before": before.to_numpy(),
            "after": after.to_numpy(),
        }
    )
    table["change"] = table["after"] - table["before"]
    table["answers"] = table["skill_id"].map(counts).fillna(0).astype(int)
    return table.reindex(table["change"].abs().sort_values(ascending=False).index).reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------
# verticals demo
# ---------------------------------------------------------------------------------------------------

DEMO_STUDENTS = 240
DEMO_HELD_OUT = 40
DEMO_ASSIGNED_STUDENTS = 3  # students the demo assigns exercises to
DEMO_ASSIGN_SEARCH = 40  # ... among the first this many


def demo_paths(home: Path) -> dict[str, Path]:
    """Where the demo keeps its files under the suite home."""
    root = Path(home) / "education"
    return {
        "root": root,
        "data": root / "interactions.csv",
        "graph": root / "prerequisites.csv",
        "model": root / "model",
    }


def demo(home: Path, session_factory: sessionmaker[Session], console: Console) -> None:
    """Generate a simulated class, train a small tracer, register it, and assign exercises for the UI.

    A second run reuses the data and the model directory that exist.
    """
    import torch

    from apps.education import repository
    from apps.education.adapters import read_interactions
    from apps.education.predictor import KnowledgeTracer
    from apps.education.synthetic import generate
    from core.repository import record_model_run
    from core.train import code_version

    torch.set_num_threads(1)  # a laptop demo shares its cores with the UI and other apps
    paths = demo_paths(home)
    paths["root"].mkdir(parents=True, exist_ok=True)
    if not paths["data"].is_file() or not paths["graph"].is_file():
        console.print("education: simulating learners on a prerequisite graph ...")
        frame, edges, _ = generate(
            students=DEMO_STUDENTS, skills=12, items_per_skill=8, interactions_per_student=60, seed=0
        )
        write_atomic_csv(frame.drop(columns="source_row"), paths["data"])
        write_atomic_csv(edges, paths["graph"])
    log = read_interactions(paths["data"])
    frame = log.frame
    users = frame["user_id"].drop_duplicates()
    held_out = set(users.iloc[-DEMO_HELD_OUT:])
    train, test = frame[~frame["user_id"].isin(held_out)], frame[frame["user_id"].isin(held_out)]
    if (paths["model"] / "app.json").is_file():
        console.print(f"education: reusing the model in {paths['model']}")
        tracer = KnowledgeTracer.load(paths["model"])
    else:
        console.print(
            f"education: training a small knowledge tracer on {train['user_id'].nunique()} students "
            f"({len(train)} answers) ..."
        )
        tracer = KnowledgeTracer("small").fit(train)
        metrics = tracer.evaluate(test)
        tracer.save(paths["model"], metrics=metrics)
        console.print(
            f"education: held-out AUC {metrics['auc']:.3f}, accuracy {metrics['accuracy']:.3f} "
            f"({metrics['n_predictions']} answers)"
        )
        with session_factory() as session, session.begin():
            record_model_run(
                session,
                model_dir=paths["model"],
                app="education",
                metrics=metrics,
                data_fingerprint=tracer.data_fingerprint_,
                code_version=code_version(),
            )
    graph = load_graph(paths["graph"], skills=list(tracer.skill_vocab_.tokens))
    with session_factory() as session, session.begin():
        if repository.list_assignments(session, limit=1):
            console.print("education: assignments already in the database")
            return
        # The first students who have recommendations (a weak student may have none in the target band), so
        # the dashboard opens on students with exercises to show.
        assigned: list[str] = []
        for user_id in users.iloc[:DEMO_ASSIGN_SEARCH].astype(str):
            state = tracer.student_state(frame, user_id)
            recommendations = recommend(tracer, state, graph, k=3)
            if recommendations:
                repository.add_assignments(session, user_id, recommendations, assigned_by="demo")
                assigned.append(user_id)
            if len(assigned) == DEMO_ASSIGNED_STUDENTS:
                break
        console.print(f"education: assigned recommended exercises to {', '.join(assigned) or 'no student'}")


def write_atomic_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write a CSV through a temporary file and rename, so a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def mastery_dot(
    tracer: KnowledgeTracer,
    mastery: pd.Series,
    graph: Optional[PrerequisiteGraph],
    *,
    threshold: float = MASTERY_THRESHOLD,
    highlight: Optional[set[str]] = None,
) -> str:
    """A Graphviz DOT drawing of the prerequisite graph, nodes coloured by mastery (red low, green high).

    Args:
        tracer: The fitted model (skill names).
        mastery: Per-skill mastery (`StudentState.mastery`).
        graph: Prerequisite graph; None draws the skills without edges.
        threshold: Mastered skills get a bold outline.
        highlight: Skills drawn with a double outline (e.g. knowledge gaps).

    Returns:
        DOT source for `st.graphviz_chart`.
    """
    highlight = highlight or set()
    skills = graph.skills if graph is not None else list(mastery.index)
    lines = ["digraph mastery {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fontsize=10];']
    for skill in skills:
        value = float(mastery.get(skill, float("nan")))
        if np.isnan(value):
            color = "#dddddd"
        else:
            red, green = int(255 * (1 - value)), int(200 * value)
            color = f"#{red:02x}{green:02x}60"
        label = f"{_name(tracer, skill)}\\n{_pct(value) if not np.isnan(value) else '?'}".replace('"', "'")
        extra = ", penwidth=3" if value >= threshold else ""
        extra += ", peripheries=2" if skill in highlight else ""
        lines.append(f'  "{skill}" [label="{label}", fillcolor="{color}"{extra}];')
    if graph is not None:
        for prerequisite, skill in graph.edges().itertuples(index=False):
            lines.append(f'  "{prerequisite}" -> "{skill}";')
    lines.append("}")
    return "\n".join(lines)
