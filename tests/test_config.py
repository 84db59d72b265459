from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict

from models.policy import Policy
from training.run_dir import register_resolvers

REPO = Path(__file__).resolve().parent.parent
MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (REPO / "conf" / "dataset").glob("*.yaml"))


def _compose(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.mark.parametrize(("model", "dataset"), list(itertools.product(MODELS, DATASETS)))
def test_every_model_dataset_pair_composes_and_resolves(model: str, dataset: str) -> None:
    cfg = _compose(
        [f"model={model}", f"dataset={dataset}", "hydra.runtime.output_dir=/tmp/x", "hydra.runtime.cwd=/tmp"]
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert issubclass(get_class(resolved["model"]["_target_"]), Policy)  # CogACT, or a family that plugs in
    assert resolved["model"]["action_dim"] == resolved["robot"]["action_dim"] == 7
    assert resolved["dataset"]["sources"], "a dataset config lists its RLDS sources"
    if "generate" not in cfg.dataset:  # (sources_from_config would build the sample dataset)
        from dataclasses import asdict

        from datasets.rlds import sources_from_config

        for source in sources_from_config(cfg.dataset):  # plain values: the statistics cache key is their JSON
            json.dumps(asdict(source))


def test_libero_picks_the_libero_robot_and_the_four_suites() -> None:
    cfg = _compose(["dataset=libero", "model=cogact", "hydra.runtime.output_dir=/tmp/x", "hydra.runtime.cwd=/tmp"])
    assert cfg.robot.name == "libero_franka"
    names = [s.name for s in cfg.dataset.sources]
    assert names == [f"libero_{s}_no_noops" for s in ("spatial", "object", "goal", "10")]
    assert all(s.action_transform == "libero_gripper" for s in cfg.dataset.sources)
    assert cfg.model.pretrained == "CogACT/CogACT-Base" and cfg.model.llm_backbone.hidden_size == 4096


def test_import_hygiene() -> None:
    """HF `datasets` must not be installed, and `import datasets` must be this repo's package."""
    from training.loop import check_import_hygiene

    assert importlib.util.find_spec("datasets").origin == str(REPO / "datasets" / "__init__.py")
    check_import_hygiene()


def test_ranks_of_one_launch_agree_on_the_run_dir(monkeypatch) -> None:
    from training.run_dir import run_stamp

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_stamp() == run_stamp()  # both "ranks" share this process's parent, as torchrun's children do
    monkeypatch.setenv("VLA_RUN_STAMP", "job-42")
    assert run_stamp() == "job-42"


def test_a_multirun_jobs_dir_is_one_short_name() -> None:
    from training.run_dir import JOB_NAME_BYTES, job_dirname

    assert job_dirname("optimizer.lr=0.0001") == "optimizer.lr=0.0001"
    assert job_dirname("paths.data_dir=/scratch/me/data") == "paths.data_dir=_scratch_me_data"  # no nested dirs
    long = ",".join(f"model.setting_{i}=é{i}" for i in range(40))  # a long sweep, with 2-byte characters
    name = job_dirname(long)
    assert len(name.encode()) <= JOB_NAME_BYTES and name.endswith("...") and long.startswith(name[:-3])
