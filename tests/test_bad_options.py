"""Bad options and runs that cannot work: one line, exit 2 (130 for Ctrl-C, 143 for SIGTERM), nothing written or lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import write_synthetic_experiment

from mia_lightning.cli import attack_main, train_main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/tabular/digits_quickstart.yaml"
SEQUENTIAL = ROOT / "configs/tabular/digits_sequential.yaml"


def farm(root: Path, recipe: Path, *extra: str) -> list[str]:
    return ["farm", "--config", str(recipe), "--experiment.root", str(root), "--experiment.name", "exp", "--plan.n_models", "4",
            "--trainer.max_epochs", "1", "--model.init_args.hidden", "[8]", "--trainer.enable_progress_bar", "false", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and err.count("\n") == 0 and "Traceback" not in err, err
    return err


CASES = {
    "one model": (QUICKSTART, ["--plan.n_models", "1"], "--plan.n_models 1"),
    "population too large": (QUICKSTART, ["--plan.n_population", "5000"], "--plan.n_population 5000"),
    "population negative": (QUICKSTART, ["--plan.n_population", "-3"], "--plan.n_population -3"),
    "zero epochs vectorised": (QUICKSTART, ["--trainer.max_epochs", "0"], "--trainer.max_epochs 0"),
    "zero epochs sequential": (SEQUENTIAL, ["--trainer.max_epochs", "0"], "--trainer.max_epochs 0"),
    "negative lr": (QUICKSTART, ["--model.init_args.lr", "-0.1"], "Invalid learning rate"),
    "zero devices": (SEQUENTIAL, ["--trainer.devices", "0"], "not a valid input"),
    "devices not a number": (SEQUENTIAL, ["--trainer.devices", "abc"], "--trainer.devices 'abc': give a number of devices"),
    "unknown plan kind": (QUICKSTART, ["--plan.kind", "halves"], "unknown plan kind"),
    "callback that is not a callback": (SEQUENTIAL, ["--trainer.callbacks", '[{"class_path": "os.system"}]'], "not a lightning.Callback subclass"),
    "zero group size": (QUICKSTART, ["--farm.group_size", "0"], "--farm.group_size 0: must be at least 1"),
    "zero farm threads": (QUICKSTART, ["--farm.threads", "0"], "--farm.threads 0: must be at least 1"),
    "stale claims at once": (QUICKSTART, ["--farm.stale_after_s", "0"], "--farm.stale_after_s 0.0: must be positive"),
    "empty experiment name": (QUICKSTART, ["--experiment.name", ""], "--experiment.name '': must be a plain folder name"),  # farmed into root itself
    # jsonargparse's report on every subtype of the union, cut to the class's own reason
    "typo in a model argument": (QUICKSTART, ["--model.init_args.weight_decy", "0.1"],
                                 "Parser key \"model\": mia_lightning.models.tabular_mlp.TabularMLP: Option 'weight_decy' is not accepted (see"),
    "typo in a data argument": (QUICKSTART, ["--data.init_args.sourc", "x"],
                                "Parser key \"data\": mia_lightning.data.tabular.TabularDataModule: Option 'sourc' is not accepted (see"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_is_one_line_and_writes_nothing(case, tmp_path, capsys):
    recipe, extra, phrase = CASES[case]
    assert train_main(farm(tmp_path, recipe, *extra)) == 2
    assert phrase in one_error_line(capsys)
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("command, recipe, fix", [("farm", ROOT / "configs/images/fmnist_power_law_smoke.yaml", "a study recipe: run it with `train.py study"),
                                                    ("study", QUICKSTART, "a farm recipe: run it with `train.py farm"),
                                                    ("study", "recipe:tabular/digits_quickstart", "a farm recipe: run it with `train.py farm")])
def test_a_recipe_given_to_the_other_command_names_the_command_that_runs_it(command, recipe, fix, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_main([command, "--config", str(recipe)]) == 2
    assert f"{fix} --config {recipe}`" in one_error_line(capsys)  # a recipe:<name> as typed, not the package path it names
    assert train_main([command, f"--config={recipe}"]) == 2  # the same with --config=FILE
    assert f"{fix} --config {recipe}`" in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_a_farm_recipe_given_to_attack_says_attack_takes_the_experiment_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert attack_main(["--config", "recipe:tabular/digits_quickstart"]) == 2
    err = one_error_line(capsys)
    assert ("attack.py --config recipe:tabular/digits_quickstart: its experiment: section makes it a farm recipe: run it with "
            "`train.py farm --config recipe:tabular/digits_quickstart`; attack.py takes --experiment DIR, the folder "
            "<experiment.root>/<experiment.name> a farm writes") in err and "Not of type Path" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["attack", "study"])
def test_a_lightning_fit_config_given_to_attack_or_study_names_train_py_fit(command, tmp_path, monkeypatch, capsys):
    """configs/tabular/mlp_fit.yaml has model, data and trainer only: it is not a farm recipe, train.py fit runs it."""
    monkeypatch.chdir(tmp_path)
    config = ROOT / "configs/tabular/mlp_fit.yaml"
    assert (attack_main(["--config", str(config)]) if command == "attack" else train_main(["study", "--config", str(config)])) == 2
    err = one_error_line(capsys)
    assert f"a LightningCLI config (model, data, trainer; no plan or experiment): run it with `train.py fit --config {config}`" in err, err
    assert "farm recipe" not in err and not any(tmp_path.iterdir())


def test_attacks_experiment_folder_given_to_the_farm_names_its_two_parts(tmp_path, capsys):
    assert train_main(["farm", "--config", str(QUICKSTART), "--experiment", str(tmp_path / "exp")]) == 2
    assert "train.py farm --experiment: the farm names its experiment folder in two parts: use --experiment.root DIR" in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


ABBREVIATED = {
    "farm plan option": (lambda tmp: farm(tmp, QUICKSTART, "--plan.n_model", "4"), "--plan.n_model 4"),
    "farm trainer option": (lambda tmp: farm(tmp, QUICKSTART, "--trainer.max_epoch", "1"), "--trainer.max_epoch 1"),
    "farm flag": (lambda tmp: farm(tmp, QUICKSTART, "--stat"), "--stat"),
    "study": (lambda tmp: ["study", "--config", str(ROOT / "configs/images/fmnist_power_law_smoke.yaml"), "--stat"], "--stat"),
    "export": (lambda tmp: ["export", "--exp", str(tmp / "exp")], "--exp"),
    "import-scores": (lambda tmp: ["import-scores", "table", "--exp", str(tmp / "exp")], "--exp"),
    "unlearning-report": (lambda tmp: ["unlearning-report", "--exp", str(tmp / "exp")], "--exp"),
    "convert-weights": (lambda tmp: ["convert-weights", "--back", "x"], "--back x"),
    "attack.py": (lambda tmp: ["attack", "--exp", str(tmp / "exp")], "--exp"),
}


@pytest.mark.parametrize("case", list(ABBREVIATED))
def test_an_abbreviated_option_is_refused_by_name(case, tmp_path, monkeypatch, capsys):
    """argparse would take ``--plan.n_model 4`` for ``--plan.n_models 4``; a typo of an option is refused, not guessed."""
    from mia_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    argv, option = ABBREVIATED[case]
    args = argv(tmp_path)
    assert main(args if args[0] == "attack" else ["train", *args]) == 2
    assert f"unrecognized arguments: {option}" in one_error_line(capsys)
    assert not any(tmp_path.iterdir())


FIT_CASES = {
    "abbreviated option": (["--trainer.max_epoch", "1"], "train.py fit: unrecognized arguments: --trainer.max_epoch 1"),
    "value of the wrong type": (["--model.init_args.hidden", "foo"],
                                'Parser key "hidden": expected list[int] or None, given foo (see `train.py fit --help`)'),
    "typo inside init_args": (["--model.init_args.hiden", "[4]"], "TabularMLP: Option 'hiden' is not accepted"),
    "constructor refuses": (["--model.init_args.hidden", "[0]"],
                            "train.py fit: mia_lightning.models.tabular_mlp.TabularMLP: bad init_args (hidden [0] and dropout 0.0"),
    "data source": (["--data.init_args.source", "nosuch"], "data source 'nosuch': a CSV needs data.label_column"),
    "zero batch size": (["--data.init_args.batch_size", "0"], "data.init_args.batch_size 0: must be a positive integer"),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_the_lightning_cli_refuses_bad_input_in_one_line(case, tmp_path, monkeypatch, capsys):
    """``train.py fit`` (LightningCLI) errors are one line, as every other command's, not its usage dump or a traceback."""
    from mia_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    args, message = FIT_CASES[case]
    assert main(["train", "fit", "--config", str(ROOT / "configs/tabular/mlp_fit.yaml"), "--trainer.max_epochs", "1",
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false", *args]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_a_gpu(tmp_path, capsys):
    assert train_main(farm(tmp_path, SEQUENTIAL, "--trainer.accelerator", "gpu")) == 2
    assert "trainer settings" in one_error_line(capsys)
    assert not (tmp_path / "exp").exists()


def test_a_diverged_model_is_not_marked_done(tmp_path, capsys):
    assert train_main(farm(tmp_path, SEQUENTIAL, "--model.init_args.lr", "1e6", "--trainer.max_epochs", "3", "--model.init_args.optimizer", "sgd")) == 2
    assert "NaN/inf" in one_error_line(capsys)
    assert not list((tmp_path / "exp/models").glob("*/done.json"))


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    """One audited experiment for the module; each test gets its own copy (an audit per test cost seconds)."""
    root = write_synthetic_experiment(tmp_path_factory.mktemp("audited") / "exp", n_models=6, n_samples=30, seed=2)
    assert attack_main(["--experiment", str(root), "--attack", "lira", "--bootstrap", "0"]) == 0
    return root


@pytest.fixture
def experiment(audited: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(audited, tmp_path / "exp", symlinks=True))


PARAMS = {
    "string for an int": ('{"lira": {"n_shadows": "eight"}}', "--params lira.n_shadows='eight': expected int | None"),
    "float for an int": ('{"lira": {"n_shadows": 2.5}}', "--params lira.n_shadows=2.5: expected int | None"),
    "not an object": ('"eight"', "--params: expected a JSON object"),
    "an empty list": ('[]', "--params: expected a JSON object"),  # was taken as no parameters
    "attack value not an object": ('{"lira": 3}', "--params lira: expected an object"),
    "typo in the attack name": ('{"liar": {"n_shadows": 2}}', "--params 'liar': not an attack of this run"),
    "typo in a parameter": ('{"lira": {"nshadows": 2}}', "--params lira.nshadows: unknown parameter"),
}


@pytest.mark.parametrize("case", list(PARAMS))
def test_bad_params_are_one_line_and_keep_results(case, experiment, capsys):
    before = json.loads((experiment / "attacks/run.json").read_text())["id"]
    capsys.readouterr()
    text, phrase = PARAMS[case]
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "--params", text]) == 2
    assert phrase in one_error_line(capsys)
    assert json.loads((experiment / "attacks/run.json").read_text())["id"] == before


