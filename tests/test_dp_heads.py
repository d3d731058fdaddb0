"""DP-SGD linear heads on the vectorised farm (defences/dp_ensemble.py, models/dp_heads.py) against independent implementations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mia_lightning.attacks import AttackData, create_attack
from mia_lightning.attacks.module import score_targets
from mia_lightning.contract.components import ComponentSpec
from mia_lightning.data.plan import PlanSpec, make_lira_plan
from mia_lightning.defences.dp_ensemble import PAD, PoissonIndexBatches, clipped_gradient_sums
from mia_lightning.defences.dp_sgd import PoissonBatchSampler
from mia_lightning.errors import MiaError
from mia_lightning.farm.engine import FarmSetup, ModelJob, SequentialEngine, model_seed
from mia_lightning.farm.vectorised import VectorisedEngine, choose_engine
from mia_lightning.metrics import roc_curve


def per_sample_gradients(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, d*C + C]: each sample's cross-entropy gradient w.r.t. (W [d, C], b [C]) by torch.func, flattened."""
    from torch.func import grad, vmap

    def loss(w, b, xi, yi):
        return F.cross_entropy((xi @ w + b).unsqueeze(0), yi.unsqueeze(0))

    gw, gb = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(weight, bias, x, y)
    return torch.cat([gw.flatten(1), gb], dim=1)


def residuals(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.baddbmm(bias, x, weight), -1) - F.one_hot(y, weight.shape[-1]).double()


def test_closed_form_per_sample_gradients_and_clipping_equal_torch_func():
    """Norms equal torch.func's per-sample gradient norms; the clipped sums equal the sums of torch.func's gradients clipped one by one (padding ignored)."""
    torch.manual_seed(0)
    K, B, d, C = 3, 7, 5, 4
    weight, bias = torch.randn(K, d, C, dtype=torch.float64), torch.randn(K, 1, C, dtype=torch.float64)
    x, y = 3 * torch.randn(K, B, d, dtype=torch.float64), torch.randint(0, C, (K, B))
    valid = torch.rand(K, B) < 0.7
    clip = torch.tensor([0.5, 2.0, 100.0], dtype=torch.float64)
    grad_w, grad_b, norms = clipped_gradient_sums(x, residuals(weight, bias, x, y), valid, clip)
    for k in range(K):
        reference = per_sample_gradients(weight[k], bias[k, 0], x[k], y[k])
        torch.testing.assert_close(norms[k], reference.norm(dim=1))
        clipped = reference * (clip[k] / (reference.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)
        total = clipped[valid[k]].sum(0)
        torch.testing.assert_close(torch.cat([grad_w[k].flatten(), grad_b[k, 0]]), total)


def test_a_single_sample_gradient_is_clipped_to_the_norm():
    """With one sample per model the clipped sum is that sample's clipped gradient: norm min(raw, C), over W and b together."""
    torch.manual_seed(1)
    K, d, C = 4, 6, 3
    weight, bias = torch.randn(K, d, C, dtype=torch.float64), torch.randn(K, 1, C, dtype=torch.float64)
    x, y = torch.randn(K, 1, d, dtype=torch.float64) * torch.tensor([0.01, 1.0, 10.0, 100.0], dtype=torch.float64)[:, None, None], torch.randint(0, C, (K, 1))
    clip = torch.full((K,), 1.0, dtype=torch.float64)
    grad_w, grad_b, norms = clipped_gradient_sums(x, residuals(weight, bias, x, y), torch.ones(K, 1, dtype=torch.bool), clip)
    total = torch.sqrt(grad_w.flatten(1).pow(2).sum(1) + grad_b.flatten(1).pow(2).sum(1))
    assert (total <= 1.0 + 1e-9).all()
    torch.testing.assert_close(total, torch.minimum(norms[:, 0], clip), rtol=1e-5, atol=1e-9)
    assert norms[3, 0] > 1.0 and norms[0, 0] < 1.0  # one clipped, one not


def test_padded_poisson_batches_are_each_models_own_sampler():
    """Model k's rows of the padded batches are exactly its own PoissonBatchSampler's batches, across epochs."""
    ids = [np.arange(0, 20), np.arange(100, 140), np.arange(50, 60)]
    samplers = [PoissonBatchSampler(i, 0.3, seed=s) for i, s in zip(ids, (1, 2, 3))]
    batches = list(PoissonIndexBatches(samplers, steps=9))  # 4 steps per epoch: crosses two epochs
    references = [PoissonBatchSampler(i, 0.3, seed=s) for i, s in zip(ids, (1, 2, 3))]
    expected = [[b for _ in range(3) for b in r][:9] for r in references]
    for step, batch in enumerate(batches):
        for k in range(3):
            row = batch[k]
            assert row[row != PAD].tolist() == expected[k][step]


def head_setup(tmp_path, callback: dict | None, *, batch_size: int = 16, epochs: int = 3, optimizer: str = "sgd", lr: float = 0.5, n: int = 48, d: int = 40,
               hidden: list | None = None) -> FarmSetup:
    """Linear heads on a generated CSV: n samples with d Gaussian features and two random labels (a head can memorise them)."""
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(n, d)), rng.integers(0, 2, n)
    path = tmp_path / "points.csv"
    lines = [",".join([*(f"f{j}" for j in range(d)), "label"])] + [",".join([*(f"{v:.6f}" for v in row), str(c)]) for row, c in zip(features, labels)]
    path.write_text("\n".join(lines) + "\n")
    callbacks = () if callback is None else (ComponentSpec("mia_lightning.defences.dp_sgd.DPSGD", callback),)
    return FarmSetup(data=ComponentSpec("mia_lightning.data.tabular.TabularDataModule", {"source": str(path), "label_column": "label", "batch_size": batch_size}),
                     model=ComponentSpec("mia_lightning.models.tabular_mlp.TabularMLP", {"hidden": hidden if hidden is not None else [], "optimizer": optimizer, "lr": lr, "momentum": 0.0}),
                     trainer={"max_epochs": epochs, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}, callbacks=callbacks)


