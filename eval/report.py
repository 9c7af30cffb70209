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
                 "CD8A_top10_immune_share"}
SIGNED_UNIT = {"pathway_pearson", "hla_I_vs_II_separation"}


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