NULL_AND_INFINITE_PARAMS = {
    "null float": ("rmia", '{"rmia": {"gamma": null}}', "--params rmia.gamma=None: expected float"),
    "infinite float": ("rmia", '{"rmia": {"gamma": 1e400}}', "--params rmia.gamma=inf: expected a finite float"),
    "null int": ("shokri", '{"shokri": {"steps": null}}', "--params shokri.steps=None: expected int"),
    "null hidden": ("quantile", '{"quantile": {"hidden": null}}', "--params quantile.hidden=None: expected int"),
    "null alpha": ("quantile", '{"quantile": {"alpha": null}}', "--params quantile.alpha=None: expected float"),
    # values of the right type out of their range name the option like the type errors do (they said 'n_shadows=0:' / 'rmia: gamma=')
    "no shadows": ("lira", '{"lira": {"n_shadows": 0}}', "--params lira.n_shadows=0: must be between 1 and"),
    "negative gamma": ("rmia", '{"rmia": {"gamma": -1}}', "--params rmia.gamma=-1.0: must be positive"),
    "a above one": ("rmia", '{"rmia": {"a": 2}}', "--params rmia.a=2.0: must lie in [0, 1]"),
}


@pytest.mark.parametrize("case", list(NULL_AND_INFINITE_PARAMS))
def test_null_for_a_parameter_without_none_and_non_finite_numbers_are_one_line(case, experiment, capsys):
    """JSON null passed the type check of every parameter and crashed the attack; 1e400 (infinity) passed as a float; a value out of range names its option."""
    attack, text, phrase = NULL_AND_INFINITE_PARAMS[case]
    before = snapshot(experiment)
    capsys.readouterr()
    assert attack_main(["--experiment", str(experiment), "--attack", attack, "--params", text]) == 2
    assert phrase in one_error_line(capsys)
    assert snapshot(experiment) == before


