"""DP-SGD as a Lightning callback (Abadi et al., "Deep Learning with Differential Privacy", ACM CCS 2016).

Add ``mia_lightning.defences.dp_sgd.DPSGD`` to a recipe's ``trainer.callbacks`` and any model family
trains with DP-SGD through opacus 1.6 (Yousefpour et al., "Opacus: User-Friendly Differential Privacy
Library in PyTorch", 2021), without wrapping the module (``opacus.lightning`` does not work with the
``lightning.pytorch`` namespace):

- per-sample gradients: opacus' hooks attached to the LightningModule itself (``wrap_model=False``);
  every trainable layer must be one opacus supports (``nn.LSTM`` is not: use ``DPLSTM``);
- Poisson sampling: the DataModule's ``enable_poisson_sampling(batch_size) -> sample_rate`` makes each
  batch include every training sample independently with probability q = batch_size / n_train
  (``PoissonBatchSampler``; ``TextDataModule`` implements it);
- clipping and noise: the Trainer's optimiser is replaced by opacus' ``DPOptimizer`` (each per-sample
  gradient clipped to ``max_grad_norm`` in L2 over all parameters, Gaussian noise of std
  ``noise_multiplier * max_grad_norm`` added to the sum, divided by the expected batch size);
- accounting: opacus' accountant (``prv`` by default, or ``rdp``) counts every step; with a target
  (epsilon, delta) and no ``noise_multiplier`` the noise is the smallest that keeps the planned
  epochs x ceil(1/q) steps within the budget (``opacus.accountants.utils.get_noise_multiplier``); with
  a given ``noise_multiplier`` and a target, training stops before the step that would spend more
  than the target (budget stop). ``target_delta`` defaults to 1 / (10 n_train).
- randomness: the noise comes from torch's global generator (the farm seeds it per model) unless
  ``seed`` is given; never give one seed to every model of a farm: their noise would be identical.

The spent epsilon, delta, noise multiplier, sample rate, steps and the accountant's history go into
the model (``PrivacyStateMixin`` saves them in the checkpoint) and into the logged metrics
(``dp_epsilon``, ``dp_noise_multiplier``..., so the farm's ``done.json`` records them per model).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Iterable, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import Sampler

from mia_lightning.errors import MiaError

ACCOUNTANTS = ("prv", "rdp")
CHECKPOINT_KEY = "dp_sgd"
MIN_EXPECTED_BATCH = 8


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling: each of ``ceil(1 / q)`` steps per epoch includes every training id independently with probability q.

    A step that draws no sample is drawn again (probability (1 - q)^n, below 1e-3 for the expected
    batch of 8 or more that ``DPSGD`` requires), so no step is empty.
    """

    def __init__(self, train_indices: np.ndarray, sample_rate: float, seed: int = 0) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise MiaError(f"Poisson sample rate {sample_rate}: must lie in (0, 1]")
        self.train_indices = np.asarray(train_indices, dtype=np.int64)
        self.sample_rate = sample_rate
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(1.0 / self.sample_rate)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        for _ in range(len(self)):
            chosen = self.train_indices[rng.random(self.train_indices.size) < self.sample_rate]
            while chosen.size == 0:
                chosen = self.train_indices[rng.random(self.train_indices.size) < self.sample_rate]
            yield chosen.tolist()


class PrivacyStateMixin:
    """Mixin for a LightningModule: keeps the DP-SGD state the callback sets (``dp_state``) in its checkpoints."""

    dp_state: dict[str, Any] | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.dp_state is not None:
            checkpoint[CHECKPOINT_KEY] = self.dp_state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        self.dp_state = state if isinstance(state, dict) else None


