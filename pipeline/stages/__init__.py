"""The stage registry: name -> run(ctx) -> StageResult. Later stages add themselves here."""
from pipeline.stages import train, validate

STAGES = {
    "train": train.run,
    "validate": validate.run,
}