def test_null_stays_valid_where_the_parameter_takes_none():
    from mia_lightning.attacks.base import check_params

    assert check_params("lira", {"n_shadows": None}) == {"n_shadows": None}


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the experiment (links not followed): what a refused request must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("argv, phrase", [
    (["--keep_runs", "-1"], "--keep_runs -1: must be at least 1 (or 0 to keep every run)"),
    (["--targets", "0", "--n_targets", "2"], "--targets and --n_targets 2: give one of them"),
])
def test_options_that_will_be_refused_are_refused_before_the_run(argv, phrase, experiment, capsys):
    """--keep_runs -1 used to compute and publish the whole run, then fail; --targets silently overrode --n_targets."""
    before = snapshot(experiment)
    capsys.readouterr()
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "--bootstrap", "0", *argv]) == 2
    assert phrase in one_error_line(capsys)
    assert snapshot(experiment) == before


def test_keep_runs_zero_keeps_every_run(experiment):
    assert attack_main(["--experiment", str(experiment), "--attack", "thresholds", "--bootstrap", "0", "--keep_runs", "0"]) == 0
    assert len([p for p in (experiment / "attacks/runs").iterdir() if not p.name.startswith(".")]) == 2


def test_a_logger_folder_that_is_a_file_is_refused_before_the_run(experiment, capsys):
    """The run used to be published first and the logger to fail after it."""
    (experiment / "logs").write_text("not a folder")
    before = snapshot(experiment)
    capsys.readouterr()
    assert attack_main(["--experiment", str(experiment), "--attack", "lira", "--bootstrap", "0", "--logger", "csv"]) == 2
    assert f"{experiment / 'logs'}: a file where a folder should be; --logger csv's logs cannot be saved" in one_error_line(capsys)
    assert snapshot(experiment) == before


