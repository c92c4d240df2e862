"""python -m pipeline stage=all precision=fp16"""
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.core import PipelineError
from pipeline.overrides import check_overrides
from pipeline.tracking import quiet_mlflow_env

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.runner import run_pipeline

    try:
        code = run_pipeline(cfg)
    except PipelineError as err:
        logging.getLogger("pipeline").error("%s", err)
        sys.exit(err.exit_code)
    sys.exit(code)


if __name__ == "__main__":
    quiet_mlflow_env()
    refused = check_overrides(sys.argv[1:])
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        sys.exit(1)
    main()
