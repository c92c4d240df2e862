"""The stage registry: name -> run(ctx) -> StageResult. Later stages add themselves here."""
from pipeline.stages import compile, deploy, onnx, promote, train, trt, validate

STAGES = {
    "train": train.run,
    "compile": compile.run,
    "trt": trt.run,
    "onnx": onnx.run,
    "validate": validate.run,
    "promote": promote.run,
    "deploy": deploy.run,
}