def test_attack_all_on_a_signal_experiment_runs_what_applies(tmp_path, capsys):
    root = write_synthetic_experiment(tmp_path / "sig", n_models=6, n_samples=30, seed=4)
    labels = np.load(root / "labels.npy")
    for folder in sorted((root / "models").iterdir()):
        logits = np.load(folder / "logits.npy")
        np.save(folder / "signal.npy", logits[np.arange(labels.size), :, labels])
        (folder / "logits.npy").unlink()
    assert attack_main(["--experiment", str(root), "--attack", "all", "--bootstrap", "0"]) == 0
    out = capsys.readouterr().out
    assert "thresholds" in next(line for line in out.splitlines() if "needs class logits" in line)
    assert (root / "attacks/lira_online/results.json").is_file() and not (root / "attacks/confidence").exists()
    assert json.loads((root / "attacks/rmia_online/results.json").read_text())["family"] == "rmia"  # the signal read as a log-likelihood


def test_one_model_names_the_real_cause(tmp_path, capsys):
    root = write_synthetic_experiment(tmp_path / "one", n_models=1, n_samples=30, seed=5)
    np.save(root / "keep.npy", np.arange(30)[None, :] % 2 == 0)
    assert attack_main(["--experiment", str(root), "--attack", "all", "--bootstrap", "0"]) == 0  # shadow-free thresholds still run
    out = capsys.readouterr().out
    skipped = next(line for line in out.splitlines() if "needs at least 2 models" in line)
    assert skipped.startswith("skipped") and "lira" in skipped and "rmia" in skipped and "loss" in out
    assert attack_main(["--experiment", str(root), "--attack", "lira"]) == 2
    assert "needs at least 2 models (a target and shadow/reference models), the experiment has 1" in one_error_line(capsys)


