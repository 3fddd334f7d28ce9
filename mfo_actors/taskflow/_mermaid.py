"""``flows graph``: a flow as a Mermaid ``graph TD``, drawn as the seeds draw flows."""

from __future__ import annotations

from mfo_actors.taskflow._flow import Flow

__all__ = ["to_mermaid"]


def _label(text: str) -> str:
    return '"' + text.replace('"', "#quot;").replace("\n", " ") + '"'


def to_mermaid(flow: Flow) -> str:
    """Triggers as rounded entry nodes, tasks as boxes (conditions as diamonds), edges as
    dependencies; a condition's edges carry the branch that selects them."""
    lines = ["graph TD"]
    for k, trig in enumerate(flow.spec.triggers):
        if trig.event is not None:
            text = f"event: {trig.event.source}/{trig.event.type}"
            if trig.event.when:
                text += f" when {trig.event.when}"
        elif trig.cron is not None:
            text = f"cron: {trig.cron}"
        else:
            text = f"every {trig.interval:g}s"
        lines.append(f"    trigger{k}([{_label(text)}])")
        for r in flow.roots:
            lines.append(f"    trigger{k} --> t{r}")
    for node in flow.nodes:
        text = f"{node.id}<br/>{node.type}"
        if node.spec.when:
            text += f"<br/>when {node.spec.when}"
        shape = "{" + _label(text) + "}" if node.is_condition else "[" + _label(text) + "]"
        lines.append(f"    t{node.index}{shape}")
    for node in flow.nodes:
        for d in node.deps:
            dep = flow.nodes[d]
            labels = []
            if dep.is_condition and node.index in dep.branch_targets:
                labels = [e.source for e, targets in dep.branches if node.index in targets]
                if node.index in dep.default_branch:
                    labels.append("default")
            if labels:
                lines.append(f"    t{d} -->|{_label(' / '.join(labels))}| t{node.index}")
            else:
                lines.append(f"    t{d} --> t{node.index}")
    return "\n".join(lines) + "\n"