def rdp_epsilon_floor(delta: float) -> float:
    """The smallest epsilon opacus' RDP accountant reports at ``delta`` whatever the noise: its conversion of zero RDP at its orders.

    The conversion (Balle et al., AISTATS 2020, Theorem 21) adds -(log delta + log alpha) / (alpha - 1)
    + log((alpha - 1) / alpha) to the RDP at each order alpha, so with the largest order 63 no
    amount of noise brings epsilon below about 0.103 at delta 1e-5.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)[0])


@functools.lru_cache(maxsize=256)
def noise_for_budget(target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier whose ``steps`` Poisson-subsampled Gaussian steps spend at most (epsilon, delta) (memoised: the models of a farm share it).

    A target the RDP accountant cannot report at any noise (``rdp_epsilon_floor``) fails at once, not
    after the search has doubled the noise to its cap (about 30 s).
    """
    from opacus.accountants.utils import get_noise_multiplier

    if accountant == "rdp" and target_epsilon <= (floor := rdp_epsilon_floor(target_delta)):
        raise MiaError(
            f"DPSGD target_epsilon {target_epsilon} (delta {target_delta:g}) cannot be reached in {steps} steps at sample rate "
            f"{sample_rate:.4g} at any noise: the rdp accountant reports at least {floor:.4f} at this delta; raise target_epsilon "
            "or use accountant prv"
        )
    try:
        with warnings.catch_warnings():  # the search probes orders past the accountant's range; its warning is noise beside the answer
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate,
                                              steps=steps, accountant=accountant, epsilon_tolerance=0.01))
    except (ValueError, RuntimeError, OverflowError) as err:
        raise MiaError(
            f"DPSGD target_epsilon {target_epsilon} (delta {target_delta:g}) cannot be reached in {steps} steps at sample rate "
            f"{sample_rate:.4g} ({' '.join(str(err).split())[:80]}); raise target_epsilon or train fewer epochs"
        ) from None