def test_a_bootstrap_of_one_replicate_is_refused_in_one_line(experiment, capsys):
    capsys.readouterr()
    assert attack_main(["--experiment", str(experiment), "--attack", "rmia", "--bootstrap", "1"]) == 2
    assert "--bootstrap 1: give 0 (no bootstrap interval) or at least 2 replicates" in one_error_line(capsys)
    assert not (experiment / "attacks/rmia_online").exists()


def test_error_text_keeps_bracketed_spans(experiment, capsys):
    np.save(experiment / "models/0001/logits.npy", np.zeros((29, 1, 4), dtype=np.float32))
    capsys.readouterr()
    assert attack_main(["--experiment", str(experiment), "--attack", "lira"]) == 2
    err = one_error_line(capsys)
    assert "[30, n_queries, n_classes]" in err and "[n_samples, n_queries, n_classes]" in err


def test_missing_logits_in_an_unfinished_farm_says_finish_the_farm(experiment, capsys):
    (experiment / "models/0003/logits.npy").unlink()
    capsys.readouterr()
    assert attack_main(["--experiment", str(experiment), "--attack", "lira"]) == 2
    assert "finish the farm" in one_error_line(capsys)


def test_ctrl_c_in_the_lightning_cli_says_how_fit_continues_not_resume(tmp_path, monkeypatch, capsys):
    """`train.py fit` has no farm to resume: its line points at --ckpt_path (Lightning turns the interrupt into exit(1) first)."""
    from mia_lightning.models.tabular_mlp import TabularMLP

    def interrupted_step(self, batch, batch_idx):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TabularMLP, "training_step", interrupted_step)
    assert train_main(["fit", "--config", str(ROOT / "configs/tabular/mlp_fit.yaml"), "--trainer.enable_progress_bar", "false"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--ckpt_path" in err and "resume the" not in err and "Traceback" not in err


def test_ctrl_c_during_vectorised_training_exits_130_with_a_message(tmp_path):
    args = farm(tmp_path, QUICKSTART, "--trainer.max_epochs", "400", "--plan.n_models", "8")
    # a shell without job control starts background jobs with SIGINT ignored; the child must see it as a terminal would
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "exp/plan.json").is_file():
        time.sleep(0.1)
    time.sleep(3.0)  # inside Trainer.fit of the vectorised group
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    assert "interrupted" in err and "re-run the same command to resume" in err and "Traceback" not in err
    assert not list((tmp_path / "exp/models").glob("*/claim.json"))


@pytest.mark.parametrize("how, code", [("ctrl-c", 130), ("sigterm", 143)])
def test_an_interrupted_attack_exits_with_a_message_and_publishes_nothing(experiment, capsys, monkeypatch, how, code):
    """The attack scores inside ``Trainer.predict``, which turns an interrupt into ``exit(1)``: the command must still say what happened."""
    from mia_lightning.attacks.rmia import RMIA

    def interrupted_score(self, targets):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in the main thread long before this ends
        raise AssertionError("SIGTERM did not interrupt the attack")

    monkeypatch.setattr(RMIA, "score", interrupted_score)
    published = (experiment / "attacks/latest").resolve()
    capsys.readouterr()
    assert attack_main(["--experiment", str(experiment), "--attack", "rmia", "--bootstrap", "0"]) == code
    err = capsys.readouterr().err
    assert "interrupted" in err and "re-run the same command" in err and "Traceback" not in err
    assert (experiment / "attacks/latest").resolve() == published and not (experiment / "attacks/rmia_online").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command restores the handler it replaced


def test_call_trainer_turns_lightnings_exit_on_an_interrupt_back_into_keyboardinterrupt():
    """Lightning (Trainer entry points, LightningCLI) answers a Ctrl-C with ``sys.exit(1)``; any other exit passes through."""
    from mia_lightning.interrupts import call_trainer

    def lightning_like(code: int, interrupted: bool) -> None:
        try:
            if interrupted:
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(code)
        sys.exit(code)

    with pytest.raises(KeyboardInterrupt):
        call_trainer(lightning_like, 1, interrupted=True)
    with pytest.raises(SystemExit) as exited:
        call_trainer(lightning_like, 0, interrupted=False)  # e.g. LightningCLI --help
    assert exited.value.code == 0
    with pytest.raises(SystemExit) as exited:
        call_trainer(lightning_like, 3, interrupted=False)  # a user's sys.exit(3) in a hook is not an interrupt
    assert exited.value.code == 3
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def lightning_sigterm() -> None:
        raise SIGTERMException(1)  # Lightning's own SIGTERM handling, where no handler of ours is installed

    with pytest.raises(KeyboardInterrupt):
        call_trainer(lightning_sigterm)


READS_CHILDREN = pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="reads worker pids from /proc/<pid>/task/<pid>/children (Linux)")


