"""Gene-network analysis of gene embeddings (paper §2.6, §4.7), against Reactome.

The same scoring applies to any gene x gene similarity (embedding cosine, or the
co-expression baseline), so the two sit side by side in one table:

* network: edges with similarity above a threshold (paper: 0.4 for CD antigens, 0.5 for HLA);
* gene programs: Leiden clusters of that network with 5 or more genes (Ceglia et al.'s
  pipeline, §4.5), each tested for Reactome enrichment (hypergeometric, Bonferroni);
* CD8A's 10 nearest neighbours (itself included, as in the paper) and their share in the
  Immune System pathway R-HSA-168256;
* over all genes annotated in Reactome: Pearson correlation between pairwise similarity and
  the number of pathways the pair shares (paper: 0.316);
* HLA class I vs class II: mean within-class minus mean between-class similarity (> 0 means
  the two classes separate, as in the paper's Fig. 5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.genes import DATA_DIR

log = logging.getLogger(__name__)

REACTOME_GMT = DATA_DIR / "ReactomePathways_2024-09-18.gmt"
IMMUNE_SYSTEM = "R-HSA-168256"
HLA_CLASS_I = ("HLA-A", "HLA-B", "HLA-C", "HLA-E", "HLA-F", "HLA-G")
HLA_CLASS_II_PREFIX = "HLA-D"


@dataclass(frozen=True, slots=True)
class Pathways:
    ids: list[str]
    names: list[str]
    members: list[frozenset[str]]

    def by_id(self, pid: str) -> frozenset[str]:
        return self.members[self.ids.index(pid)]


def load_gmt(path: str | Path = REACTOME_GMT) -> Pathways:
    """Reactome native GMT: name <tab> id <tab> gene symbols..."""
    ids, names, members = [], [], []
    for line in Path(path).read_text().splitlines():
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 3:
            continue
        names.append(parts[0])
        ids.append(parts[1])
        members.append(frozenset(g for g in parts[2:] if g))
    return Pathways(ids, names, members)


def cosine_similarity(emb: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, n) cosine similarity; a zero vector has similarity 0 to everything."""
    e = np.asarray(emb, dtype=np.float64)
    n = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.where(n > 0, n, 1.0)
    return (e @ e.T).astype(np.float32)


def membership(genes: list[str], pw: Pathways) -> np.ndarray:
    """(n_genes, n_pathways) bool: gene i in pathway j."""
    index = {g: i for i, g in enumerate(genes)}
    M = np.zeros((len(genes), len(pw.ids)), dtype=bool)
    for j, mem in enumerate(pw.members):
        for g in mem:
            i = index.get(g)
            if i is not None:
                M[i, j] = True
    return M


def neighbours(sim: np.ndarray, genes: list[str], query: str, k: int = 10) -> list[str]:
    """The k genes most similar to ``query``, the query itself first (paper: 'including itself')."""
    i = genes.index(query)
    s = sim[i].astype(np.float64).copy()
    s[i] = np.inf
    order = np.lexsort((np.arange(len(genes)), -s))  # stable tie-break by position
    return [genes[j] for j in order[:k]]


def neighbour_pathway_share(sim, genes, pathway: frozenset[str], query: str = "CD8A", k: int = 10) -> float:
    nb = neighbours(sim, genes, query, k)
    return float(np.mean([g in pathway for g in nb]))


def pathway_correlation(sim: np.ndarray, M: np.ndarray) -> tuple[float, int]:
    """Pearson r between similarity and shared-pathway count over all pairs of annotated genes.

    Returns (r, n_genes used). Genes in no pathway are left out: a zero there means 'unknown',
    not 'shares nothing'.
    """
    keep = M.any(axis=1)
    n = int(keep.sum())
    if n < 3:
        return float("nan"), n
    Mk = M[keep].astype(np.float32)
    shared = Mk @ Mk.T  # (n, n) number of common pathways
    iu = np.triu_indices(n, k=1)
    x = sim[np.ix_(keep, keep)][iu].astype(np.float64)
    y = shared[iu].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return float("nan"), n
    return float(np.corrcoef(x, y)[0, 1]), n


