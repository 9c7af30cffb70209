"""The perturbation task: metrics on hand-computed examples, unseen-perturbation splits (no leakage,
over many seeds, one- and two-gene data), perturbation flags through collate and sub-sampling,
the linear baseline on a planted linear effect, end to end on the shipped Papalexi screen at CI
size (logged, linked to the model version, reproducible), and every bad input (exit 2)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest

from eval import perturbation_scores as ps
from eval.cli import main
from eval.report import SIGNED_UNIT, UNIT_INTERVAL

FAST = ["--epochs", "1", "--max-cells", "200", "--max-perturbations", "5", "--n-hvg", "80", "--splits", "2",
        "--batch-size", "32"]


# ------------------------------------------------------------------------------------------------
def test_metrics_on_a_hand_computed_example():
    ctrl = np.array([1.0, 1.0, 1.0, 1.0])
    obs = np.array([2.0, 0.0, 1.0, 3.0])  # change +1, -1, 0, +2
    pred = np.array([1.5, 0.5, 1.0, 1.0])  # change +.5, -.5, 0, 0
    de = np.array([0, 1, 3])
    s = ps.scores(pred, obs, ctrl, de)
    # all genes: pred - mean = (.5,-.5,0,0), obs - mean = (.5,-1.5,-.5,1.5): r = 1 / sqrt(.5 * 5) = 0.632456
    assert s["pearson"] == pytest.approx(1 / np.sqrt(2.5))
    # changes: dp = (.5,-.5,0,0) (mean 0), do = (1,-1,0,2) (mean .5) -> centred (.5,-1.5,-.5,1.5): same r
    assert s["pearson_delta"] == pytest.approx(1 / np.sqrt(2.5))
    # DE genes 0,1,3: pred (1.5,.5,1) vs obs (2,0,3): centred (.5,-.5,0) and (1/3,-5/3,4/3): r = 1 / sqrt(.5 * 42/9)
    assert s["pearson_de"] == pytest.approx(1 / np.sqrt(0.5 * 42 / 9))
    # DE changes (.5,-.5,0) vs (1,-1,2): centred (.5,-.5,0) and (1/3,-5/3,4/3): the same r
    assert s["pearson_delta_de"] == pytest.approx(1 / np.sqrt(0.5 * 42 / 9))
    assert s["mse_de"] == pytest.approx((0.25 + 0.25 + 4.0) / 3)
    assert s["direction_de"] == pytest.approx(2 / 3)  # gene 3: predicted change 0, observed +2


def test_no_change_corr_delta_is_undefined_not_zero_or_nan_in_a_mean():
    from eval.perturbation import NO_CHANGE, PerturbationResult

    ctrl = np.array([1.0, 2.0, 3.0, 0.5])
    obs = np.array([2.0, 1.0, 3.5, 0.0])
    s = ps.scores(ps.no_change(ctrl, 1)[0], obs, ctrl, np.array([0, 1, 2]))
    assert s["pearson_delta"] is None and s["pearson_delta_de"] is None  # undefined, not 0 and not NaN
    assert s["pearson"] is not None and s["direction_de"] == 0.0
    assert ps.pearson(np.ones(5), np.arange(5.0)) is None
    assert np.isnan(ps.mean_defined([None, None]))  # nothing defined: undefined
    assert ps.mean_defined([0.5, None, 0.7]) == pytest.approx(0.6)  # an undefined value is skipped, not 0
    table = pd.DataFrame({"pearson_delta_de": [0.4, np.nan]}, index=["scGPT", NO_CHANGE])
    md = PerturbationResult("perturbation", "x", table, {"n_splits": 1}, spread=table * 0).markdown()
    assert "| no change | undefined |" in md and "nan" not in md.lower()


# ------------------------------------------------------------------------------------------------
def _combo_targets(rng, n_genes=8, n_combos=12):
    genes = [f"G{i}" for i in range(n_genes)]
    t = {g: (g,) for g in genes}
    n_combos = min(n_combos, n_genes * (n_genes - 1) // 2)
    while len(t) < n_genes + n_combos:
        a, b = sorted(rng.choice(genes, 2, replace=False))
        t[f"{a}+{b}"] = (a, b)
    return t


@pytest.mark.parametrize("kind", ["single", "combo"])
def test_no_test_or_validation_perturbation_reaches_training_over_many_seeds(kind):
    rng = np.random.default_rng(0)
    groups_seen: set[str] = set()
    for seed in range(200):
        if kind == "single":
            n = int(rng.integers(3, 30))
            targets = {f"P{i}": (f"P{i}",) for i in range(n)}
        else:
            targets = _combo_targets(rng, int(rng.integers(3, 10)), int(rng.integers(1, 15)))
        sp = ps.make_split(targets, seed)
        train, held = set(sp.train), set(sp.val) | set(sp.test)
        assert sp.train and sp.val and sp.test
        assert not train & held and not set(sp.val) & set(sp.test)
        assert train | held == set(targets)
        # cells: a training cell is any cell whose condition is a training perturbation (or control)
        conditions = np.array(["ctrl", *[p for p in targets for _ in range(3)]])
        train_cells = np.isin(conditions, ["ctrl", *sp.train])
        assert not np.isin(conditions[train_cells], list(held)).any()
        seen = {g for p in sp.train for g in targets[p]}
        for p, group in sp.subgroup.items():
            if len(targets[p]) == 1:
                assert group == "single"
            else:
                assert group == f"combo_seen{sum(g in seen for g in targets[p])}"
            groups_seen.add(group)
    # every GEARS subgroup occurs: two-gene test perturbations with 0, 1 and 2 of their genes seen
    assert groups_seen == ({"single"} if kind == "single" else {"single", "combo_seen0", "combo_seen1", "combo_seen2"})
    assert ps.make_split(targets, 7).test == ps.make_split(targets, 7).test  # seeded


def test_two_gene_conditions_parse_gears_style():
    from eval.perturbation_data import parse_condition

    assert parse_condition("ctrl", "ctrl") == ()
    assert parse_condition("STAT1+ctrl", "ctrl") == ("STAT1",)
    assert parse_condition("ctrl+STAT1", "ctrl") == ("STAT1",)
    assert parse_condition("STAT1+JAK2", "ctrl") == ("JAK2", "STAT1")
    assert parse_condition("unassigned", "ctrl") is None and parse_condition("NT", "NT") == ()


# ------------------------------------------------------------------------------------------------
def test_perturbation_flags_survive_collate_and_subsampling():
    from scgpt_model.batching import collate_perturbation

    rng = np.random.default_rng(1)
    G = 60
    genes = np.arange(10, 10 + G)
    for seed in range(50):
        flags = np.zeros((4, G), dtype=np.int64)
        for i in range(4):
            flags[i, rng.choice(G, size=int(rng.integers(1, 3)), replace=False)] = 1
        measured = np.ones((4, G), dtype=bool)
        measured[0, np.flatnonzero(flags[0])[0]] = False  # an unmeasured target
        x = rng.random((4, G)).astype(np.float32)
        b = collate_perturbation(genes, x, x, flags, measured=measured, max_seq_len=20, seed=seed)
        for i in range(4):
            row = b.genes[i][b.token_mask[i]][1:].numpy()  # without <cls>
            assert row.size <= 20  # sub-sampled ...
            for j in np.flatnonzero(flags[i]):  # ... but every flag kept, on its gene
                k = np.flatnonzero(row == genes[j])
                assert k.size == 1 and int(b.condition[i][1 + k[0]]) == 1
        j0 = np.flatnonzero(b.genes[0].numpy() == genes[np.flatnonzero(~measured[0])[0]])[0]
        assert bool(b.masked[0, j0]) and not bool(b.loss_mask[0, j0])  # no value, no loss
        assert int(b.loss_mask.sum()) == int(b.token_mask.sum()) - 4 - 1  # every other real gene carries loss


@pytest.fixture(scope="module")
def small_screen(eval_debug_model_dir):
    from eval.api import ScGPTModel
    from eval.perturbation_data import prepare_perturbation, resolve

    m = ScGPTModel.load(str(eval_debug_model_dir), device="cpu")
    name, a = resolve("papalexi")
    keep = a.obs["perturbation"].isin(["ctrl", "STAT1", "IRF1", "JAK2", "CUL3", "unassigned"]).to_numpy()
    sub = a[np.flatnonzero(keep)[::4]].copy()
    return m, sub, prepare_perturbation(sub, m.vocab, name="small", n_hvg=60)


def test_an_unmeasured_target_gets_its_token_and_flag_and_is_not_scored(small_screen):
    from eval.perturbation import PerturbConfig, Tokens, control_pool, predict_means, task_config
    from eval.finetune import build_task_model
    from eval.genes import symbol_table

    m, sub, d = small_screen
    assert "IRF1" not in sub.var_names and "STAT1" in sub.var_names  # Papalexi measures STAT1, not IRF1
    assert d.target_column["IRF1"] == -1 and d.genes[d.target_column["STAT1"]] == "STAT1"
    assert d.report["cells_dropped_other_labels"] == int((sub.obs["perturbation"] == "unassigned").sum())
    tok = Tokens(d)
    g, f, ms = tok.layout("IRF1")
    assert g.size == d.n_genes + 1 and g[-1] == m.vocab[symbol_table()["IRF1"]] and f[-1] == 1 and not ms[-1]
    assert f[:d.n_genes].sum() == 0 and ms[:d.n_genes].all()
    g, f, ms = tok.layout("STAT1")
    assert g.size == d.n_genes and f.sum() == 1 and f[d.target_column["STAT1"]] == 1
    model = build_task_model(m.model, task_config(m.config), 0)
    cfg = PerturbConfig(n_pred_controls=8)
    pred = predict_means(model, tok, ["IRF1", "STAT1"], control_pool(d, cfg), cfg)
    assert pred.shape == (2, d.n_genes) and np.isfinite(pred).all()  # scored on the measured genes only
    assert all(p.size == min(20, d.n_genes) and p.max() < d.n_genes for p in d.de_genes.values())


# ------------------------------------------------------------------------------------------------
def test_linear_baseline_recovers_a_planted_linear_effect():
    rng = np.random.default_rng(0)
    G, k, n = 200, 3, 40
    E = rng.normal(size=(G, k))  # latent gene programmes
    W = rng.normal(size=(k, k))
    ctrl = 2.0 + rng.normal(scale=0.3, size=G)
    cols = [[int(c)] for c in rng.choice(G, size=n, replace=False)]
    effect = lambda c: E @ W @ E[c[0]]  # noqa: E731  the change of knocking out gene c: linear in its programme
    means = np.stack([ctrl + effect(c) for c in cols])
    train, test = slice(0, 30), slice(30, n)
    pred = ps.linear_baseline(ctrl, means[train], cols[train], cols[test])
    for i, c in enumerate(cols[test]):
        r = ps.pearson(pred[i] - ctrl, effect(c))
        assert r > 0.95, r
    tm = ps.train_mean(ctrl, means[train], 10)
    assert np.mean([ps.pearson(tm[i] - ctrl, effect(c)) for i, c in enumerate(cols[test])]) < 0.9
    # a target without a gene embedding (not measured) falls back to the fitted offset: the training mean
    none = ps.linear_baseline(ctrl, means[train], cols[train], [[]])
    center = np.vstack([np.zeros(G), means[train] - ctrl]).mean(axis=0)
    np.testing.assert_allclose(none[0], ctrl + center, rtol=1e-4, atol=1e-4)


def test_linear_scgpt_emb_places_an_unmeasured_target_through_its_pretrained_embedding():
    rng = np.random.default_rng(1)
    G, U, k, d, n = 200, 20, 3, 16, 40
    E = rng.normal(size=(G + U, k))  # latent programmes of G measured and U unmeasured genes
    R = rng.normal(size=(k, d))  # the pretrained token embedding is a linear image of the programme
    tok = E @ R + 0.01 * rng.normal(size=(G + U, d))
    W = rng.normal(size=(k, k))
    ctrl = 2.0 + rng.normal(scale=0.3, size=G)
    effect = lambda u: E[:G] @ W @ E[u]  # noqa: E731  the change of knocking out gene u (measured or not)
    measured = [int(c) for c in rng.choice(G, size=30, replace=False)]
    unmeasured = list(range(G, G + U))
    train = measured + unmeasured[:10]
    test = unmeasured[10:]  # unseen targets that are not measured: no PCA gene embedding
    means = np.stack([ctrl + effect(u) for u in train])
    cols = lambda us: [[u] if u < G else [] for u in us]  # noqa: E731
    ext = lambda us: [[tok[u]] if u >= G else [] for u in us]  # noqa: E731
    pred = ps.linear_baseline(ctrl, means, cols(train), cols(test), gene_emb=tok[:G],
                              train_ext=ext(train), test_ext=ext(test))
    r = [ps.pearson(pred[i] - ctrl, effect(u)) for i, u in enumerate(test)]
    assert min(r) > 0.9, r
    # without the pretrained embeddings every such target gets the same offset prediction
    plain = ps.linear_baseline(ctrl, means, cols(train), cols(test))
    np.testing.assert_allclose(plain[0], plain[-1], rtol=1e-5, atol=1e-5)
    assert np.mean([ps.pearson(plain[i] - ctrl, effect(u)) for i, u in enumerate(test)]) < 0.5


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e(registered_debug_model, tmp_path_factory):
    tracking_uri, model_uri = registered_debug_model
    outs = []
    for i in range(2):
        out = tmp_path_factory.mktemp(f"pert_run{i}")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(["--model", model_uri, "--task", "perturbation", "--dataset", "papalexi", "--tracking-uri",
                         tracking_uri, "--out", str(out), *FAST, *([] if i == 0 else ["--no-plots"])])
        assert code == 0
        outs.append((out, buf.getvalue()))
    return tracking_uri, model_uri, outs


def test_end_to_end_on_the_shipped_screen_logged_and_reproducible(e2e):
    from mlflow.tracking import MlflowClient

    tracking_uri, model_uri, outs = e2e
    d = outs[0][0] / "perturbation_papalexi"
    tables = [pd.read_csv(o / "perturbation_papalexi" / "scores_perturbation_papalexi.csv", index_col=0)
              for o, _ in outs]
    df = tables[0]
    assert list(df.index) == ["scGPT", "scGPT random init", "linear (PCA)", "linear (scGPT emb.)", "train mean",
                              "no change"]
    assert list(df.columns) == list(ps.METRICS)
    for method, row in df.iterrows():
        for metric, v in row.items():
            if method == "no change" and metric.startswith("pearson_delta"):
                assert np.isnan(v)  # undefined
                continue
            assert np.isfinite(v), f"{method}/{metric}"
            if metric in SIGNED_UNIT:
                assert -1 <= v <= 1
            if metric in UNIT_INTERVAL:
                assert 0 <= v <= 1
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)  # same command, same table
    printed = outs[0][1]
    assert "**perturbation** on `papalexi`" in printed and "undefined" in printed and "±" in printed
    per = pd.read_csv(d / "perturbation_scores_per_perturbation_papalexi.csv")
    assert set(per["split"]) == {0, 1} and set(per["method"]) == set(df.index)
    for png in ("perturbation_delta_de_papalexi.png", "perturbation_corr_delta_de_papalexi.png"):
        assert (d / png).stat().st_size > 1000
    c = MlflowClient(tracking_uri=tracking_uri)
    name, version = model_uri.removeprefix("models:/").split("/")
    mv = c.get_model_version(name, version)
    run = c.get_run(mv.tags["eval.perturbation.papalexi"])  # the version links its evaluation
    assert run.info.status == "FINISHED" and run.data.tags["model_version"] == str(version)
    assert run.data.metrics["scGPT/pearson_delta_de"] == pytest.approx(float(tables[1].loc["scGPT", "pearson_delta_de"]))
    assert "no change/pearson_delta_de" not in run.data.metrics  # undefined is not logged as a number
    assert run.data.params["control_label"] == "ctrl" and run.data.params["other_labels"] == "unassigned"
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "perturbation")}
    assert "perturbation/perturbation_scores_per_perturbation_papalexi.csv" in arts


# ------------------------------------------------------------------------------------------------
def _bad(small_screen, tmp_path, case: str) -> tuple[str, list[str]]:
    _, sub, _ = small_screen
    a = sub.copy()
    extra: list[str] = []
    if case == "no_control":
        a.obs["perturbation"] = a.obs["perturbation"].astype(str).replace({"ctrl": "scrambled"})
    elif case == "wrong_control":
        extra = ["--control", "NTC"]
    elif case == "no_key":
        a.obs = a.obs.drop(columns=["perturbation"])
    elif case == "few":
        lab = a.obs["perturbation"].astype(str)
        a = a[lab.isin(["ctrl", "STAT1", "IRF1"]).to_numpy()].copy()
    elif case == "oov":
        lab = a.obs["perturbation"].astype(str)
        a.obs["perturbation"] = np.where(lab == "ctrl", "ctrl", "NOTAGENE" + lab)
    elif case == "lognorm":
        X = a.X.toarray()
        a.X = np.log1p(X / X.sum(1, keepdims=True).clip(1) * 1e4)
    path = tmp_path / f"{case}.h5ad"
    a.write_h5ad(path)
    return str(path), extra


@pytest.mark.parametrize("case,match", [
    ("no_control", "no control cells found"),
    ("wrong_control", "control label 'NTC' is not in"),
    ("no_key", "no perturbation column 'perturbation'.*obs columns: bio_rep"),
    ("few", "at least 3"),
    ("oov", "no perturbation target is in the model's vocabulary"),
    ("lognorm", "log-normalized"),
    ("unknown", "neither a shipped perturbation screen"),
])
def test_bad_input_is_one_message_and_exit_2(case, match, small_screen, eval_debug_model_dir, tmp_path, capsys):
    import re

    path, extra = ("not_a_screen", []) if case == "unknown" else _bad(small_screen, tmp_path, case)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    capsys.readouterr()
    code = main(["--model", str(eval_debug_model_dir), "--task", "perturbation", "--dataset", path,
                 "--tracking-uri", uri, *extra, *FAST])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("evaluate: error:")]
    assert len(lines) == 1 and re.search(match, lines[0]), err
    import mlflow

    exp = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("scgpt-eval")
    assert exp is None or not mlflow.MlflowClient(tracking_uri=uri).search_runs([exp.experiment_id])


def test_perturbation_step_floor_is_its_own_or_the_suites():
    # the demo gives annotation / integration 600 steps and the (slowest) perturbation fine-tunes fewer
    from eval.cli import _parser
    from eval.perturbation import perturbation_min_steps
    from eval.tasks import EvalOptions

    assert perturbation_min_steps(EvalOptions(min_steps=600)) == 600
    assert perturbation_min_steps(EvalOptions(min_steps=600, perturbation_min_steps=150)) == 150
    assert perturbation_min_steps(EvalOptions(min_steps=600, perturbation_min_steps=0)) == 0
    args = _parser(True).parse_args(["--model", "m", "--min-steps", "600", "--perturbation-min-steps", "150"])
    assert (args.min_steps, args.perturbation_min_steps) == (600, 150)