def start_two_worker_farm(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A farm with two worker processes, returned once both train (every model claimed: each vectorised worker claims its four): (farm process, worker pids)."""
    args = farm(tmp_path, QUICKSTART, "--trainer.max_epochs", "2000", "--plan.n_models", "8", "--trainer.devices", "2")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "exp/models").glob("*/claim.json"))) < 8:
        time.sleep(0.1)
    workers = [int(pid) for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) == 2 and len(list((tmp_path / "exp/models").glob("*/claim.json"))) == 8
    return proc, workers


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan's zombie may wait for a PID 1 that never reaps)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@READS_CHILDREN
def test_sigterm_to_a_farm_stops_its_workers_and_exits_143_with_a_message(tmp_path):
    proc, workers = start_two_worker_farm(tmp_path)
    proc.send_signal(signal.SIGTERM)  # the farm process only, as `kill PID` or a job runner's timeout does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out[-2000:], err[-2000:])
    assert "interrupted" in err and "re-run the same command to resume" in err and "Traceback" not in err
    assert err.count("interrupted") == 1, err[-2000:]  # the farm says it, not each of its workers too
    assert not any(running(pid) for pid in workers)
    assert not list((tmp_path / "exp/models").glob("*/claim.json"))


@READS_CHILDREN
def test_a_farm_whose_worker_was_killed_says_so_and_fails(tmp_path):
    """A worker killed by a signal (e.g. the out-of-memory killer) prints nothing itself: the farm must not exit 0."""
    proc, workers = start_two_worker_farm(tmp_path)
    os.kill(workers[0], signal.SIGKILL)
    os.kill(workers[1], signal.SIGTERM)  # the other stops as on Ctrl-C, so the farm ends now
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out[-2000:], err[-2000:])
    assert "error: farm: worker 0 (shard 0/2) was killed by SIGKILL (SIGKILL: often the out-of-memory killer)" in " ".join(err.split())
    assert "re-run the same command to resume" in err and "Traceback" not in err


@READS_CHILDREN
def test_farm_workers_stop_themselves_when_their_farm_is_killed(tmp_path):
    proc, workers = start_two_worker_farm(tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline and any(running(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(running(pid) for pid in workers)
    assert not list((tmp_path / "exp/models").glob("*/claim.json"))  # each worker released its claim on the way out


@pytest.mark.parametrize("error, fix", [
    (PermissionError(13, "Permission denied", "/exp/keep.npy"), "fix the permissions or free space"),
    (OSError(28, "No space left on device", "/exp/keep.npy"), "fix the permissions or free space"),
    (TimeoutError(110, "Connection timed out", "/mnt/nfs/exp"), "fix the cause"),
])
def test_an_os_error_is_one_line_naming_the_file_and_a_fitting_fix(error, fix, capsys):
    from mia_lightning.cli import guarded

    def failing(argv: list[str]) -> int:
        raise error

    assert guarded(failing)([]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {error.filename}: {error.strerror}; {fix} and re-run")


def test_every_train_command_answers_help(capsys):
    """`train.py --help` promises that `train.py <command> --help` lists a command's options: every command keeps it."""
    from mia_lightning.cli import TRAIN_COMMANDS

    for command in TRAIN_COMMANDS:
        try:
            code = train_main([command, "--help"])
        except SystemExit as exited:  # argparse's --help
            code = exited.code
        out = capsys.readouterr().out
        assert code == 0 and "usage" in out.lower(), (command, code, out[-300:])
