"""Each metric against a small hand-computed example, and the scib-based numbers against scib
called directly on the same embedding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eval import baselines, genenet, metrics


def test_classification_scores_hand_example():
    # a: tp 1 fn 1 -> P 1, R .5, F1 2/3; b: tp 1 fp 2 -> P 1/3, R 1, F1 .5; c: F1 0
    s = metrics.classification_scores(["a", "a", "b", "c"], ["a", "b", "b", "b"])
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["precision"] == pytest.approx(0.5)  # global (micro) = accuracy for single-label data
    assert s["recall"] == pytest.approx(0.5)
    assert s["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    assert s["precision_macro"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert s["recall_macro"] == pytest.approx((0.5 + 1 + 0) / 3)


def test_normalized_confusion_rows_sum_to_one():
    cm = metrics.normalized_confusion(["a", "a", "b", "c"], ["a", "b", "b", "b"])
    expected = pd.DataFrame([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], index=list("abc"), columns=list("abc"))
    np.testing.assert_allclose(cm.to_numpy(), expected.to_numpy())
    assert list(cm.index) == list("abc") and list(cm.columns) == list("abc")


def test_knn_transfer_majority_and_tie():
    ref = np.array([[1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1]], dtype=float)
    lab = np.array(["x", "x", "x", "y", "y"])
    q = np.array([[1, 0.05], [0.05, 1]])
    assert list(metrics.knn_transfer(ref, lab, q, k=3)) == ["x", "y"]
    # k=2 around [0.2, 1]: one y (nearest) and ... both nearest are y; a true tie: query between groups
    ref2 = np.array([[1, 0], [0, 1]], dtype=float)
    assert list(metrics.knn_transfer(ref2, np.array(["x", "y"]), np.array([[1, 0.9]]), k=2)) == ["x"]


def _toy_square():
    """Two cell types 10 apart, each a unit square whose left/right columns are batches x/y."""
    emb = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [10, 0], [10, 1], [11, 0], [11, 1]], dtype=float)
    labels = np.array(["A"] * 4 + ["B"] * 4)
    batches = np.array(["x", "x", "y", "y"] * 2)
    return emb, labels, batches


def test_integration_scores_hand_example():
    emb, labels, batches = _toy_square()
    s = metrics.integration_scores(emb, labels, batches, n_neighbors=3)
    # perfect clusters exist at some resolution -> best-NMI clustering matches the labels
    assert s["NMI_cell"] == pytest.approx(1.0)
    assert s["ARI_cell"] == pytest.approx(1.0)
    # silhouette: a = (1 + 1 + sqrt2)/3 for every cell; b = mean distance to the other type:
    # outer columns (x = 0, 11): (10 + sqrt101 + 11 + sqrt122)/4; inner (x = 1, 10): (9 + sqrt82 + 10 + sqrt101)/4
    a = (2 + np.sqrt(2)) / 3
    b_outer = (10 + np.sqrt(101) + 11 + np.sqrt(122)) / 4
    b_inner = (9 + np.sqrt(82) + 10 + np.sqrt(101)) / 4
    asw = ((1 - a / b_outer) + (1 - a / b_inner)) / 2
    assert s["ASW_cell"] == pytest.approx((asw + 1) / 2, abs=1e-6)
    # batch silhouette inside a type: a = 1, b = (1 + sqrt2)/2 -> s = (b - a)/b; ASW_batch = 1 - |s|
    bb = (1 + np.sqrt(2)) / 2
    assert s["ASW_batch"] == pytest.approx(1 - (bb - 1) / bb, abs=1e-6)
    assert s["GraphConn"] == pytest.approx(1.0)
    assert s["AvgBIO"] == pytest.approx((s["NMI_cell"] + s["ARI_cell"] + s["ASW_cell"]) / 3)
    assert s["AvgBATCH"] == pytest.approx((s["ASW_batch"] + s["GraphConn"]) / 2)
    assert s["Overall"] == pytest.approx(0.6 * s["AvgBIO"] + 0.4 * s["AvgBATCH"])


def test_nmi_is_arithmetic_normalised_mutual_information():
    import anndata as ad
    import scib

    u = np.array([0, 0, 1, 1, 1, 2])
    v = np.array([0, 0, 0, 1, 1, 1])

    def h(x):
        p = np.bincount(x) / x.size
        p = p[p > 0]
        return -(p * np.log(p)).sum()

    joint = pd.crosstab(u, v).to_numpy() / u.size
    pu, pv = joint.sum(1), joint.sum(0)
    mi = sum(joint[i, j] * np.log(joint[i, j] / (pu[i] * pv[j]))
             for i in range(joint.shape[0]) for j in range(joint.shape[1]) if joint[i, j] > 0)
    a = ad.AnnData(np.zeros((6, 1)), obs=pd.DataFrame({"c": u.astype(str), "l": v.astype(str)}))
    assert scib.metrics.nmi(a, "c", "l") == pytest.approx(mi / ((h(u) + h(v)) / 2))


def test_integration_scores_equal_scib_called_directly():
    import scanpy as sc
    import scib

    rng = np.random.default_rng(3)
    labels = np.repeat(["t1", "t2", "t3"], 60)
    batches = np.tile(["b1", "b2"], 90)
    emb = rng.normal(size=(180, 8))
    emb[:, 0] += (labels == "t1") * 4
    emb[:, 1] += (labels == "t2") * 4
    emb[:, 2] += (batches == "b1") * 1.5
    ours = metrics.integration_scores(emb, labels, batches, seed=0)

    a = metrics.embedding_adata(emb, labels, batches)  # same kNN graph construction as scanpy's
    ref = sc.pp.neighbors(a, use_rep="X_emb", n_neighbors=15, random_state=0, copy=True)

    def leiden(adata, resolution, key_added, **_):
        sc.tl.leiden(adata, resolution=resolution, key_added=key_added, flavor="igraph", n_iterations=2,
                     directed=False, random_state=0)

    leiden.__name__ = "leiden"
    scib.metrics.cluster_optimal_resolution(ref, label_key="label", cluster_key="cl", cluster_function=leiden,
                                            resolutions=list(metrics.RESOLUTIONS), verbose=False)
    direct = {
        "NMI_cell": scib.metrics.nmi(ref, "cl", "label"),
        "ARI_cell": scib.metrics.ari(ref, "cl", "label"),
        "ASW_cell": scib.metrics.silhouette(ref, label_key="label", embed="X_emb"),
        "ASW_batch": scib.metrics.silhouette_batch(ref, batch_key="batch", label_key="label", embed="X_emb",
                                                   verbose=False),
        "GraphConn": scib.metrics.graph_connectivity(ref, label_key="label"),
    }
    for k, v in direct.items():
        assert ours[k] == pytest.approx(float(v), abs=1e-12), k
    assert metrics.RESOLUTIONS[0] == 0.1 and metrics.RESOLUTIONS[-1] == 2.0 and len(metrics.RESOLUTIONS) == 20


def test_pathway_correlation_hand_example():
    # g0, g1 in P1 and P2; g2 in P2; g3 in none (left out). shared: (0,1)=2, (0,2)=1, (1,2)=1
    genes = ["g0", "g1", "g2", "g3"]
    pw = genenet.Pathways(["P1", "P2"], ["p1", "p2"], [frozenset({"g0", "g1"}), frozenset({"g0", "g1", "g2"})])
    M = genenet.membership(genes, pw)
    sim = np.eye(4)
    sim[0, 1] = sim[1, 0] = 0.9
    sim[0, 2] = sim[2, 0] = 0.1
    sim[1, 2] = sim[2, 1] = 0.2
    sim[3, :3] = sim[:3, 3] = 0.5
    r, n = genenet.pathway_correlation(sim, M)
    assert n == 3
    x, y = np.array([0.9, 0.1, 0.2]), np.array([2.0, 1.0, 1.0])
    dx, dy = x - x.mean(), y - y.mean()
    assert r == pytest.approx((dx @ dy) / np.sqrt((dx @ dx) * (dy @ dy)))
    assert r == pytest.approx(0.99339, abs=1e-4)


def test_neighbours_share_and_hla_separation():
    genes = ["CD8A", "CD8B", "GZMK", "ALB", "HLA-A", "HLA-B", "HLA-DRA", "HLA-DRB1"]
    sim = np.full((8, 8), 0.1)
    np.fill_diagonal(sim, 1.0)
    sim[0, 1] = sim[1, 0] = 0.9
    sim[0, 2] = sim[2, 0] = 0.8
    assert genenet.neighbours(sim, genes, "CD8A", k=3) == ["CD8A", "CD8B", "GZMK"]
    immune = frozenset({"CD8A", "CD8B"})
    assert genenet.neighbour_pathway_share(sim, genes, immune, "CD8A", k=3) == pytest.approx(2 / 3)
    sim[4, 5] = sim[5, 4] = 0.8  # class I pair
    sim[6, 7] = sim[7, 6] = 0.6  # class II pair
    score, n1, n2 = genenet.hla_separation(sim, genes)
    assert (n1, n2) == (2, 2)
    assert score == pytest.approx((0.8 + 0.6) / 2 - 0.1)


def test_gene_programs_and_enrichment():
    n = 14
    sim = np.zeros((n, n))
    for block in (range(0, 5), range(5, 11)):
        for i in block:
            for j in block:
                sim[i, j] = 0.9
    np.fill_diagonal(sim, 1.0)
    progs = genenet.gene_programs(sim, threshold=0.4, min_size=5)
    assert [sorted(p.tolist()) for p in progs] == [list(range(5, 11)), list(range(0, 5))]
    genes = [f"g{i}" for i in range(n)]
    pw = genenet.Pathways(["P1", "P2"], ["p1", "p2"],
                          [frozenset(genes[:5]), frozenset([genes[5], genes[6], genes[11], genes[12]])])
    M = genenet.membership(genes, pw)
    # block 1: overlap 5 of 5, N=9 annotated, K=5 -> p = 1/C(9,5) = 1/126, x4 tests = 0.032 < 0.05;
    # block 2: 2 annotated genes both in P2 (K=4) -> p = C(4,2)/C(9,2) = 1/6, not enriched
    assert genenet.program_enrichment(progs, M, alpha=0.05) == pytest.approx(0.5)
    assert genenet.program_enrichment(progs, M, alpha=0.01) == pytest.approx(0.0)


def test_reactome_gmt_has_immune_system():
    pw = genenet.load_gmt()
    immune = pw.by_id(genenet.IMMUNE_SYSTEM)
    assert len(pw.ids) == 2694 and "CD8A" in immune and "HLA-A" in immune


def test_coexpression_is_pearson():
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(50, 6)).astype(float)
    np.testing.assert_allclose(baselines.coexpression_similarity(X), np.corrcoef(X.T), atol=1e-6)


def test_logreg_and_pca_baselines_on_separable_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 20))
    y = np.repeat(["a", "b"], 60)
    X[y == "a", :5] += 4
    tr = np.r_[0:40, 60:100]
    te = np.setdiff1d(np.arange(120), tr)
    assert (baselines.logreg_annotation(X[tr], y[tr], X[te], n_comps=5) == y[te]).all()
    assert baselines.pca_embedding(X, n_comps=10).shape == (120, 10)


def test_harmony_removes_a_batch_shift_and_keeps_types():
    rng = np.random.default_rng(0)
    n = 600
    types, batches = rng.integers(0, 3, n), np.where(rng.integers(0, 2, n) == 1, "y", "x")
    pcs = rng.normal(size=(n, 10)) * 0.5
    pcs[:, 1] += types * 4
    pcs[:, 2] += (types == 2) * 4
    pcs[:, 0] += (batches == "y") * 3.0  # the batch effect
    z = baselines.harmony_embedding(pcs, batches)
    gap = lambda m: abs(m[batches == "x", 0].mean() - m[batches == "y", 0].mean())  # noqa: E731
    assert z.shape == pcs.shape
    assert gap(z) < 0.5 * gap(pcs)
    assert z[types == 1, 1].mean() - z[types == 0, 1].mean() > 3.0
