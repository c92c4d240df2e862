"""The pipeline's Hydra config for the serving commands (server, client, load test), which are plain
command-line tools: `key=value` arguments override it exactly as they do for `python -m pipeline`."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.core import PipelineError


def load_config(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def main_guard(main: Callable[[], int]) -> None:
    """Runs a command's main: a PipelineError is printed without a traceback and sets the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sys.exit(main())
    except PipelineError as err:
        logging.getLogger("pipeline").error("%s", err)
        sys.exit(err.exit_code)
