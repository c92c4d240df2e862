"""genrec-pipeline: train, compile, validate, promote and deploy generative recommenders."""
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = PROJECT_ROOT / "artifacts"