def hla_separation(sim: np.ndarray, genes: list[str]) -> tuple[float, int, int]:
    """Mean within-class minus between-class similarity of HLA class I vs class II genes.

    Returns (score, n_class_I, n_class_II); NaN when either class has fewer than 2 genes.
    """
    c1 = [i for i, g in enumerate(genes) if g in HLA_CLASS_I]
    c2 = [i for i, g in enumerate(genes) if g.startswith(HLA_CLASS_II_PREFIX)]
    if len(c1) < 2 or len(c2) < 2:
        return float("nan"), len(c1), len(c2)

    def mean_off_diag(a, b):
        block = sim[np.ix_(a, b)].astype(np.float64)
        if a is b:
            return block[~np.eye(len(a), dtype=bool)].mean()
        return block.mean()

    within = (mean_off_diag(c1, c1) + mean_off_diag(c2, c2)) / 2
    return float(within - mean_off_diag(c1, c2)), len(c1), len(c2)


def gene_programs(sim: np.ndarray, threshold: float, min_size: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Leiden communities of the thresholded similarity network with >= min_size genes."""
    import igraph as ig
    import leidenalg

    n = sim.shape[0]
    iu = np.triu_indices(n, k=1)
    w = sim[iu]
    sel = w > threshold
    g = ig.Graph(n=n, edges=list(zip(iu[0][sel].tolist(), iu[1][sel].tolist())))
    g.es["weight"] = w[sel].astype(float).tolist()
    if g.ecount() == 0:
        return []
    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition, weights="weight",
                                    resolution_parameter=1.0, seed=seed)
    progs = [np.asarray(sorted(c)) for c in part if len(c) >= min_size]
    return sorted(progs, key=lambda c: (-len(c), int(c[0])))


def program_enrichment(programs: list[np.ndarray], M: np.ndarray, alpha: float = 0.01) -> float:
    """Share of programs enriched for at least one pathway (hypergeometric, Bonferroni).

    The universe is the network's annotated genes.
    """
    from scipy.stats import hypergeom

    if not programs:
        return float("nan")
    annotated = M.any(axis=1)
    N = int(annotated.sum())
    sizes = M[annotated].sum(axis=0)  # (n_pathways,) pathway sizes within the universe
    tested = np.flatnonzero(sizes >= 2)
    n_tests = max(1, len(programs) * tested.size)
    hits = 0
    for prog in programs:
        prog = prog[annotated[prog]]
        if prog.size < 2:
            continue
        k = M[prog][:, tested].sum(axis=0)  # overlaps with each pathway
        p = hypergeom.sf(k - 1, N, sizes[tested], prog.size)
        hits += bool((p * n_tests < alpha).any())
    return hits / len(programs)


def network_scores(sim: np.ndarray, genes: list[str], pw: Pathways, *, threshold: float,
                   query: str = "CD8A", k: int = 10, seed: int = 0) -> tuple[dict[str, float], list[np.ndarray]]:
    """Every gene-network score for one similarity matrix, and its gene programs."""
    M = membership(genes, pw)
    r, n_annot = pathway_correlation(sim, M)
    hla, n1, n2 = hla_separation(sim, genes)
    progs = gene_programs(sim, threshold, seed=seed)
    iu = np.triu_indices(len(genes), k=1)
    out = {
        "pathway_pearson": r,
        "n_genes_annotated": float(n_annot),
        f"{query}_top{k}_immune_share": (neighbour_pathway_share(sim, genes, pw.by_id(IMMUNE_SYSTEM), query, k)
                                         if query in genes else float("nan")),
        "hla_I_vs_II_separation": hla,
        "n_edges": float((sim[iu] > threshold).sum()),
        "n_programs": float(len(progs)),
        "program_enriched_share": program_enrichment(progs, M),
    }
    log.info("gene network: %s (HLA class I %d, class II %d genes)", out, n1, n2)
    return out, progs
