"""Compute dataset_statistics.json (and openpi's norm_stats.json) for a dataset config, without training.

python -m datasets.compute_statistics dataset=libero_spatial out_dir=stats/libero_spatial
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from datasets.atomic import write_json_atomic
from datasets.rlds import compute_all_statistics, sources_from_config
from datasets.statistics import NORM_STATS_FILE, STATISTICS_FILE, to_norm_stats


@hydra.main(version_base="1.3", config_path="../conf", config_name="statistics")
def main(cfg: DictConfig) -> None:
    sources = sources_from_config(cfg.dataset)
    statistics = compute_all_statistics(sources, cfg.robot.action_dim, cfg.paths.cache_dir if cfg.use_cache else None)
    out = Path(cfg.out_dir)
    write_json_atomic(out / STATISTICS_FILE, statistics)
    for key, entry in statistics.items():
        name = NORM_STATS_FILE if len(statistics) == 1 else f"{key}.{NORM_STATS_FILE}"
        write_json_atomic(out / name, to_norm_stats(entry))
    for key, entry in statistics.items():
        print(f"{key}: {entry['num_trajectories']} episodes, {entry['num_transitions']} transitions")
    print(f"statistics: {out / STATISTICS_FILE}")


if __name__ == "__main__":
    main()
