"""Checkpoints: our save/load round trip, and import of the official scGPT release layout.

The official weights cannot be downloaded here. Instead this file builds, from torch primitives,
a model with the released architecture and its parameter names (``encoder.enc_norm``,
``transformer_encoder.layers.N.self_attn.in_proj_weight`` -- torch's own TransformerEncoderLayer,
post-norm, ReLU -- or flash-attn's ``Wqkv``, ``decoder.fc``, ``mvc_decoder``, ``cls_decoder``),
writes it in the release layout (args.json, best_model.pt, a {token: id} vocab.json whose ids put
the special tokens last and whose keys are shuffled), imports it, and checks the imported model
reproduces that forward pass.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from scgpt_model.batching import collate_all_genes, collate_generative
from scgpt_model.checkpoint import CheckpointError, import_official, load_pretrained, save_pretrained
from scgpt_model.model import ScGPT
from scgpt_model.presets import get_preset
from scgpt_model.vocab import GeneVocab
from tests.fixtures.model import random_cells

D, HEADS, FFN, LAYERS, N_GENES, N_TYPES = 32, 4, 48, 2, 60, 5
PAD_VALUE = -2.0


class ReleasedArchitecture(nn.Module):
    """The released scGPT forward (perceptual path), written independently with torch modules."""

    def __init__(self, ntoken: int, pad_id: int) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.embedding = nn.Embedding(ntoken, D, padding_idx=pad_id)
        self.encoder.enc_norm = nn.LayerNorm(D)
        self.value_encoder = nn.Module()
        self.value_encoder.linear1 = nn.Linear(1, D)
        self.value_encoder.linear2 = nn.Linear(D, D)
        self.value_encoder.norm = nn.LayerNorm(D)
        self.flag_encoder = nn.Embedding(2, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True)  # post-norm, ReLU
        self.transformer_encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.decoder = nn.Module()
        self.decoder.fc = nn.Sequential(nn.Linear(D, D), nn.LeakyReLU(), nn.Linear(D, D), nn.LeakyReLU(),
                                        nn.Linear(D, 1))
        self.mvc_decoder = nn.Module()
        self.mvc_decoder.gene2query = nn.Linear(D, D)
        self.mvc_decoder.W = nn.Linear(D, D, bias=False)
        self.cls_decoder = nn.Module()
        self.cls_decoder._decoder = nn.ModuleList(
            [nn.Linear(D, D), nn.ReLU(), nn.LayerNorm(D), nn.Linear(D, D), nn.ReLU(), nn.LayerNorm(D)])
        self.cls_decoder.out_layer = nn.Linear(D, N_TYPES)
        for p in self.parameters():  # non-trivial values everywhere (norms too)
            nn.init.normal_(p, std=0.3)

    def forward(self, src, values, key_padding_mask):
        g = self.encoder.enc_norm(self.encoder.embedding(src))
        x = torch.clamp(values.unsqueeze(-1), max=512)
        v = self.value_encoder.norm(self.value_encoder.linear2(torch.relu(self.value_encoder.linear1(x))))
        h = self.transformer_encoder(g + v, src_key_padding_mask=key_padding_mask)
        cell = h[:, 0, :]
        pred = self.decoder.fc(h).squeeze(-1)
        q = torch.sigmoid(self.mvc_decoder.gene2query(g))
        mvc = torch.bmm(self.mvc_decoder.W(q), cell.unsqueeze(2)).squeeze(2)
        c = cell
        for m in self.cls_decoder._decoder:
            c = m(c)
        return cell, pred, mvc, self.cls_decoder.out_layer(c)


    def generative(self, pcpt_src, pcpt_values, pcpt_kpm, gen_src, gen_kpm):
        """The released generative path: known ("pcpt") tokens run ordinary layers; each unknown
        ("gen") query attends to the pcpt keys and its own key; its context skips out_proj."""
        enc = lambda ids: self.encoder.enc_norm(self.encoder.embedding(ids))  # noqa: E731
        x = torch.clamp(pcpt_values.unsqueeze(-1), max=512)
        p = enc(pcpt_src) + self.value_encoder.norm(
            self.value_encoder.linear2(torch.relu(self.value_encoder.linear1(x))))
        g = enc(gen_src) + self.flag_encoder.weight[1]
        b, n_p, n_g = p.shape[0], p.shape[1], g.shape[1]
        allow = torch.zeros(b, n_g, n_p + n_g, dtype=torch.bool)
        allow[:, :, :n_p] = ~pcpt_kpm[:, None, :]
        allow[:, torch.arange(n_g), n_p + torch.arange(n_g)] = True
        dh = D // HEADS
        for layer in self.transformer_encoder.layers:
            w, bias = layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias
            qkv_p = nn.functional.linear(p, w, bias).view(b, n_p, 3, HEADS, dh)
            qkv_g = nn.functional.linear(g, w, bias).view(b, n_g, 3, HEADS, dh)
            q = qkv_g[:, :, 0].transpose(1, 2)  # (b, h, n_g, dh)
            k = torch.cat([qkv_p[:, :, 1], qkv_g[:, :, 1]], 1).transpose(1, 2)
            v = torch.cat([qkv_p[:, :, 2], qkv_g[:, :, 2]], 1).transpose(1, 2)
            s = (q @ k.transpose(-1, -2)) / dh ** 0.5
            ctx = torch.softmax(s.masked_fill(~allow[:, None], float("-inf")), -1) @ v
            ctx = ctx.transpose(1, 2).reshape(b, n_g, D)  # no out_proj here (the quirk)
            g = layer.norm1(g + ctx)
            g = layer.norm2(g + layer.linear2(torch.relu(layer.linear1(g))))
            p = layer(p, src_key_padding_mask=pcpt_kpm)
        return p, g, self.decoder.fc(p).squeeze(-1), self.decoder.fc(g).squeeze(-1)


def _official_folder(tmp_path, naming: str, extra_key: bool):
    rnd = random.Random(0)
    genes = [f"GENE{i}" for i in range(N_GENES)]
    tokens = genes[:20] + ["<pad>"] + genes[20:40] + ["<cls>", "<eoc>"] + genes[40:]  # specials not first
    mapping = {t: i for i, t in enumerate(tokens)}
    items = list(mapping.items())
    rnd.shuffle(items)  # keys not in id order
    torch.manual_seed(0)
    ref = ReleasedArchitecture(len(tokens), mapping["<pad>"]).eval()
    state = ref.state_dict()
    if naming == "Wqkv":
        state = {k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight")
                  .replace("self_attn.in_proj_bias", "self_attn.Wqkv.bias"): v for k, v in state.items()}
    if extra_key:
        state = {f"module.{k}": v for k, v in state.items()}  # saved from a DDP wrapper
        state["module.some_future_head.weight"] = torch.zeros(3)
    d = tmp_path / f"official_{naming}"
    d.mkdir()
    torch.save(state, d / "best_model.pt")
    (d / "vocab.json").write_text(json.dumps(dict(items)))
    (d / "args.json").write_text(json.dumps({
        "embsize": D, "nheads": HEADS, "d_hid": FFN, "nlayers": LAYERS, "dropout": 0.2, "n_layers_cls": 3,
        "n_bins": 51, "max_seq_len": 1200, "pad_token": "<pad>", "pad_value": -2, "mask_value": -1,
        "input_emb_style": "continuous", "MVC": True, "fast_transformer": naming == "Wqkv",
        "USE_GENERATIVE_TRAINING": True}))
    return d, ref, mapping


@pytest.mark.parametrize("naming,extra_key", [("in_proj", False), ("Wqkv", True)])
def test_official_import_reproduces_the_released_forward(tmp_path, naming, extra_key):
    folder, ref, mapping = _official_folder(tmp_path, naming, extra_key)
    model, vocab, cfg, report = import_official(folder)
    assert cfg.norm_scheme == "post" and cfg.activation == "relu" and cfg.gene_norm and cfg.pad_value == PAD_VALUE
    assert cfg.n_cell_types == N_TYPES and cfg.objectives.gepc and cfg.d_ffn == FFN
    assert vocab.tokens[:3] == ["<pad>", "<cls>", "<eoc>"] and len(vocab) == N_GENES + 3
    assert report.unmapped == (["some_future_head.weight"] if extra_key else [])
    assert report.missing == []  # every parameter of the imported model came from the checkpoint
    model.eval()
    rng = np.random.default_rng(0)
    cells = [rng.choice(N_GENES, size=n, replace=False) for n in (12, 30, 5)]
    bins = [rng.integers(0, 51, size=len(c)).astype(np.float32) for c in cells]
    # official input: [<cls>, genes...] with <cls> value = pad_value, right-padded with <pad>/pad_value
    width = 1 + max(len(c) for c in cells)
    src = torch.full((3, width), mapping["<pad>"], dtype=torch.long)
    vals = torch.full((3, width), PAD_VALUE)
    kpm = torch.ones(3, width, dtype=torch.bool)
    for i, (c, b) in enumerate(zip(cells, bins)):
        src[i, 0] = mapping["<cls>"]
        src[i, 1:1 + len(c)] = torch.tensor([mapping[f"GENE{j}"] for j in c])
        vals[i, 1:1 + len(c)] = torch.from_numpy(b)
        kpm[i, :1 + len(c)] = False
    with torch.no_grad():
        cell_r, pred_r, mvc_r, cls_r = ref(src, vals, kpm)
        ours_ids = [vocab.encode([f"GENE{j}" for j in c]).astype(np.int64) for c in cells]
        batch = collate_all_genes(ours_ids, bins, seed=0, mask_ratio=0.0)
        out = model(batch, compute_loss=False)
    torch.testing.assert_close(out.cell_emb, cell_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.embed_cells(batch), cell_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_logits, cls_r, atol=1e-5, rtol=1e-5)
    for i, c in enumerate(cells):
        sel = batch.token_mask[i]
        n = 1 + len(c)
        torch.testing.assert_close(out.expr_pred.view(*batch.genes.shape)[i][sel], pred_r[i, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.gepc_pred.view(*batch.genes.shape)[i][sel], mvc_r[i, :n], atol=1e-5, rtol=1e-5)
    # gene embeddings follow the tokens, not the ids
    ge = model.gene_embeddings(torch.tensor([vocab["GENE7"]]))
    with torch.no_grad():
        torch.testing.assert_close(ge[0], ref.encoder.enc_norm(ref.encoder.embedding.weight[mapping["GENE7"]]))
    # load_pretrained recognises the layout too, and our own save of the import round-trips
    m2, v2, _ = load_pretrained(folder)
    assert v2 == vocab
    save_pretrained(model, vocab, tmp_path / "ours")
    m3, v3, c3 = load_pretrained(tmp_path / "ours")
    assert c3 == cfg and v3 == vocab
    with torch.no_grad():
        torch.testing.assert_close(m3.eval()(batch, compute_loss=False).cell_emb, cell_r, atol=1e-5, rtol=1e-5)


def test_official_import_reproduces_the_released_generative_forward(tmp_path):
    from scgpt_model.batching import CellTokens, assemble

    folder, ref, mapping = _official_folder(tmp_path, "Wqkv", False)
    model, vocab, cfg, _ = import_official(folder)
    assert cfg.reference_unknown_skip_out_proj
    model.eval()
    rng = np.random.default_rng(1)
    n_known, n_unknown = (8, 0, 20), (5, 9, 3)  # the second cell has no known gene at all
    cells, ref_p, ref_g = [], [], []
    for nk, nu in zip(n_known, n_unknown):
        ids = rng.choice(N_GENES, size=nk + nu, replace=False)
        vals = rng.integers(1, 51, size=nk + nu).astype(np.float32)
        ours = vocab.encode([f"GENE{j}" for j in ids]).astype(np.int64)
        unk = np.arange(nk + nu) >= nk
        cells.append(CellTokens(genes=ours, values=vals, targets=vals, unknown=unk, masked=np.zeros_like(unk),
                                loss=unk.copy()))
        ref_p.append(([mapping["<cls>"]] + [mapping[f"GENE{j}"] for j in ids[:nk]], [PAD_VALUE, *vals[:nk]]))
        ref_g.append([mapping[f"GENE{j}"] for j in ids[nk:]])
    wp, wg = 1 + max(n_known), max(n_unknown)
    pad = mapping["<pad>"]
    p_src = torch.tensor([s + [pad] * (wp - len(s)) for s, _ in ref_p])
    p_val = torch.tensor([v + [PAD_VALUE] * (wp - len(v)) for _, v in ref_p], dtype=torch.float32)
    p_kpm = p_src == pad
    g_src = torch.tensor([s + [pad] * (wg - len(s)) for s in ref_g])
    g_kpm = g_src == pad
    batch = assemble(cells)
    with torch.no_grad():
        hp, hg, pred_p, pred_g = ref.generative(p_src, p_val, p_kpm, g_src, g_kpm)
        out = model(batch, compute_loss=False)
    h = out.hidden.view(*batch.genes.shape, -1)
    pred = out.expr_pred.view(*batch.genes.shape)
    for i, (nk, nu) in enumerate(zip(n_known, n_unknown)):
        torch.testing.assert_close(h[i, : nk + 1], hp[i, : nk + 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[i, nk + 1: nk + 1 + nu], hg[i, :nu], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pred[i, nk + 1: nk + 1 + nu], pred_g[i, :nu], atol=1e-5, rtol=1e-5)
    # without the quirk the unknown tokens differ: the flag really selects the released behaviour
    model.cfg = cfg  # (config object unchanged; flip the layers)
    for layer in model.layers:
        layer.attn.unknown_skip_out_proj = False
    with torch.no_grad():
        h2 = model(batch, compute_loss=False).hidden.view(*batch.genes.shape, -1)
    assert (h2[0, 9:14] - hg[0, :5]).abs().max() > 1e-3


def test_save_load_round_trip(tmp_path):
    cfg = get_preset("debug", 200, n_batches=2, use_batch_labels=True, objectives={"gep_loss": "ce"})
    torch.manual_seed(0)
    model = ScGPT(cfg)
    vocab = GeneVocab.from_genes([f"ENSG{i:011d}" for i in range(197)])
    save_pretrained(model, vocab, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.pt", "vocab.json"]
    loaded, v, c = load_pretrained(tmp_path / "ckpt")
    assert c == cfg and v == vocab
    rng = np.random.default_rng(0)
    genes, values = random_cells(rng, 3, 200, min_len=1, max_len=30)
    batch = collate_generative(genes, values, max_seq_len=64, seed=0, batch_labels=[0, 1, 0])
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch).loss.total, loaded(batch).loss.total, atol=0, rtol=0)
    # overrides, e.g. a fine-tuning dropout
    m2, _, c2 = load_pretrained(tmp_path / "ckpt", dropout=0.1)
    assert c2.dropout == 0.1


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_pretrained(tmp_path / "empty")
    model = ScGPT(get_preset("debug", 50))
    with pytest.raises(CheckpointError, match="vocabulary has"):
        save_pretrained(model, GeneVocab.from_genes(["A", "B"]), tmp_path / "x")


def test_fine_tune_overrides_add_heads_and_extend_vocabulary(tmp_path):
    from scgpt_model.transfer import extend_vocabulary

    torch.manual_seed(0)
    model = ScGPT(get_preset("debug", 50))
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(47)])
    save_pretrained(model, vocab, tmp_path / "pre")
    ft, _, cfg = load_pretrained(tmp_path / "pre", n_cell_types=4, objectives={"cls": True})
    assert cfg.n_cell_types == 4 and ft.cls_head is not None
    torch.testing.assert_close(ft.layers[0].attn.qkv.weight, model.layers[0].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="size of an existing layer"):
        load_pretrained(tmp_path / "pre", d_ffn=32)
    # multi-omic: append protein features, keep RNA gene embeddings by token
    big, big_vocab = extend_vocabulary(model, vocab, ["CD3-protein", "CD19-protein", "G3"], n_modalities=2)
    assert len(big_vocab) == 52 and big_vocab.tokens[:50] == vocab.tokens
    torch.testing.assert_close(big.gene_embeddings(torch.arange(50)), model.gene_embeddings())
    torch.testing.assert_close(big.layers[1].linear1.weight, model.layers[1].linear1.weight)
    fresh, _ = extend_vocabulary(model, vocab, ["P1"], inherit="embeddings")
    assert not torch.equal(fresh.layers[1].linear1.weight, model.layers[1].linear1.weight)
    torch.testing.assert_close(fresh.gene_embeddings(torch.arange(50)), model.gene_embeddings())