def lira_jobs(n_models: int, n: int = 48) -> list[ModelJob]:
    keep = make_lira_plan(PlanSpec("points", n, n_models, seed=3)).keep
    return [ModelJob(i, np.flatnonzero(keep[i]), model_seed(3, i)) for i in range(n_models)]


def test_without_noise_and_full_batches_the_update_is_plain_clipped_sgd(tmp_path):
    """noise_multiplier 0, q = 1: every step is W -= lr * mean of the per-sample gradients clipped to C, computed here sample by sample with autograd."""
    setup = head_setup(tmp_path, {"target_epsilon": None, "noise_multiplier": 0.0, "max_grad_norm": 0.3}, batch_size=1000, epochs=4)
    jobs = lira_jobs(2)
    trained = {t.index: t for t in VectorisedEngine(setup, group_size=2).run(jobs)}
    for job in jobs:
        datamodule = setup.build_datamodule(job)
        model = setup.build_model(datamodule, job.seed)
        w, b = model.net[0].weight.detach().double().clone(), model.net[0].bias.detach().double().clone()
        features = torch.from_numpy(datamodule.pool.features).double()
        x = ((features - features.mean(0)) / features.std(0, unbiased=False))[job.train_indices]  # the pool's scaling under DP
        y = torch.from_numpy(datamodule.pool.labels[job.train_indices])
        for _ in range(4):
            grads_w, grads_b = torch.zeros_like(w), torch.zeros_like(b)
            for xi, yi in zip(x, y):
                wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
                F.cross_entropy((wi @ xi + bi).unsqueeze(0), yi.unsqueeze(0)).backward()
                norm = torch.sqrt(wi.grad.pow(2).sum() + bi.grad.pow(2).sum())
                factor = min(1.0, 0.3 / (float(norm) + 1e-6))
                grads_w += factor * wi.grad
                grads_b += factor * bi.grad
            w, b = w - 0.5 * grads_w / len(y), b - 0.5 * grads_b / len(y)
        module = trained[job.index].module
        torch.testing.assert_close(module.net[0].weight.double(), w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.net[0].bias.double(), b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(module.feature_mean, features.mean(0).float())  # the pool's statistics, not the training subset's
        assert module.dp_state["steps"] == 4 and math.isinf(module.dp_state["epsilon"])


def test_accountant_epsilon_per_model_equals_opacus_and_a_model_is_the_same_alone_or_grouped(tmp_path):
    """done.json's dp_* metrics per model equal a fresh opacus accountant on (sigma, q, steps); grouping changes no model (own batches, own noise)."""
    from opacus.accountants import create_accountant

    setup = head_setup(tmp_path, {"target_epsilon": 2.0, "max_grad_norm": 1.0, "accountant": "rdp"}, batch_size=12, epochs=2)
    jobs = lira_jobs(3)
    grouped = {t.index: t for t in VectorisedEngine(setup, group_size=3).run(jobs)}
    alone = {t.index: t for t in VectorisedEngine(setup, group_size=1).run(jobs)}
    for job in jobs:
        metrics, state = grouped[job.index].metrics, grouped[job.index].module.dp_state
        q = 12 / job.train_indices.size
        steps = 2 * math.ceil(1 / q)
        accountant = create_accountant("rdp")
        for _ in range(steps):
            accountant.step(noise_multiplier=metrics["dp_noise_multiplier"], sample_rate=q)
        assert metrics["dp_steps"] == steps and metrics["dp_delta"] == pytest.approx(1 / (10 * job.train_indices.size))
        assert metrics["dp_epsilon"] == pytest.approx(accountant.get_epsilon(delta=metrics["dp_delta"])) and metrics["dp_epsilon"] <= 2.0
        assert state["sample_rate"] == pytest.approx(q) and state["accountant"] == "rdp"
        np.testing.assert_allclose(grouped[job.index].logits, alone[job.index].logits, rtol=1e-5, atol=1e-6)
    assert not np.allclose(grouped[0].module.net[0].weight.detach(), grouped[1].module.net[0].weight.detach())


def test_a_given_noise_stops_at_the_budget_like_the_callback(tmp_path):
    """noise_multiplier with a target: the vectorised run takes the most steps whose epsilon fits, as the sequential callback's budget stop does."""
    setup = head_setup(tmp_path, {"target_epsilon": 4.0, "noise_multiplier": 1.5, "max_grad_norm": 1.0, "accountant": "rdp"}, batch_size=12, epochs=20)
    jobs = lira_jobs(2)[:1]
    vectorised = next(iter(VectorisedEngine(setup, group_size=1).run(jobs)))
    sequential = next(iter(SequentialEngine(setup).run(jobs)))
    assert vectorised.metrics["dp_steps"] == sequential.metrics["dp_steps"] < 20 * 2
    assert vectorised.metrics["dp_epsilon"] == pytest.approx(sequential.metrics["dp_epsilon"]) and vectorised.metrics["dp_epsilon"] <= 4.0


def test_engine_choice_and_refusals(tmp_path):
    assert choose_engine(head_setup(tmp_path, {"target_epsilon": 4.0}))[0] == "vectorised"
    deep = head_setup(tmp_path, {"target_epsilon": 4.0}, hidden=[8])
    engine, reason = choose_engine(deep)
    assert engine == "sequential" and "linear heads" in reason
    with pytest.raises(MiaError, match="linear heads .*farm.engine: sequential"):
        VectorisedEngine(deep)


def lira_auc(setup: FarmSetup, jobs: list[ModelJob]) -> float:
    """AUC of online LiRA over every model as target (the others as shadows), on the farm's pool logits."""
    trained = sorted(VectorisedEngine(setup, group_size=len(jobs)).run(jobs), key=lambda t: t.index)
    keep = np.zeros((len(jobs), len(trained[0].logits)), dtype=bool)
    for job in jobs:
        keep[job.index, job.train_indices] = True
    datamodule = setup.build_datamodule()
    data = AttackData(keep=keep, labels=datamodule.pool_labels(), logits=np.stack([t.logits for t in trained]))
    scores = score_targets(create_attack("lira"), data, np.arange(len(jobs)))["lira_online"]
    curve = roc_curve(scores, keep)
    return float(np.trapezoid(curve.tpr, curve.fpr))


def test_dp_heads_leak_less_than_the_same_heads_without_noise(tmp_path):
    """LiRA on 16 heads memorising random labels: near chance at epsilon 0.5, clearly above it without noise (epsilon inf), same clipping and sampling."""
    jobs = lira_jobs(16)
    common = {"max_grad_norm": 1.0, "accountant": "rdp"}
    leaky = lira_auc(head_setup(tmp_path, {**common, "target_epsilon": None, "noise_multiplier": 0.0}, epochs=30), jobs)
    private = lira_auc(head_setup(tmp_path, {**common, "target_epsilon": 0.5}, epochs=30), jobs)
    assert leaky > 0.75 and private < 0.6 and private < leaky - 0.15


def test_dp_heads_study_end_to_end_on_generated_images(tmp_path):
    """configs/images/fmnist_dp_heads.yaml's settings and analysis on tiny generated images: every eps a vectorised DP farm,
    the accountant's epsilon within each target, the table's TPR at 0.1/1/10% FPR, one ROC plot per eps against its replace-one bound."""
    import json

    import yaml

    from mia_lightning.cli import train_main
    from mia_lightning.farm.checkpoints import load_model_checkpoint
    from test_images import clear_caches, image_recipe, write_image_folder

    root = Path(__file__).resolve().parents[1]
    clear_caches()
    shots = 24  # S x C = 48 samples in batches of 8: sample rate 1/6, where opacus finds the 4 targets' noise in ~13 s (~43 s at rate 1/2)
    folder = write_image_folder(tmp_path / "images", n_classes=2, per_class=2 * shots)
    base = image_recipe(tmp_path, folder, **{"plan.n_models": 8, "data.init_args.shots": shots, "data.init_args.n_classes": 2, "data.init_args.queries": None,
                                             "data.init_args.batch_size": 8, "trainer.max_epochs": 3, "farm.engine": "auto", "farm.group_size": 8})
    real = yaml.safe_load((root / "configs/images/fmnist_dp_heads.yaml").read_text())["study"]
    study = {"study": {**real, "name": "dp", "root": str(tmp_path / "out"), "recipe": str(base),
                       "overrides": {"data.init_args.shots": shots, "data.init_args.n_classes": 2}, "analysis_params": real["analysis_params"]}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    assert train_main(["study", "--config", str(tmp_path / "study.yaml")]) == 0
    out = tmp_path / "out" / "dp"
    analysis = json.loads((out / "analysis.json").read_text())
    settings = {s["setting"]: s for s in analysis["settings"]}
    assert list(settings) == ["eps-1", "eps-2", "eps-4", "eps-8", "eps-inf"] and analysis["levels"] == ["0.001", "0.01", "0.1"]
    for name, s in settings.items():
        target = float(name.split("-")[1])
        experiment = out / "settings" / name
        done = json.loads((experiment / "models" / "0000" / "done.json").read_text())
        assert done["engine"] == "vectorised" and done["n_train"] == 2 * shots  # S x C
        assert (s["accountant_delta"] == pytest.approx(1e-5) and s["accountant_epsilon"] <= target) if math.isfinite(target) else \
            (s["accountant_epsilon"] is None and s["accountant_delta"] is not None)  # JSON holds no Infinity: null beside its delta
        model = load_model_checkpoint(experiment / "models" / "0000" / "model.ckpt", 0)
        assert model.dp_state["epsilon"] == (done["metrics"]["dp_epsilon"] if math.isfinite(target) else math.inf)  # DP state checkpointed (done.json: inf is null)
        pool = np.load(next((experiment / "cache").glob("features-*.npy")))[:, 0].astype(np.float64)  # identity view of the cached features
        std = torch.from_numpy(pool.std(0)).float()
        torch.testing.assert_close(model.feature_std, torch.where(std > 1e-8, std, torch.ones_like(std)))  # scaled with the pool's statistics
        assert {"tpr@0.1", "tpr@0.1_ci"} <= set(s["attacks"]["lira_online"]) and (out / s["dp_bound"]["plot"]).stat().st_size > 1000
        bounds = s["dp_bound"]["bounds"]
        assert (len(bounds) == 1 and bounds[0]["replace_one"][0] == pytest.approx(2 * s["accountant_epsilon"])) if math.isfinite(target) else bounds == []
        assert s["dp_bound"]["adjacency"].startswith("few-shot plans are replace-one")
    assert settings["eps-1"]["dp_bound"]["bounds"][0]["curve_inside"]  # a DP guarantee holds for every test: the resolved ROC stays in its region
    page = (out / "analysis.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "ROC vs DP bound (replace-one)" in page