@functools.lru_cache(maxsize=256)
def accountant_epsilon(accountant: str, history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Epsilon at ``delta`` of an opacus accountant with this history ((noise, rate, steps) entries).

    Memoised: the PRV accountant takes about a second per call, and the models of a farm (or the
    epochs of one model) repeat the same history.
    """
    from opacus.accountants import create_accountant

    counted = create_accountant(accountant)
    counted.history = [tuple(entry) for entry in history]
    return float(counted.get_epsilon(delta=delta))


class DPSGD(L.Callback):
    """DP-SGD for any LightningModule trained with automatic optimisation (see the module docstring)."""

    def __init__(
        self,
        target_epsilon: float | None = 8.0,
        target_delta: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        batch_size: int | None = None,
        accountant: str = "prv",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if accountant not in ACCOUNTANTS:
            raise MiaError(f"DPSGD accountant {accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")
        if target_epsilon is None and noise_multiplier is None:
            raise MiaError("DPSGD: give target_epsilon (the noise is derived from it) or noise_multiplier")
        if target_epsilon is not None and not 0 < target_epsilon < math.inf:
            raise MiaError(f"DPSGD target_epsilon {target_epsilon}: must be positive and finite (no DP: target_epsilon: null, noise_multiplier: 0)")
        if target_delta is not None and not 0.0 < target_delta < 1.0:
            raise MiaError(f"DPSGD target_delta {target_delta}: must lie in (0, 1)")
        if noise_multiplier is not None and not 0 <= noise_multiplier < math.inf:
            raise MiaError(f"DPSGD noise_multiplier {noise_multiplier}: must be >= 0 and finite")
        if not 0 < max_grad_norm < math.inf:
            raise MiaError(f"DPSGD max_grad_norm {max_grad_norm}: must be positive and finite")
        if batch_size is not None and batch_size < 1:
            raise MiaError(f"DPSGD batch_size {batch_size}: the expected Poisson batch must be at least 1 (or null: the DataModule's batch_size)")
        self.target_epsilon, self.target_delta = target_epsilon, target_delta
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.batch_size, self.accountant_name, self.seed = batch_size, accountant, seed
        self.hooks = None
        self.accountant = None

    def _check_module(self, pl_module: L.LightningModule) -> None:
        from opacus.validators import ModuleValidator

        if not pl_module.automatic_optimization:
            raise MiaError(f"DPSGD: {type(pl_module).__name__} uses manual optimisation (e.g. adv_reg > 0); DP-SGD needs automatic optimisation")
        problems = ModuleValidator.validate(pl_module, strict=False)
        if problems:
            reason = str(problems[0]).splitlines()[0].split(". ")[0][:160]
            fix = ("set model.init_args.lstm: opacus" if "lstm" in pl_module.hparams else
                   "train layers opacus supports, e.g. linear heads on frozen backbone features (configs/images/fmnist_dp_heads.yaml)")
            raise MiaError(f"DPSGD: {type(pl_module).__name__} has layers opacus cannot privatise ({reason}); {fix}")

    def _plan_budget(self, n_train: int, sample_rate: float, max_epochs: int | None) -> None:
        """Expected batch, delta, planned steps and the noise multiplier; refuses settings that cannot reach the target."""
        from opacus.accountants import create_accountant

        self.n_train, self.sample_rate = n_train, sample_rate
        self.expected_batch = max(1, int(round(sample_rate * n_train)))
        if self.expected_batch < MIN_EXPECTED_BATCH:
            fix = ("raise the batch size" if n_train >= MIN_EXPECTED_BATCH else
                   f"each model trains on only {n_train} samples; give it at least {MIN_EXPECTED_BATCH} (e.g. more shots or classes)")
            raise MiaError(f"DPSGD: expected batch {self.expected_batch} is below {MIN_EXPECTED_BATCH}; {fix}")
        self.delta = self.target_delta if self.target_delta is not None else 1.0 / (10 * n_train)
        if max_epochs is None or max_epochs < 1:
            raise MiaError("DPSGD: set trainer.max_epochs (the budget is spread over the planned epochs)")
        self.planned_steps = max_epochs * math.ceil(1.0 / sample_rate)
        if self.noise_multiplier is None:
            self.sigma = noise_for_budget(self.target_epsilon, self.delta, sample_rate, self.planned_steps, self.accountant_name)
        else:
            self.sigma = float(self.noise_multiplier)
        self.accountant = create_accountant(self.accountant_name)
        if self.target_epsilon is not None and self.noise_multiplier is not None and self.spent_epsilon(extra_steps=1) > self.target_epsilon:
            raise MiaError(f"DPSGD noise_multiplier {self.sigma:g}: a single step already spends more than target_epsilon {self.target_epsilon} "
                           f"(delta {self.delta:g}); raise the noise or the target, or leave noise_multiplier unset to derive it")

    def check_recipe(self, datamodule: L.LightningDataModule, pl_module: L.LightningModule, max_epochs: int | None) -> None:
        """Every check ``setup`` makes, without a Trainer: lets a runner refuse a recipe before it writes anything."""
        self._check_module(pl_module)
        if not hasattr(datamodule, "enable_poisson_sampling") or not hasattr(datamodule, "train_indices"):
            raise MiaError(f"DPSGD: the DataModule {type(datamodule).__name__} has no enable_poisson_sampling(batch_size); DP-SGD needs Poisson batches")
        n_train = int(datamodule.train_indices.size)
        batch_size = self.batch_size or int(datamodule.hparams.batch_size)
        self._plan_budget(n_train, min(1.0, batch_size / n_train), max_epochs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check the module, switch the DataModule to Poisson sampling, derive the noise and attach the per-sample-gradient hooks."""
        if stage != "fit":
            return
        from opacus.grad_sample.utils import prepare_module

        self._check_module(pl_module)
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "enable_poisson_sampling") or not hasattr(datamodule, "train_indices"):
            raise MiaError(f"DPSGD: the DataModule {type(datamodule).__name__} has no enable_poisson_sampling(batch_size); DP-SGD needs Poisson batches")
        sample_rate = float(datamodule.enable_poisson_sampling(self.batch_size or int(datamodule.hparams.batch_size)))
        self._plan_budget(int(datamodule.train_indices.size), sample_rate, trainer.max_epochs)
        self.hooks = prepare_module(pl_module, grad_sample_mode="hooks", wrap_model=False, batch_first=True, loss_reduction="mean", strict=False)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Replace the optimiser by opacus' DPOptimizer (clipping + noise) with the accountant's step hook."""
        from opacus.optimizers import DPOptimizer

        if len(trainer.optimizers) != 1:
            raise MiaError(f"DPSGD: {type(pl_module).__name__} configures {len(trainer.optimizers)} optimisers; DP-SGD privatises exactly one")
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None else None  # None: torch's global RNG, seeded per model by the farm
        optimizer = DPOptimizer(trainer.optimizers[0], noise_multiplier=self.sigma, max_grad_norm=self.max_grad_norm,
                                expected_batch_size=self.expected_batch, loss_reduction="mean", generator=generator)
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        trainer.strategy.optimizers = [optimizer]

    def spent_epsilon(self, extra_steps: int = 0) -> float:
        """Epsilon spent so far (plus ``extra_steps`` more steps) at the run's delta; 0 before any step, inf without noise."""
        from opacus.accountants import create_accountant

        accountant = self.accountant
        if extra_steps:
            accountant = create_accountant(self.accountant_name)
            accountant.load_state_dict(self.accountant.state_dict())
            for _ in range(extra_steps):
                accountant.step(noise_multiplier=self.sigma, sample_rate=self.sample_rate)
        if not accountant.history:
            return 0.0
        if self.sigma == 0:
            return math.inf
        return accountant_epsilon(self.accountant_name, tuple(tuple(entry) for entry in accountant.history), self.delta)

    def allowed_steps(self) -> int:
        """Steps the run takes: the planned ones, or with a given ``noise_multiplier`` and a target the most whose epsilon stays within it (the budget stop, found ahead)."""
        if self.target_epsilon is None or self.noise_multiplier is None or self.sigma == 0:
            return self.planned_steps
        low, high = 1, self.planned_steps  # epsilon grows with the steps; one step fits (checked when planning)
        while low < high:
            middle = (low + high + 1) // 2
            history = ((self.sigma, self.sample_rate, middle),)
            if accountant_epsilon(self.accountant_name, history, self.delta) <= self.target_epsilon:
                low = middle
            else:
                high = middle - 1
        return low

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Budget stop: end training before a step would spend more than the target epsilon.

        With the noise derived from the target, the planned steps fit the budget, so only a run
        longer than planned stops; with a given ``noise_multiplier`` the next step's epsilon is checked.
        """
        if self.target_epsilon is None:
            return
        steps = sum(int(s) for _, _, s in self.accountant.history)
        if self.noise_multiplier is None:
            trainer.should_stop = trainer.should_stop or steps >= self.planned_steps
        elif self.spent_epsilon(extra_steps=1) > self.target_epsilon:
            trainer.should_stop = True

    def state(self) -> dict[str, Any]:
        """The accountant's state and the DP parameters of this run (checkpoint and metrics)."""
        steps = sum(int(s) for _, _, s in self.accountant.history)
        return {"epsilon": self.spent_epsilon(), "delta": self.delta, "target_epsilon": self.target_epsilon,
                "noise_multiplier": self.sigma, "max_grad_norm": self.max_grad_norm, "sample_rate": self.sample_rate,
                "expected_batch_size": self.expected_batch, "n_train": self.n_train, "steps": steps, "planned_steps": self.planned_steps,
                "accountant": self.accountant_name, "accountant_state": dict(self.accountant.state_dict())}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = self.state()
        pl_module.dp_state = state
        for key, value in state_metrics(state).items():
            pl_module.log(key, value, on_epoch=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Detach opacus' hooks (prediction and checkpointing see the plain module) and record the final state."""
        if stage != "fit" or self.hooks is None:
            return
        pl_module.dp_state = self.state()
        self.hooks.cleanup()
        self.hooks = None
        for parameter in pl_module.parameters():
            parameter.grad = None


def state_metrics(state: dict[str, Any]) -> dict[str, float]:
    """The DP metrics a farm's ``done.json`` records per model (``dp_epsilon``, ``dp_delta``, ``dp_noise_multiplier``, ``dp_steps``)."""
    return {f"dp_{key}": float(state[key]) for key in ("epsilon", "delta", "noise_multiplier", "steps")}


def dp_callbacks(callbacks: Iterable[Any]) -> list[DPSGD]:
    """The DP-SGD callbacks among a run's callbacks (a model trained under DP fixes its feature scaling without its training data)."""
    return [callback for callback in callbacks if isinstance(callback, DPSGD)]
