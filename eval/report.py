"""The result of one evaluation: a score table (methods x metrics) plus what produced it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# Score ranges for the sanity check (and the tests): every metric must land inside.
UNIT_INTERVAL = {"accuracy", "precision", "recall", "macro_f1", "precision_macro", "recall_macro",
                 "NMI_cell", "ARI_cell", "ASW_cell", "AvgBIO", "ASW_batch", "GraphConn", "AvgBATCH",
                 "Overall", "knn_accuracy", "knn_macro_f1", "program_enriched_share",
                 "CD8A_top10_immune_share", "direction_de"}
SIGNED_UNIT = {"pathway_pearson", "hla_I_vs_II_separation", "pearson", "pearson_delta", "pearson_de",
               "pearson_delta_de"}


@dataclass
class TaskResult:
    task: str
    dataset: str
    table: pd.DataFrame  # index: method (model, random init, baselines), columns: metrics
    params: dict = field(default_factory=dict)  # cells, genes, match report, epochs, seed...
    artifacts: list[Path] = field(default_factory=list)  # plots, confusion CSVs
    wall_s: float = 0.0

    def markdown(self, digits: int = 3) -> str:
        head = f"**{self.task}** on `{self.dataset}`"
        seen = self.params.get("pretrained_on_eval_data")
        if seen:
            head += (f"  \n*not held out: the model was pretrained on {seen}; these scores overstate what it "
                     "does on new data*")
        return head + "\n\n" + markdown_table(self.table, digits)

    def out_of_range(self) -> list[str]:
        """Metrics outside their valid range (ARI may dip below 0 on random clusters)."""
        bad = []
        for method, row in self.table.iterrows():
            for metric, v in row.items():
                if v is None or (isinstance(v, float) and np.isnan(v)):
                    continue
                lo, hi = (-1.0, 1.0) if (metric in SIGNED_UNIT or metric == "ARI_cell") else (0.0, 1.0)
                if (metric in UNIT_INTERVAL or metric in SIGNED_UNIT) and not (lo - 1e-9 <= v <= hi + 1e-9):
                    bad.append(f"{method}/{metric}={v}")
        return bad


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub Markdown table of a methods x metrics frame (no tabulate dependency)."""
    def fmt(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "n/a" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    cols = [str(c) for c in df.columns]
    lines = ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for method, row in df.iterrows():
        lines.append(f"| {method} | " + " | ".join(fmt(v) for v in row.to_list()) + " |")
    return "\n".join(lines)


def combine_markdown(results: list[TaskResult]) -> str:
    return "\n\n".join(r.markdown() for r in results)


# ---- the plain-words summary -------------------------------------------------------------------
# each task's headline metric (higher is better for all of them)
HEADLINE = {"annotation": "macro_f1", "integration": "AvgBIO", "zero-shot": "AvgBIO", "gene-network": "pathway_pearson",
            "multiomic": "AvgBIO", "perturbation": "pearson_delta_de"}
MODEL_ROW, RANDOM_ROW = "scGPT", "scGPT random init"
CLOSE = 0.02  # differences below this are "about the same" at these sizes


def _compare(a: float, b: float) -> str:
    if not (np.isfinite(a) and np.isfinite(b)):
        return "cannot be compared with"
    if abs(a - b) < CLOSE:
        return "is about level with"
    return "beats" if a > b else "is below"


def plain_summary(results: list[TaskResult]) -> str:
    """One sentence per (task, dataset): scGPT against its random-init twin and the best baseline."""
    lines = []
    for r in results:
        metric = HEADLINE.get(r.task, str(r.table.columns[0]))
        if metric not in r.table.columns or MODEL_ROW not in r.table.index:
            continue
        col = r.table[metric].astype(float)
        ours = float(col[MODEL_ROW])
        parts = [f"- {r.task} on {r.dataset} ({metric}): scGPT {ours:.3f}"]
        if RANDOM_ROW in col:
            parts.append(f"{_compare(ours, float(col[RANDOM_ROW]))} its random-init twin ({col[RANDOM_ROW]:.3f})")
        base = col.drop(index=[i for i in (MODEL_ROW, RANDOM_ROW) if i in col.index]).dropna()
        if len(base):
            best = base.idxmax()
            parts.append(f"{_compare(ours, float(base[best]))} the best baseline, {best} ({base[best]:.3f})")
        line = parts[0] + " " + "; ".join(parts[1:]) if len(parts) > 1 else parts[0]
        if r.params.get("pretrained_on_eval_data"):
            line += " [not held out: pretrained on these cells]"
        lines.append(line + ".")
    return "\n".join(lines)
